"""Port 8082 through a running `mlxd serve` with the tiny random Whisper: every response format
on both routes, every audio format, bad input, real clients (OpenAI SDK, curl), long audio
interleaved with short requests, and client disconnects. The text is garbage (random weights);
shapes, timing and plumbing are what is checked here (tests/engine/test_stt_real.py checks text).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import openai
import pytest
import srt
import webvtt

from tests.conftest import require_tool
from tests.serving import Server, serve_one
from tests.wav_files import float_wav, int_wav

RATE = 16_000
FAST = {"temperature": "0", "temperature_inc": "0"}  # one decode per window


def noise(seconds: float, rate: int = RATE, seed: int = 0) -> np.ndarray:
    return 0.1 * np.random.default_rng(seed).standard_normal(int(seconds * rate))


def wav(samples: np.ndarray, rate: int = RATE, width: int = 2, channels: int = 1) -> bytes:
    return int_wav(samples, rate, width, channels)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_whisper: Path) -> Iterator[Server]:
    yield from serve_one(tmp_path_factory.mktemp("stt"), "stt", tiny_whisper)


@pytest.fixture(scope="module")
def clip() -> bytes:
    return wav(noise(2.0))


def inference(server: Server, data: bytes, name: str = "a.wav", **fields: str) -> httpx.Response:
    files = {"file": (name, data)}
    return server.post("stt", "/inference", files=files, data={**FAST, **fields})


# ---- whisper-server formats ------------------------------------------------------------------


def test_json_is_segment_texts_each_with_a_newline(server: Server, clip: bytes) -> None:
    body = inference(server, clip, response_format="json").json()
    assert set(body) == {"text"}
    assert body["text"].endswith("\n") and body["text"].startswith(("!", " "))
    verbose = inference(server, clip, response_format="verbose_json").json()
    lines = [seg["text"] for seg in verbose["segments"]]
    assert lines and verbose["text"] == "".join(f"{line}\n" for line in lines)


def test_text_format(server: Server, clip: bytes) -> None:
    response = inference(server, clip, response_format="text")
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    assert response.text == inference(server, clip).json()["text"]


def test_srt_parses_and_matches_the_segments(server: Server, clip: bytes) -> None:
    response = inference(server, clip, response_format="srt")
    assert response.headers["content-type"] == "application/x-subrip"
    cues = list(srt.parse(response.text, ignore_errors=False))
    segments = inference(server, clip, response_format="verbose_json").json()["segments"]
    assert [c.index for c in cues] == list(range(1, len(segments) + 1))
    for cue, seg in zip(cues, segments, strict=True):
        assert cue.start.total_seconds() == pytest.approx(seg["start"], abs=1e-3)
        assert cue.end.total_seconds() == pytest.approx(seg["end"], abs=1e-3)
        assert cue.end >= cue.start
    assert response.text.startswith("1\n00:00:")
    assert inference(server, clip, response_format="srt", offset_n="10").text.startswith("11\n")


def test_vtt_parses(server: Server, clip: bytes) -> None:
    response = inference(server, clip, response_format="vtt")
    assert response.headers["content-type"] == "text/vtt"
    assert response.text.startswith("WEBVTT\n\n") and response.text.endswith("\n\n")
    captions = webvtt.from_string(response.text)
    assert len(captions) >= 1
    for caption in captions:
        assert caption.start_in_seconds <= caption.end_in_seconds <= 2.5


def test_verbose_json_has_every_whisper_server_field(server: Server, clip: bytes) -> None:
    body = inference(server, clip, response_format="verbose_json", language="zh").json()
    assert list(body) == [
        "task", "language", "duration", "text", "segments",
        "detected_language", "detected_language_probability", "language_probabilities",
    ]  # fmt: skip
    assert body["task"] == "transcribe" and body["language"] == "chinese"
    assert body["duration"] == pytest.approx(2.0, abs=0.01)
    probs = body["language_probabilities"]
    assert all(p > 0.001 for p in probs.values()) and sum(probs.values()) <= 1.0001
    assert body["detected_language_probability"] == max(probs.values())
    for i, seg in enumerate(body["segments"]):
        assert list(seg) == [
            "id", "text", "start", "end", "tokens", "words",
            "temperature", "avg_logprob", "no_speech_prob",
        ]  # fmt: skip
        assert seg["id"] == i and all(t < 50257 for t in seg["tokens"])
        for word in seg["words"]:
            assert list(word) == ["word", "start", "end", "t_dtw", "probability"]
    no_probs = inference(
        server, clip, response_format="verbose_json", no_language_probabilities="true"
    ).json()
    assert "language_probabilities" not in no_probs


def test_segment_times_stay_inside_the_audio(server: Server, clip: bytes) -> None:
    # The random model emits timestamps past the end and ends before starts: clamped.
    body = inference(server, clip, response_format="verbose_json", max_len="1").json()
    for seg in body["segments"]:
        assert 0 <= seg["start"] <= seg["end"] <= body["duration"] + 1e-6
        for word in seg["words"]:
            assert 0 <= word["start"] <= word["end"] <= body["duration"] + 1e-6


def test_no_timestamps_drops_times(server: Server, clip: bytes) -> None:
    body = inference(server, clip, response_format="verbose_json", no_timestamps="true").json()
    for seg in body["segments"]:
        assert "start" not in seg and all("start" not in w for w in seg["words"])


def test_unknown_response_format_falls_back_to_json(server: Server, clip: bytes) -> None:
    assert set(inference(server, clip, response_format="xml").json()) == {"text"}


def test_translate_detect_language_offset_and_duration(server: Server) -> None:
    audio = wav(noise(12.0))
    verbose = {"response_format": "verbose_json"}
    assert inference(server, audio, translate="yes", **verbose).json()["task"] == "translate"
    detected = inference(server, audio, detect_language="1", **verbose).json()
    assert detected["segments"] == [] and detected["language"] == detected["detected_language"]
    clipped = inference(server, audio, offset_t="8000", duration="2000", **verbose).json()
    assert clipped["duration"] == pytest.approx(12.0, abs=0.01)
    for seg in clipped["segments"]:
        assert 8.0 - 1e-6 <= seg["start"] <= seg["end"] <= 10.0 + 1e-6
    past_end = inference(server, audio, offset_t="60000").json()
    assert past_end == {"text": ""}


def test_every_whisper_server_field_is_accepted(server: Server, clip: bytes) -> None:
    fields = {
        "language": "auto", "detect_language": "false", "translate": "false",
        "response_format": "json", "temperature": "0.0", "temperature_inc": "0",
        "prompt": "Hello.", "offset_t": "0", "offset_n": "0", "duration": "0", "max_len": "0",
        "max_context": "-1", "split_on_word": "true", "best_of": "2", "beam_size": "5",
        "audio_ctx": "0", "no_timestamps": "false", "token_timestamps": "true",
        "no_speech_thold": "0.6", "word_thold": "0.01", "entropy_thold": "2.4",
        "logprob_thold": "-1.0", "debug_mode": "false", "diarize": "false",
        "tinydiarize": "false", "suppress_nst": "true", "suppress_non_speech": "true",
        "vad": "false", "vad_threshold": "0.5", "vad_min_speech_duration_ms": "250",
        "vad_min_silence_duration_ms": "100", "vad_max_speech_duration_s": "30",
        "vad_speech_pad_ms": "30", "vad_samples_overlap": "0.1",
        "no_language_probabilities": "false", "something_unknown": "ignored",
    }  # fmt: skip
    files = {"file": ("a.wav", clip)}
    response = server.post("stt", "/inference", files=files, data=fields)
    assert response.status_code == 200, response.text
    assert set(response.json()) == {"text"}


def test_curl_exactly_like_the_whisper_cpp_readme(server: Server, tmp_path: Path) -> None:
    curl = require_tool("curl")
    audio = tmp_path / "sample.wav"
    audio.write_bytes(wav(noise(1.0)))
    port = server.ports["stt"]
    command = f"""{curl} -s 127.0.0.1:{port}/inference \\
-H "Content-Type: multipart/form-data" \\
-F file="@{audio}" \\
-F temperature="0.0" \\
-F temperature_inc="0.2" \\
-F response_format="json"
"""
    result = subprocess.run(["bash", "-c", command], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    body = json.loads(result.stdout)
    assert set(body) == {"text"} and body["text"].endswith("\n")


# ---- OpenAI route and SDK --------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdk(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("stt") + "/v1", api_key="x", max_retries=0)


def test_openai_sdk_every_format(sdk: openai.OpenAI, clip: bytes) -> None:
    create = sdk.audio.transcriptions.create
    plain = create(model="whisper-1", file=("a.wav", clip), temperature=0.5)
    assert isinstance(plain.text, str) and not plain.text.startswith(" ")
    text = create(model="whisper-1", file=("a.wav", clip), response_format="text", temperature=0.5)
    assert isinstance(text, str) and text.endswith("\n")
    cues = list(
        srt.parse(create(model="m", file=("a.wav", clip), response_format="srt", temperature=0.5))
    )
    assert cues and all(c.content == c.content.strip() for c in cues)
    vtt = create(model="m", file=("a.wav", clip), response_format="vtt", temperature=0.5)
    assert len(webvtt.from_string(vtt)) >= 1
    verbose = create(
        model="m", file=("a.wav", clip), response_format="verbose_json", temperature=0.5
    )
    assert verbose.duration == pytest.approx(2.0, abs=0.01) and verbose.language
    assert verbose.segments and verbose.segments[0].avg_logprob is not None
    assert verbose.words is None


def sampled_until_words(create: Callable[[], Any], attempts: int = 20) -> Any:
    """The tiny random model, sampling, sometimes ends at once with no words; ask again."""
    for _ in range(attempts):
        result = create()
        if result.words:
            return result
    return result


def test_openai_sdk_word_timestamps_and_language(sdk: openai.OpenAI, clip: bytes) -> None:
    common = {"model": "whisper-1", "file": ("a.wav", clip), "response_format": "verbose_json"}
    verbose = sampled_until_words(
        lambda: sdk.audio.transcriptions.create(
            **common, language="zh", timestamp_granularities=["word"], temperature=0.5
        )
    )
    assert verbose.language == "chinese" and verbose.segments is None
    assert verbose.words and all(w.start <= w.end for w in verbose.words)
    both = sampled_until_words(
        lambda: sdk.audio.transcriptions.create(
            **common, timestamp_granularities=["word", "segment"], temperature=0.5
        )
    )
    assert both.words and both.segments


def test_openai_sdk_translation(sdk: openai.OpenAI, clip: bytes) -> None:
    result = sdk.audio.translations.create(
        model="whisper-1", file=("a.wav", clip), response_format="verbose_json", temperature=0.5
    )
    assert result.text is not None
    assert result.model_extra.get("task") == "translate"


def test_openai_errors_are_400(sdk: openai.OpenAI, clip: bytes) -> None:
    cases = [
        {"response_format": "xml"},
        {"language": "klingon"},
        {"temperature": 3},
        {"timestamp_granularities": ["sentence"], "response_format": "verbose_json"},
    ]
    for extra in cases:
        with pytest.raises(openai.BadRequestError) as err:
            sdk.audio.transcriptions.create(model="m", file=("a.wav", clip), **extra)
        assert err.value.status_code == 400 and err.value.body["param"]


# ---- audio formats ---------------------------------------------------------------------------


def _encoded(tmp: Path, ext: str, args: list[str]) -> bytes:
    ffmpeg = require_tool("ffmpeg")
    source = tmp / "source.wav"
    source.write_bytes(wav(noise(1.0, 44_100), 44_100, channels=2))
    target = tmp / f"out.{ext}"
    subprocess.run([ffmpeg, "-nostdin", "-loglevel", "error", "-y", "-i", str(source), *args,
                    str(target)], check=True)  # fmt: skip
    return target.read_bytes()


CONTAINERS = {
    "mp3": ["-c:a", "libmp3lame"],
    "flac": ["-c:a", "flac"],
    "ogg": ["-c:a", "libvorbis"],
    "m4a": ["-c:a", "aac"],
    "webm": ["-c:a", "libopus"],
    "opus": ["-c:a", "libopus"],
}


@pytest.fixture(scope="module")
def containers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("containers")
    return {ext: _encoded(tmp, ext, args) for ext, args in CONTAINERS.items()}


WAVS = {
    "pcm8-8k": lambda: wav(noise(1.0, 8_000), 8_000, width=1),
    "pcm16-16k": lambda: wav(noise(1.0)),
    "pcm24-22k": lambda: wav(noise(1.0, 22_050), 22_050, width=3),
    "pcm32-48k": lambda: wav(noise(1.0, 48_000), 48_000, width=4),
    "float32-44k": lambda: float_wav(noise(1.0, 44_100), 44_100),
    "stereo-44k": lambda: wav(noise(1.0, 44_100), 44_100, channels=2),
}


@pytest.mark.parametrize("kind", list(WAVS))
def test_wav_variants(server: Server, kind: str) -> None:
    body = inference(server, WAVS[kind](), response_format="verbose_json").json()
    assert body["duration"] == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("ext", list(CONTAINERS))
def test_compressed_formats(server: Server, containers: dict[str, bytes], ext: str) -> None:
    response = inference(server, containers[ext], f"a.{ext}", response_format="verbose_json")
    assert response.status_code == 200, response.text
    assert response.json()["duration"] == pytest.approx(1.0, abs=0.1)


@pytest.fixture(scope="module")
def server_without_ffmpeg(tmp_path_factory, tiny_whisper: Path) -> Iterator[Server]:
    if Path("/opt/homebrew/bin/ffmpeg").exists() or Path("/usr/local/bin/ffmpeg").exists():
        pytest.skip("ffmpeg is installed in a Homebrew location the server always searches")
    tmp = tmp_path_factory.mktemp("stt-noffmpeg")
    yield from serve_one(tmp, "stt", tiny_whisper, env={"PATH": "/nonexistent"})


@pytest.mark.parametrize(("ext", "kind"), [("m4a", "m4a/mp4"), ("webm", "webm/matroska"),
                                           ("opus", "ogg/opus")])  # fmt: skip
def test_without_ffmpeg_other_containers_are_400_naming_the_format(
    server_without_ffmpeg: Server, containers: dict[str, bytes], ext: str, kind: str
) -> None:
    response = inference(server_without_ffmpeg, containers[ext], f"a.{ext}")
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert kind in message and "ffmpeg" in message and "brew install ffmpeg" in message
    for ext in ("mp3", "flac", "ogg"):  # decoded in-process: no ffmpeg needed
        assert inference(server_without_ffmpeg, containers[ext], f"a.{ext}").status_code == 200


BAD_AUDIO = {
    "empty": b"",
    "text": b"hello, this is not audio at all\n" * 20,
    "png": b"\x89PNG\r\n\x1a\n" + bytes(200),
    "truncated wav": wav(noise(1.0))[:30],
    "zero-length wav": wav(np.zeros(0)),
    "corrupt mp3": b"ID3\x03\x00\x00\x00\x00\x00\x00" + b"\xff\xfb\x90\x00" + bytes(64),
    "wav header then junk": wav(noise(0.1))[:44] + b"\xff" * 10,  # 5 samples
}


@pytest.mark.parametrize("name", list(BAD_AUDIO))
@pytest.mark.parametrize("route", ["/inference", "/v1/audio/transcriptions"])
def test_bad_audio_is_400_json(server: Server, name: str, route: str) -> None:
    files = {"file": ("upload.wav", BAD_AUDIO[name])}
    response = server.post("stt", route, files=files, data={"model": "whisper-1"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "file" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"temperature": "abc"}, "temperature"),
        ({"temperature": "1.5"}, "temperature"),
        ({"language": "xx"}, "language"),
        ({"translate": "maybe"}, "translate"),
        ({"offset_t": "-5"}, "offset_t"),
        ({"max_len": "1.5"}, "max_len"),
        ({"best_of": "many"}, "best_of"),
    ],
)
def test_bad_fields_are_400(server: Server, clip: bytes, fields: dict, param: str) -> None:
    response = inference(server, clip, **fields)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert server.health("stt") == 200


def test_missing_file_is_400(server: Server) -> None:
    response = server.post("stt", "/inference", files={"audio": ("a.wav", b"x")})
    assert response.status_code == 400 and response.json()["error"]["param"] == "file"


# ---- long audio, interleaving, disconnects ---------------------------------------------------


def test_three_minutes_while_health_and_a_short_request_answer(server: Server) -> None:
    long_audio = wav(noise(180.0, seed=3))
    finished: dict[str, float] = {}

    def transcribe_long() -> None:
        response = inference(server, long_audio, response_format="verbose_json")
        assert response.status_code == 200, response.text
        segments = response.json()["segments"]
        assert segments and segments[-1]["end"] > 150  # every window was transcribed
        finished["long"] = time.monotonic()

    worker = threading.Thread(target=transcribe_long)
    worker.start()
    _wait_until_working(server)
    assert server.get("stt", "/health").status_code == 200
    assert "long" not in finished, "/health answered only after the long request"
    short = inference(server, wav(noise(1.0, seed=4)))
    finished["short"] = time.monotonic()
    assert short.status_code == 200
    worker.join(300)
    assert "long" in finished, "the long request failed"
    assert finished["short"] < finished["long"], "the short request waited for the long one"


def _wait_until_working(server: Server) -> None:
    """Until the model thread is on the long job (the upload and decode take a moment)."""
    time.sleep(1.5)


def test_client_disconnect_stops_the_work(server: Server) -> None:
    long_audio = wav(noise(180.0, seed=5))
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url("stt") + "/inference",
            files={"file": ("long.wav", long_audio)},
            data=FAST,
            timeout=httpx.Timeout(10, read=2.5),
        )
    server.wait_for(lambda: "POST /inference 499" in server.log(), 10, "the 499 access line")
    server.wait_for(lambda: "transcription cancelled after" in server.log(), 20, "the cancellation")
    assert inference(server, wav(noise(1.0))).status_code == 200


# ---- budgets: the audio length limit and admission before decoding ----------------------------


@pytest.fixture(scope="module")
def tight(tmp_path_factory: pytest.TempPathFactory, tiny_whisper: Path) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("stt-tight")
    flags = ("--queue-size", "1", "--stt-max-audio-seconds", "300")
    yield from serve_one(tmp, "stt", tiny_whisper, *flags)


def test_audio_over_the_limit_is_413_naming_both_lengths(tight: Server, tmp_path: Path) -> None:
    ffmpeg = require_tool("ffmpeg")
    src = tmp_path / "long.opus"
    subprocess.run(
        [ffmpeg, "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=440:r=48000",
         "-t", "600", "-c:a", "libopus", "-b:a", "6k", str(src)],
        check=True,
    )  # fmt: skip
    for route in ("/inference", "/v1/audio/transcriptions"):
        response = tight.post("stt", route, files={"file": ("long.opus", src.read_bytes())})
        assert response.status_code == 413, response.text
        error = response.json()["error"]
        assert error["code"] == "audio_too_long" and error["param"] == "file"
        assert error["audio_seconds"] == pytest.approx(600, abs=0.1)
        assert error["max_audio_seconds"] == 300
        # From the header: the exact length, not "at least" (the decoder never ran).
        assert "(long.opus) is 600.0 s long, over this server's limit of 300 s" in error["message"]
        assert "--stt-max-audio-seconds" in error["message"]
    assert inference(tight, wav(noise(1.0))).status_code == 200


def test_a_full_queue_is_503_before_the_audio_is_decoded(tight: Server) -> None:
    """With the one queue slot taken, an upload that is not even audio gets the 503: the
    request was refused before its file was looked at."""
    started = threading.Event()

    def hold_the_slot() -> None:
        started.set()
        with contextlib.suppress(httpx.ReadTimeout):  # then leaves: the job is dropped
            httpx.post(
                tight.url("stt") + "/inference",
                files={"file": ("long.wav", wav(noise(290.0, seed=7)))},
                data=FAST,
                timeout=httpx.Timeout(30, read=5),
            )

    holder = threading.Thread(target=hold_the_slot)
    holder.start()
    started.wait(5)
    tight.wait_for(
        lambda: tight.get("stt", "/mlxd/ps").json()["requests_pending"] == 1, 30, "the slot"
    )
    refused = inference(tight, b"not audio at all" * 100, "x.wav")
    holder.join(60)
    assert refused.status_code == 503, refused.text
    assert refused.json()["error"]["code"] == "queue_full"
    assert refused.headers["retry-after"] == "1"
    tight.wait_for(
        lambda: tight.get("stt", "/mlxd/ps").json()["requests_pending"] == 0, 60, "the drop"
    )
    assert inference(tight, b"not audio at all" * 100, "x.wav").json()["error"]["code"] == (
        "invalid_audio"
    )
