"""Speech-to-text pieces without a server: segment wrapping and timing, subtitles, options,
the time limit, the speech policy's between-windows hook, and the route with a fake runner."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
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
    def __init__(self) -> None:
        self.cancelled = False

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()


def test_time_limit_counts_the_jobs_own_model_time_and_turns_are_handed_on() -> None:
    job, used, pauses = _Job(), [0.0], []
    clock = _Deadline(job, 10.0, lambda: used[0], lambda: pauses.append(used[0]))  # type: ignore[arg-type]
    clock.tick()  # before the first window: the job's first turn goes on
    used[0] = 9.0
    clock.tick()
    assert pauses == [9.0]
    used[0] = 10.5
    with pytest.raises(ApiError) as err:
        clock.tick()
    assert err.value.status == 504 and err.value.code == "time_limit_exceeded"
    assert "--stt-time-limit-factor" in str(err.value) and "of 10 s" in str(err.value)
    assert pauses == [9.0]
    job.cancelled = True
    with pytest.raises(Cancelled):
        _Deadline(job, None, lambda: 1e9, lambda: None).tick()  # type: ignore[arg-type]


class WindowedSpeech(FakeSpeech):
    """`windows` windows for a long clip (the `on_window` hook before each), one for a short one;
    `arrive` runs at each window of the long clip (the tests queue more work there)."""

    def __init__(self, gate: threading.Event, order: list[str], windows: int = 3) -> None:
        self.gate, self.order, self.windows = gate, order, windows
        self.arrive: Callable[[int], None] = lambda step: None

    def transcribe(self, audio, **options) -> dict:
        name = "long" if len(audio) > 16000 else f"short{int(audio[1])}"
        if audio[0] == 1:
            raise ValueError("broken")
        self.order.append(f"{name}:start")
        self.gate.wait(5)
        for step in range(self.windows if name == "long" else 1):
            options["on_window"]()
            self.order.append(f"{name}:{step}")
            if name == "long":
                self.arrive(step)
        return super().transcribe(audio, **options)


def _stt_job(seconds: float, first: float = 0.0, tag: int = 0) -> SttJob:
    import numpy as np

    audio = np.zeros(max(int(seconds * 16000), 2), np.float32)
    audio[0], audio[1] = first, tag
    return SttJob(audio, Options(), None)


async def _ready_worker(runner: FakeSpeech) -> ModelThread:
    worker = ModelThread("t", lambda: runner, decode.policy(build_config({})), queue_size=64)
    worker.start()
    while worker.state.value != "ok":
        await asyncio.sleep(0.01)
    return worker


def test_queued_jobs_take_their_turn_between_windows_of_a_long_one() -> None:
    order: list[str] = []
    gate = threading.Event()
    runner = WindowedSpeech(gate, order)

    async def main() -> list:
        worker = await _ready_worker(runner)
        jobs = [worker.submit(_stt_job(5))]
        while not order:
            await asyncio.sleep(0.01)
        jobs += [worker.submit(_stt_job(0.5, tag=1)), worker.submit(_stt_job(0.5, first=1.0))]
        gate.set()
        results = await asyncio.gather(*(j.result() for j in jobs), return_exceptions=True)
        worker.stop(2)
        return results

    results = asyncio.run(main())
    assert [r["text"] for r in results[:2]] == [" Fake words.", " Fake words."]
    assert isinstance(results[2], ApiError)  # a failing job fails alone
    assert order == ["long:start", "long:0", "short1:start", "short1:0", "long:1", "long:2"]


def test_a_long_job_finishes_while_short_ones_keep_arriving() -> None:
    """A short job arrives during every window of the long one: each answers before the long
    job's next window, and the long job still finishes (round robin, not nesting)."""
    order: list[str] = []
    gate = threading.Event()
    gate.set()
    runner = WindowedSpeech(gate, order, windows=8)
    done: list[str] = []

    async def main() -> None:
        loop = asyncio.get_running_loop()
        worker = await _ready_worker(runner)
        shorts: list = []

        async def submit_short(step: int) -> None:
            job = worker.submit(_stt_job(0.5, tag=step + 1))
            job.future.add_done_callback(lambda _: done.append(f"short{step + 1}"))
            shorts.append(job)

        def arrive(step: int) -> None:  # on the model thread, inside the long job's window
            asyncio.run_coroutine_threadsafe(submit_short(step), loop).result(5)

        runner.arrive = arrive
        long = worker.submit(_stt_job(5))
        long.future.add_done_callback(lambda _: done.append("long"))
        result = await long.result()
        assert result["text"] == " Fake words."
        await asyncio.gather(*(j.result() for j in shorts))
        worker.stop(2)

    asyncio.run(main())
    assert [s for s in order if s.startswith("long:") and s != "long:start"] == [
        f"long:{i}" for i in range(8)
    ]
    for step in range(1, 8):  # short k ran whole between the long job's windows k-1 and k
        window = order.index(f"long:{step}")
        assert order.index(f"short{step}:0") < window < order.index(f"short{step + 1}:start")
    assert done.index("long") == 7 and done[-1] == "short8"


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
