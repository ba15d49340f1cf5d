"""WAV files built in memory for the audio tests: integer PCM of any width, and float32."""

from __future__ import annotations

import io
import struct
import wave

import numpy as np


def int_wav(samples: np.ndarray, rate: int, width: int = 2, channels: int = 1) -> bytes:
    """PCM WAV, `width` bytes a sample (8-bit WAV is unsigned), `samples` copied to each channel."""
    frames = np.repeat(np.clip(samples, -1, 1)[:, None], channels, axis=1)
    if width == 1:
        raw = np.round(frames * 127 + 128).astype(np.uint8).tobytes()
    else:
        scaled = np.round(frames * (2 ** (8 * width - 1) - 1)).astype("<i4")
        raw = scaled.view(np.uint8).reshape(-1, 4)[:, :width].tobytes()  # low bytes, LE
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(width)
        out.setframerate(rate)
        out.writeframes(raw)
    return buffer.getvalue()


def float_wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    """IEEE float32 WAV (format 3, with the fact chunk such files carry)."""
    data = np.repeat(samples[:, None], channels, axis=1).astype("<f4").tobytes()
    fmt = struct.pack("<HHIIHH", 3, channels, rate, rate * channels * 4, channels * 4, 32)
    body = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    body += b"fact" + struct.pack("<II", 4, len(samples))
    body += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body
