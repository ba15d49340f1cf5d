"""Audio parts of a chat request, event-loop side: parse, then decode off the loop.

An OpenAI ``input_audio`` part (``{"type": "input_audio", "input_audio": {"data": BASE64,
"format": "wav"}}``) becomes an `AudioRef` while the body is parsed and a ``{"type": "audio"}``
placeholder in the message; `decode_clips` turns the refs into `AudioClip` samples (16 kHz mono
float32, through the speech service's decoder, engine.audio) in the loop's executor. The model
thread checks each clip against the model's limit and runs its audio tower. No MLX here.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.audio import SAMPLE_RATE, AudioError, AudioTooLong, decode_audio, find_ffmpeg
from engine.errors import InvalidRequest
from engine.validation import wrong_type

AUDIO_FORMATS = ("wav", "mp3", "flac", "ogg")
AUDIO_PART = {"type": "audio"}  # what the chat template sees where a clip goes
# Longer clips are refused from their header, before decoding: twice the longest clip any
# audio tower here takes (Gemma's 30 s); the model thread then applies the model's own limit.
MAX_DECODE_SECONDS = 60.0


@dataclass(frozen=True)
class AudioRef:
    data: str  # base64, as sent
    format: str | None
    param: str  # where it sits in the body, for error messages


@dataclass(frozen=True, eq=False)
class AudioClip:
    """One decoded clip: what the model thread gets."""

    samples: np.ndarray  # float32, mono, 16 kHz
    param: str
    digest: str  # content hash: the prefix-cache key of the clip's soft tokens

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def parse_input_audio(part: dict[str, Any], where: str) -> AudioRef:
    """The ``input_audio`` object of a content part, checked; the bytes are decoded later."""
    audio = part.get("input_audio")
    if not isinstance(audio, dict):
        raise wrong_type(f"{where}.input_audio", "an object with 'data' and 'format'", audio)
    data, kind = audio.get("data"), audio.get("format")
    if not isinstance(data, str) or not data:
        raise wrong_type(f"{where}.input_audio.data", "a base64 string", data)
    if kind is not None and kind not in AUDIO_FORMATS:
        raise InvalidRequest(
            f"{where}.input_audio.format must be one of {', '.join(AUDIO_FORMATS)}; got {kind!r}",
            param=f"{where}.input_audio.format",
            code="unsupported_audio_format",
        )
    return AudioRef(data, kind, f"{where}.input_audio")


def decode_clip(ref: AudioRef) -> AudioClip:
    """Base64 to samples; a clear 400 naming the part when it is not audio we can decode."""
    _, comma, payload = ref.data.partition(",")
    text = payload if comma and ref.data.startswith("data:") else ref.data
    try:
        raw = base64.b64decode(text.strip(), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"{ref.param}.data is not base64: {exc}", param=ref.param) from None
    return clip_from_bytes(raw, ref.param)


def clip_from_bytes(raw: bytes, param: str) -> AudioClip:
    """An encoded file (WAV, MP3, FLAC, Ogg; other containers with ffmpeg) to a clip."""
    try:
        samples = decode_audio(raw, ffmpeg=find_ffmpeg(), max_seconds=MAX_DECODE_SECONDS)
    except AudioTooLong as exc:
        raise _too_long(param, exc.seconds, exc.limit_s) from None
    except AudioError as exc:
        raise InvalidRequest(f"{param}: {exc}", param=param, code="invalid_audio") from None
    digest = hashlib.sha256(samples.tobytes()).hexdigest()
    return AudioClip(samples, param, digest)


async def decode_clips(refs: list[AudioRef]) -> list[AudioClip]:
    """Decode each clip in the loop's executor, in order."""
    loop = asyncio.get_running_loop()
    return [await loop.run_in_executor(None, decode_clip, ref) for ref in refs]


def audio_too_long(clip: AudioClip, limit_s: float) -> InvalidRequest:
    return _too_long(clip.param, clip.seconds, limit_s)


def _too_long(param: str, seconds: float, limit_s: float) -> InvalidRequest:
    return InvalidRequest(
        f"{param} is {seconds:.1f} s of audio, longer than the {limit_s:g} s this "
        "model takes per clip: cut it or send it in parts",
        param=param,
        code="audio_too_long",
        extra={"audio_seconds": round(seconds, 3), "max_audio_seconds": limit_s},
    )


def audio_too_short(clip: AudioClip) -> InvalidRequest:
    return InvalidRequest(
        f"{clip.param} is {clip.seconds * 1000:.0f} ms of audio, too short to fill one of "
        "this model's audio tokens",
        param=clip.param,
        code="audio_too_short",
    )


def audio_not_supported(param: str | None, reason: str) -> InvalidRequest:
    return InvalidRequest(
        f"This model does not accept audio: {reason}", param=param, code="audio_not_supported"
    )
