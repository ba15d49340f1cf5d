"""input_audio parts in chat completions, on a tiny random Gemma 4 with an audio tower.

Through `mlxd serve`: WAV and MP3 clips are heard (the prompt grows by 25 soft tokens a second
of audio), a clip past the model's 30 s is a 400 naming both lengths, bad audio is a 400 naming
the part, and two clips of the same length behind the same text never share prefix-cache state.
In-process: a model without an audio tower says so with a 400. On the runner: each of several
clips in one prompt gets its own encoder frames.
"""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from sanic import Sanic
from sanic_testing.reusable import ReusableClient

from engine import services
from engine.app import create_app
from engine.chat.audio_input import AudioClip, clip_from_bytes
from engine.chat.audio_tower import embed_audio, expand_audio
from engine.chat.runner import ChatParams, ChatRunner
from engine.config import build_config
from engine.errors import InvalidRequest
from tests.conftest import require_tool
from tests.engine.test_app import assert_error
from tests.serving import Server, free_port, poll_until, serve_one
from tests.wav_files import int_wav

QUESTION = {"type": "text", "text": "What do you hear?"}
GREEDY = {"temperature": 0, "max_tokens": 6}
TOKENS_PER_SECOND = 25  # Gemma 4: one audio soft token per 40 ms


def tone(seconds: float, freq: float, rate: int = 16_000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.4 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def wav(seconds: float, freq: float = 440.0, rate: int = 44_100) -> bytes:
    return int_wav(tone(seconds, freq, rate), rate, channels=2)


def audio_part(data: bytes, fmt: str | None = "wav") -> dict:
    audio = {"data": base64.b64encode(data).decode()}
    if fmt is not None:
        audio["format"] = fmt
    return {"type": "input_audio", "input_audio": audio}


def body(*parts: dict, **extra) -> dict:
    return {"messages": [{"role": "user", "content": [*parts, QUESTION]}], **GREEDY, **extra}


def mp3(seconds: float) -> bytes:
    ffmpeg = require_tool("ffmpeg")
    command = [ffmpeg, "-hide_banner", "-loglevel", "error", "-f", "lavfi"]
    command += ["-i", f"sine=frequency=440:sample_rate=22050:duration={seconds}"]
    command += ["-ac", "1", "-f", "mp3", "pipe:1"]
    return subprocess.run(command, capture_output=True, check=True, timeout=60).stdout


@pytest.fixture(scope="module")
def server(tiny_gemma4_audio: Path, tmp_path_factory) -> Iterator[Server]:
    yield from serve_one(tmp_path_factory.mktemp("chat-audio"), "chat", tiny_gemma4_audio)


@pytest.fixture(scope="module")
def runner(tiny_gemma4_audio: Path) -> ChatRunner:
    return ChatRunner.load(tiny_gemma4_audio, "tiny-gemma4-audio")


def ask(server: Server, request: dict) -> dict:
    response = server.post("chat", "/v1/chat/completions", json=request)
    assert response.status_code == 200, response.text
    return response.json()


def prompt_tokens(server: Server, *parts: dict) -> int:
    return ask(server, body(*parts))["usage"]["prompt_tokens"]


# ------------------------------------------------------------------------------- served


def test_wav_and_mp3_are_heard_and_the_prompt_grows_with_the_clip(server: Server) -> None:
    text_only = prompt_tokens(server)
    one, three = (
        prompt_tokens(server, audio_part(wav(1.0))),
        prompt_tokens(server, audio_part(wav(3.0))),
    )
    assert one - text_only == 1 + TOKENS_PER_SECOND + 1  # <boa>, 25 audio tokens, <eoa>
    assert three - one == 2 * TOKENS_PER_SECOND
    two_mp3 = prompt_tokens(server, audio_part(mp3(2.0), "mp3"))
    assert one < two_mp3 < three  # MP3 encoders pad a few milliseconds
    unlabelled = prompt_tokens(server, audio_part(wav(1.0), None))
    assert unlabelled == one


def test_the_model_hears_the_samples(server: Server) -> None:
    def first_logprobs(freq: float) -> list[float]:
        reply = ask(server, body(audio_part(wav(1.0, freq)), logprobs=True, top_logprobs=5))
        return [t["logprob"] for t in reply["choices"][0]["logprobs"]["content"][0]["top_logprobs"]]

    assert first_logprobs(440.0) == first_logprobs(440.0)
    assert first_logprobs(440.0) != first_logprobs(1200.0)


def test_a_clip_past_the_limit_names_both_lengths(server: Server) -> None:
    long = wav(31.0, rate=16_000)
    response = server.post("chat", "/v1/chat/completions", json=body(audio_part(long)))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "audio_too_long"
    assert error["param"] == "messages[0].content[0].input_audio"
    assert "31.0 s" in error["message"] and "30 s" in error["message"]
    assert (error["audio_seconds"], error["max_audio_seconds"]) == (31.0, 30.0)


def test_a_clip_past_the_decode_cap_is_refused_before_decoding(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from engine import audio
    from engine.chat.audio_input import MAX_DECODE_SECONDS

    def decoded(*args: object, **kwargs: object) -> None:
        raise AssertionError("the clip was decoded")

    monkeypatch.setattr(audio, "_decode_in_process", decoded)
    long = int_wav(tone(MAX_DECODE_SECONDS + 5, 440.0, 8_000), 8_000, channels=1)
    with pytest.raises(InvalidRequest) as refused:
        clip_from_bytes(long, "messages[0].content[0].input_audio")
    error = refused.value
    assert error.code == "audio_too_long" and error.param == "messages[0].content[0].input_audio"
    assert f"{MAX_DECODE_SECONDS:g} s" in str(error)


@pytest.mark.parametrize(
    "part, param, code",
    [
        (
            audio_part(b"not audio at all, just text"),
            "messages[0].content[0].input_audio",
            "invalid_audio",
        ),
        (
            audio_part(wav(1.0), "aac"),
            "messages[0].content[0].input_audio.format",
            "unsupported_audio_format",
        ),
        (
            {"type": "input_audio", "input_audio": "Zm9v"},
            "messages[0].content[0].input_audio",
            None,
        ),
        (
            {"type": "input_audio", "input_audio": {"format": "wav"}},
            "messages[0].content[0].input_audio.data",
            None,
        ),
    ],
)
def test_bad_audio_is_a_400_naming_the_part(server: Server, part, param, code) -> None:
    response = server.post("chat", "/v1/chat/completions", json=body(part))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    if code is not None:
        assert error["code"] == code


def test_different_clips_never_share_cached_state(server: Server, runner: ChatRunner) -> None:
    """Two 2-second clips tokenize alike: only their content keys keep the prefix cache from
    serving one's KV to the other. Each reply must equal the cache-off reply."""
    first, second = wav(2.0, 440.0), wav(2.0, 1200.0)
    expected = [alone(runner, clip) for clip in (first, second)]
    assert max(abs(a - b) for a, b in zip(expected[0][1], expected[1][1], strict=True)) > 1e-2
    replies = [served(server, clip) for clip in (first, second, first)]
    for (tokens, logprobs, _), (want_tokens, want_logprobs) in zip(
        replies, [*expected, expected[0]], strict=True
    ):
        assert tokens == want_tokens
        assert logprobs == pytest.approx(want_logprobs, abs=1e-3)
    assert [cached for *_, cached in replies[:2]] == [0, 0]
    assert replies[2][2] > 0  # the same clip again: its prompt comes from the cache


def served(server: Server, clip: bytes) -> tuple[list[str], list[float], int]:
    reply = ask(server, body(audio_part(clip), logprobs=True))
    content = reply["choices"][0]["logprobs"]["content"]
    cached = reply["usage"]["prompt_tokens_details"]["cached_tokens"]
    return [t["token"] for t in content], [t["logprob"] for t in content], cached


def alone(runner: ChatRunner, clip: bytes) -> tuple[list[str], list[float]]:
    """The greedy reply with no prefix cache, through the service's own decoder."""
    decoded = clip_from_bytes(clip, "clip")
    messages = [{"role": "user", "content": [{"type": "audio"}, QUESTION]}]
    prompt = runner.prepare(messages, [], audio=[decoded])
    params = ChatParams(GREEDY["max_tokens"], 0.0, 1.0, 0, 0.0, None, (), logprobs=0)
    steps = list(runner.generate(prompt, params, lambda: False))
    shown = [s for s in steps if s.token not in runner.eos_token_ids]
    return [runner.decode_token(s.token) for s in shown], [s.logprob for s in shown]


# ----------------------------------------------------------------------------- in-process


@contextmanager
def serving_model(tmp_path: Path, model_dir: Path) -> Iterator[ReusableClient]:
    """The real chat service in-process, loading ``model_dir`` on its model thread."""
    Sanic._app_registry.clear()
    config = build_config({"home": str(tmp_path), "chat_model": str(model_dir)})
    with ReusableClient(create_app(services.spec("chat"), config), port=free_port()) as client:
        poll_until(lambda: client.get("/health")[1].status == 200, "the model ready")
        yield client


def test_a_model_without_an_audio_tower_says_so(tmp_path: Path, tiny_gemma4: Path) -> None:
    with serving_model(tmp_path, tiny_gemma4) as client:
        response = client.post("/v1/chat/completions", json=body(audio_part(wav(1.0))))[1]
        error = assert_error(
            response, 400, param="messages[0].content[0].input_audio", code="audio_not_supported"
        )
        assert "no audio tower" in error["message"]
        assert client.post("/v1/chat/completions", json=body())[1].status == 200


# --------------------------------------------------------------------------------- runner


def test_each_clip_gets_its_own_frames(runner: ChatRunner) -> None:
    """Two clips of different lengths in one prompt: the second clip's soft tokens are what the
    audio tower makes of that clip alone (not the first clip's padding)."""
    clips = [tone(1.0, 300.0), tone(2.5, 900.0)]
    decoded = [AudioClip(c, f"clip{i}", str(i)) for i, c in enumerate(clips)]
    content = [{"type": "audio"}, {"type": "text", "text": "and"}, {"type": "audio"}, QUESTION]
    prompt = runner.prepare([{"role": "user", "content": content}], [], audio=decoded)
    assert prompt.audio is not None and prompt.audio.tokens == (25, 63)
    ids = prompt.input_ids[0].tolist()
    assert ids.count(runner.audio_token_id) == 25 + 63
    embeds = runner.model.get_input_embeddings(prompt.input_ids).inputs_embeds
    mixed = embed_audio(runner.model, prompt.audio, prompt.input_ids, embeds, runner.audio_token_id)
    _, own = expand_audio(runner.processor, runner.processor.audio_token, [clips[1]])
    encoded, _ = runner.model.audio_tower(own.features, ~own.valid)
    alone_frames = runner.model.embed_audio(encoded)[0, :63]
    positions = [i for i, t in enumerate(ids) if t == runner.audio_token_id][25:]
    assert mx.allclose(mixed[0, mx.array(positions)], alone_frames, atol=1e-4).item()


def test_responses_input_audio_is_heard_like_chat(server: Server) -> None:
    clip = audio_part(wav(1.0))
    item = {"role": "user", "content": [clip, {"type": "input_text", "text": QUESTION["text"]}]}
    request = {"input": [item], "max_output_tokens": 4, "temperature": 0}
    response = server.post("chat", "/v1/responses", json=request)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["input_tokens"] == prompt_tokens(server, clip)
