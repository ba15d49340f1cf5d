"""Silero VAD into the store: `mlxd convert vad FILE --as silero-vad` and `mlxd pull
silero-vad` (from the installed silero-vad package, offline) with the real weights; the
installed model computes what the source weights compute."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conversions.common import ConversionError
from conversions.silero import convert, read_weights, to_mlx_layout
from engine.audio import SAMPLE_RATE
from engine.speech.vad import SileroVad
from engine.store import Store
from engine.store.manifest import verify
from tests.real_weights import silero_vad_16k

ROOT = Path(__file__).resolve().parents[2]


def mlxd(home: Path, *args: str) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLXD_", "HF_"))}
    environment.update({"MLXD_HOME": str(home), "HF_ENDPOINT": "http://127.0.0.1:9"})
    command = [sys.executable, "-m", "engine", *args]
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )


def _probe() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = np.arange(2 * SAMPLE_RATE) / SAMPLE_RATE
    voiced = 0.4 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 4 * t))
    return np.concatenate([voiced, rng.normal(0, 0.02, SAMPLE_RATE)]).astype(np.float32)


@pytest.mark.parametrize("command", ["convert", "pull"])
def test_install_into_the_store(tmp_path: Path, command: str) -> None:
    source = silero_vad_16k()
    if command == "convert":
        result = mlxd(tmp_path, "convert", "vad", str(source), "--as", "silero-vad")
    else:
        result = mlxd(tmp_path, "pull", "silero-vad")
    assert result.returncode == 0, result.stderr
    info = Store(tmp_path).resolve("silero-vad")
    assert info.kind == "vad" and info.dtype == "float32"
    assert verify(info.path) == []
    expected = {k: mx.array(v) for k, v in to_mlx_layout(read_weights(source)).items()}
    audio = _probe()
    served = SileroVad.load(info.path).probabilities(audio)
    assert np.array_equal(served, SileroVad(expected).probabilities(audio))
    assert served.max() > 0.5 or served.min() < 0.5  # real probabilities, not a constant


def test_refuses_what_is_not_silero(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    bad = tmp_path / "other.safetensors"
    save_file({"conv1.weight": np.zeros((2, 2, 2), np.float32)}, str(bad))
    with pytest.raises(ConversionError, match="stft_conv.weight"):
        convert(bad, tmp_path / "out")
    with pytest.raises(ConversionError, match="not quantized"):
        convert(silero_vad_16k(), tmp_path / "out", quantization=8)
