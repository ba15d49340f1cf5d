"""SpeechRunner on a tiny random multilingual Whisper (no downloads)."""

from __future__ import annotations

import importlib
import json
import socket
from collections.abc import Callable
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.modelthread import Cancelled
from engine.speech.runner import SpeechRunner, weights_dtype
from tests.tiny.whisper import build_whisper_mlx

SEGMENT_KEYS = {
    "id",
    "seek",
    "start",
    "end",
    "text",
    "tokens",
    "temperature",
    "avg_logprob",
    "compression_ratio",
    "no_speech_prob",
    "pieces",
}


def cancel_when(condition: Callable[[], bool]) -> Callable[[], None]:
    """An `on_window` hook that cancels the transcription once `condition` holds."""

    def hook() -> None:
        if condition():
            raise Cancelled()

    return hook


def _noise(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> SpeechRunner:
    model_dir = build_whisper_mlx(tmp_path_factory.mktemp("whisper") / "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
        return SpeechRunner.load(model_dir, "whisper-tiny-random")


@pytest.fixture
def decode_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts mlx-whisper's per-window decode runs (one per 30 s window and temperature)."""
    decoding = importlib.import_module("mlx_whisper.decoding")
    calls: list[int] = []
    original = decoding.DecodingTask.run

    def counted(self: object, mel: mx.array) -> object:
        calls.append(1)
        return original(self, mel)

    monkeypatch.setattr(decoding.DecodingTask, "run", counted)
    return calls


def test_transcribe_shape(runner: SpeechRunner, capsys: pytest.CaptureFixture[str]) -> None:
    assert runner.fp16 is False and runner.model_id == "whisper-tiny-random"
    result = runner.transcribe(_noise(1.0), language="zh", temperature=0.0)
    assert set(result) == {"text", "segments", "language"}
    assert result["language"] == "zh"
    assert isinstance(result["text"], str)
    for i, seg in enumerate(result["segments"]):
        assert SEGMENT_KEYS <= set(seg) <= SEGMENT_KEYS | {"words"} and seg["id"] == i
        assert isinstance(seg["start"], float) and isinstance(seg["tokens"], list)
    json.dumps(result)  # plain Python values only
    out, err = capsys.readouterr()
    assert out == "" and "frames" not in err  # no progress bar, no prints


def test_cancelled_between_windows(runner: SpeechRunner, decode_calls: list[int]) -> None:
    audio = _noise(45.0, seed=1)  # two 30 s windows
    with pytest.raises(Cancelled):
        runner.transcribe(
            audio,
            language="zh",
            temperature=0.0,
            sample_len=16,
            on_window=cancel_when(lambda: len(decode_calls) >= 1),
        )
    assert len(decode_calls) == 1
    decode_calls.clear()
    runner.transcribe(audio, language="zh", temperature=0.0, sample_len=16)
    assert len(decode_calls) >= 2  # the same audio really has more than one window


def test_cancelled_before_start(runner: SpeechRunner, decode_calls: list[int]) -> None:
    with pytest.raises(Cancelled):
        runner.transcribe(_noise(1.0), language=None, on_window=cancel_when(lambda: True))
    assert decode_calls == []
    result = runner.transcribe(_noise(1.0), language="en", temperature=0.0)
    assert result["language"] == "en"  # usable again after a cancellation


def test_model_is_not_reloaded(runner: SpeechRunner, monkeypatch: pytest.MonkeyPatch) -> None:
    module = importlib.import_module("mlx_whisper.transcribe")
    monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("reloaded"))
    module.ModelHolder.model = None  # someone else used the cache in between
    runner.transcribe(_noise(0.5), language="zh", temperature=0.0, beam_size=5)


def test_weights_dtype(tmp_path: Path) -> None:
    save_file({"w": np.zeros(4, np.float16), "i": np.zeros(2, np.int64)}, str(tmp_path / "f"))
    (tmp_path / "f").rename(tmp_path / "weights.safetensors")
    assert weights_dtype(tmp_path) == mx.float16


def test_missing_model_dir(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        SpeechRunner.load(tmp_path / "absent", "x")
