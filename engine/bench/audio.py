"""Test audio for the speech benchmark: espeak-ng's speech when it is installed, else a tone
with noise, cut or repeated to the length asked for."""

from __future__ import annotations

import functools
import io
import shutil
import subprocess
import tempfile
import wave
from pathlib import Path

import numpy as np

RATE = 16000
TEXT = (
    "The quick brown fox jumps over the lazy dog. A local engine serves chat, embeddings and "
    "speech to text from one laptop, and this sentence is here to be transcribed again and again."
)


def speech_wav(seconds: float) -> tuple[bytes, str]:
    """A 16-bit mono WAV of `seconds`, and what it holds ("espeak-ng" or "tone")."""
    spoken = _espeak()
    samples, rate, source = (*spoken, "espeak-ng") if spoken else (*_tone(), "tone")
    count = int(seconds * rate)
    tiled = np.resize(samples, count)  # repeats the clip as often as needed
    return _wav(tiled, rate), source


@functools.cache
def _espeak() -> tuple[np.ndarray, int] | None:
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "speech.wav"
        done = subprocess.run(
            [espeak, "-w", str(path), TEXT], capture_output=True, timeout=60, check=False
        )
        if done.returncode != 0 or not path.exists():
            return None
        with wave.open(str(path)) as clip:
            raw = clip.readframes(clip.getnframes())
            return np.frombuffer(raw, "<i2").astype(np.float32) / 32768, clip.getframerate()


def _tone() -> tuple[np.ndarray, int]:
    t = np.arange(RATE * 3) / RATE
    noise = np.random.default_rng(0).standard_normal(len(t))
    return (0.3 * np.sin(2 * np.pi * 220 * t) + 0.05 * noise).astype(np.float32), RATE


def _wav(samples: np.ndarray, rate: int) -> bytes:
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return buffer.getvalue()
