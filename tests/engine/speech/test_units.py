"""Speech-to-text pieces without a server: segment wrapping and timing, subtitles, options,
the time limit, the speech policy's between-windows hook, and the route with a fake runner."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from sanic import Sanic
from sanic_testing.reusable import ReusableClient

from engine.app import create_app
from engine.config import build_config
from engine.errors import ApiError
from engine.modelthread import Cancelled, ModelThread
from engine.speech import decode
from engine.speech.decode import _Deadline
from engine.speech.request import Options, SttJob, _fallback
from engine.speech.response import placed, timestamp, to_srt, to_vtt, wrap
from tests.engine.fakes import FakeSpeech, fake_model_dir, fake_spec
from tests.serving import free_port


def segment(words: list[tuple[str, float, float]], start: float = 0.0, end: float = 10.0) -> dict:
    """A segment whose tokens are its words (one piece each), with word timings."""
    pieces = [[w, [100 + i]] for i, (w, _, _) in enumerate(words)]
    return {
        "text": "".join(w for w, _, _ in words),
        "start": start,
        "end": end,
        "tokens": [100 + i for i in range(len(words))],
        "pieces": pieces,
        "words": [{"word": w, "start": a, "end": b, "probability": 0.9} for w, a, b in words],
        "temperature": 0.0,
        "avg_logprob": -0.2,
        "no_speech_prob": 0.01,
    }


SENTENCE = [(" The", 0.0, 0.3), (" quick", 0.3, 0.7), (" brown", 0.7, 1.0), (" fox", 1.0, 1.4),
            (" jumps", 1.4, 1.9), (" over", 1.9, 2.2), (" the", 2.2, 2.4), (" lazy", 2.4, 2.8),
            (" dog.", 2.8, 3.3)]  # fmt: skip


def test_wrap_cuts_at_the_token_that_overflows() -> None:
    parts = wrap(segment(SENTENCE, 0.0, 3.3), max_len=16, split_on_word=False)
    assert [p["text"] for p in parts] == [" The quick brown", " fox jumps over", " the lazy dog."]
    assert all(len(p["text"].encode()) <= 16 for p in parts)
    assert [(p["start"], p["end"]) for p in parts] == [(0.0, 1.0), (1.0, 2.2), (2.2, 3.3)]
    assert [w["word"] for w in parts[1]["words"]] == [" fox", " jumps", " over"]
    assert parts[2]["tokens"] == [106, 107, 108]


def test_wrap_keeps_short_segments_whole() -> None:
    seg = segment(SENTENCE)
    assert wrap(seg, max_len=60, split_on_word=False) == [seg]


def test_split_on_word_waits_for_a_word_start() -> None:
    pieces = [(" extra", 0.0, 0.5), ("ordinary", 0.5, 1.0), (" day", 1.0, 1.5)]
    by_token = wrap(segment(pieces, 0.0, 1.5), max_len=8, split_on_word=False)
    assert [p["text"] for p in by_token] == [" extra", "ordinary", " day"]
    by_word = wrap(segment(pieces, 0.0, 1.5), max_len=8, split_on_word=True)
    assert [p["text"] for p in by_word] == [" extraordinary", " day"]


def test_wrap_counts_utf8_bytes_like_whisper_server() -> None:
    chars = [(c, i * 0.3, i * 0.3 + 0.3) for i, c in enumerate("今天天气很好我们去公园")]
    parts = wrap(segment(chars, 0.0, 3.3), max_len=9, split_on_word=False)
    assert [p["text"] for p in parts] == ["今天天", "气很好", "我们去", "公园"]


def test_placed_shifts_by_the_offset_and_clamps() -> None:
    seg = segment(SENTENCE, 0.5, 40.0)
    seg["words"][-1]["end"] = 99.0
    (out,) = placed([seg], offset_s=8.0, length_s=5.0)
    assert (out["start"], out["end"]) == (8.5, 13.0)
    assert out["words"][0]["start"] == 8.0 and out["words"][-1]["end"] == 13.0
    backwards = {**segment(SENTENCE), "start": 4.0, "end": 2.0}
    assert placed([backwards], 0.0, 5.0)[0]["end"] == 4.0


def test_subtitles() -> None:
    segs = [{"text": " Hello.", "start": 0.0, "end": 1.5}, {"text": " Bye.", "start": 3661.0,
                                                              "end": 3662.25}]  # fmt: skip
    assert to_srt(segs) == (
        "1\n00:00:00,000 --> 00:00:01,500\n Hello.\n\n2\n01:01:01,000 --> 01:01:02,250\n Bye.\n\n"
    )
    assert to_srt(segs, first=4, strip=True).startswith("5\n00:00:00,000 --> 00:00:01,500\nHello.")
    assert to_vtt(segs) == (
        "WEBVTT\n\n00:00:00.000 --> 00:00:01.500\n Hello.\n\n"
        "01:01:01.000 --> 01:01:02.250\n Bye.\n\n"
    )
    assert timestamp(-1.0) == "00:00:00.000" and timestamp(59.9996, ",") == "00:01:00,000"


def test_temperature_ladder() -> None:
    assert _fallback(0.0, 0.2) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert _fallback(0.5, 0.25) == (0.5, 0.75, 1.0)
    assert _fallback(0.3, 0.0) == (0.3,)
    assert _fallback(1.0, 0.2) == (1.0,)


class _Job:
    def __init__(self, others: float = 0.0) -> None:
        self.cancelled, self.others, self.yields = False, others, 0

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def run_others(self) -> float:
        self.yields += 1
        return self.others


def test_time_limit_excludes_time_spent_on_other_requests() -> None:
    job = _Job()
    clock = _Deadline(job, 0.05, job.run_others)  # type: ignore[arg-type]
    clock.tick()
    time.sleep(0.08)
    with pytest.raises(ApiError) as err:
        clock.tick()
    assert err.value.status == 504 and err.value.code == "time_limit_exceeded"
    assert "--stt-time-limit-factor" in str(err.value) and "of 0 s" in str(err.value)
    generous = _Job(others=0.5)
    clock = _Deadline(generous, 0.05, generous.run_others)  # type: ignore[arg-type]
    clock.tick()  # the queue took 0.5 s: the deadline moves by that much
    time.sleep(0.08)
    clock.tick()
    generous.cancelled = True
    with pytest.raises(Cancelled):
        clock.tick()


class WindowedSpeech(FakeSpeech):
    """Three windows for a long clip (the `on_window` hook before each), one for a short one."""

    def __init__(self, gate: threading.Event, order: list[str]) -> None:
        self.gate, self.order = gate, order

    def transcribe(self, audio, **options) -> dict:
        name = "long" if len(audio) > 16000 else "short"
        if name == "short" and audio[0] == 1:
            raise ValueError("broken")
        self.order.append(f"{name}:start")
        self.gate.wait(5)
        for step in range(3 if name == "long" else 1):
            options["on_window"]()
            self.order.append(f"{name}:{step}")
        return super().transcribe(audio, **options)


def test_the_speech_policy_runs_queued_jobs_between_windows_of_a_long_one() -> None:
    import numpy as np

    order: list[str] = []
    gate = threading.Event()
    runner = WindowedSpeech(gate, order)

    def job(seconds: float, first: float = 0.0) -> SttJob:
        audio = np.zeros(int(seconds * 16000), np.float32)
        audio[0] = first
        return SttJob(audio, Options(), None)

    async def main() -> list:
        config = build_config({})
        worker = ModelThread("t", lambda: runner, decode.policy(config), queue_size=8)
        worker.start()
        while worker.state.value != "ok":
            await asyncio.sleep(0.01)
        jobs = [worker.submit(job(5))]
        await asyncio.sleep(0.1)
        jobs += [worker.submit(job(0.5)), worker.submit(job(0.5, first=1.0))]
        gate.set()
        results = await asyncio.gather(*(j.result() for j in jobs), return_exceptions=True)
        worker.stop(2)
        return results

    results = asyncio.run(main())
    assert [r["text"] for r in results[:2]] == [" Fake words.", " Fake words."]
    assert isinstance(results[2], ApiError)  # a failing nested job fails alone
    assert order == ["long:start", "short:start", "short:0", "long:0", "long:1", "long:2"]


class RecordingSpeech(FakeSpeech):
    def __init__(self) -> None:
        self.calls: list[dict] = []

    def transcribe(self, audio, **options) -> dict:
        self.calls.append(options)
        return super().transcribe(audio, **options)


def test_defaults_are_fresh_for_every_request(tmp_path: Path) -> None:
    import io
    import wave

    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(bytes(32000))
    Sanic._app_registry.clear()
    config = build_config(
        {
            "home": str(tmp_path),
            "stt_model": str(fake_model_dir(tmp_path, "stt")),
            "stt_language": "de",
        }  # fmt: skip
    )
    spec, runner = fake_spec("stt", RecordingSpeech())
    app = create_app(spec, config)
    files = {"file": ("a.wav", buffer.getvalue())}
    with ReusableClient(app, port=free_port()) as client:
        for _ in range(100):
            if client.get("/health")[1].status == 200:
                break
            time.sleep(0.05)
        first = {"language": "zh", "translate": "true", "temperature": "0.4", "prompt": "Hi"}
        assert client.post("/inference", files=files, data=first)[1].status == 200
        assert client.post("/inference", files=files)[1].status == 200
        assert client.post("/v1/audio/transcriptions", files=files)[1].status == 200
    a, b, c = runner.calls
    assert (a["language"], a["task"], a["temperature"], a["initial_prompt"]) == (
        "zh", "translate", (0.4, 0.6, 0.8, 1.0), "Hi"
    )  # fmt: skip
    assert (b["language"], b["task"], b["initial_prompt"]) == ("de", "transcribe", None)
    assert b["temperature"] == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0) and b["best_of"] == 2
    assert c["language"] is None  # OpenAI: no language means detect it


def test_stt_job_is_immutable() -> None:
    job = SttJob(audio=None, options=Options(), time_limit_s=None)  # type: ignore[arg-type]
    with pytest.raises(AttributeError):
        job.options.language = "en"  # type: ignore[misc]
