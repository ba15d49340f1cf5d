"""Speech-to-text service (port 8082): whisper.cpp's `POST /inference` and OpenAI's
`/v1/audio/transcriptions` and `/v1/audio/translations`."""

from __future__ import annotations

import asyncio
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic.response import text as text_response

from conversions.store import ModelInfo
from engine.audio import AudioError, decode_audio, find_ffmpeg
from engine.config import Config
from engine.errors import InvalidRequest
from engine.scheduler import Job
from engine.server import ServiceSpec, resolve_requested_model

bp = Blueprint("stt")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TRUE_WORDS = ("true", "1", "yes", "on")
FALSE_WORDS = ("false", "0", "no", "off", "")


@dataclass(frozen=True)
class TranscribeRequest:
    audio: np.ndarray
    language: str | None
    task: str
    temperatures: tuple[float, ...]
    prompt: str | None
    word_timestamps: bool


def form_value(request: Request, name: str) -> str | None:
    value = request.form.get(name) if request.form else None
    return value.strip() if isinstance(value, str) else None


def form_float(request: Request, name: str, default: float, low: float, high: float) -> float:
    raw = form_value(request, name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise InvalidRequest(f"'{name}' must be a number, got {raw!r}", param=name) from None
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"'{name}' is {value}, outside [{low}, {high}]", param=name)
    return value


def form_bool(request: Request, name: str, default: bool = False) -> bool:
    raw = form_value(request, name)
    if raw is None:
        return default
    if raw.lower() in TRUE_WORDS:
        return True
    if raw.lower() in FALSE_WORDS:
        return False
    raise InvalidRequest(f"'{name}' must be true or false, got {raw!r}", param=name)


def _language(request: Request) -> str | None:
    raw = (form_value(request, "language") or "auto").lower()
    return None if raw in ("auto", "") else raw


def _temperatures(request: Request) -> tuple[float, ...]:
    start = form_float(request, "temperature", 0.0, 0.0, 1.0)
    step = form_float(request, "temperature_inc", 0.2, 0.0, 1.0)
    if step == 0:
        return (start,)
    count = int(round((1.0 - start) / step)) if start < 1.0 else 0
    return tuple(round(start + i * step, 4) for i in range(count + 1))


async def read_audio(request: Request) -> np.ndarray:
    if not request.files or "file" not in request.files:
        if "multipart/form-data" not in request.headers.get("content-type", ""):
            raise InvalidRequest(
                "Send the audio as multipart/form-data with a 'file' field",
                code="unsupported_media_type",
                status=415,
            )
        raise InvalidRequest("Missing required field 'file'", param="file", code="missing_field")
    upload = request.files.get("file")
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(
            None, lambda: decode_audio(upload.body, filename=upload.name, ffmpeg=find_ffmpeg())
        )
    except AudioError as exc:
        raise InvalidRequest(str(exc), param="file", code="invalid_audio") from None


async def _transcribe(request: Request, task: str) -> tuple[dict, TranscribeRequest]:
    resolve_requested_model(request, form_value(request, "model") or None)
    audio = await read_audio(request)
    translate = form_bool(request, "translate")
    params = TranscribeRequest(
        audio=audio,
        language=_language(request),
        task="translate" if translate or task == "translate" else "transcribe",
        temperatures=_temperatures(request),
        prompt=form_value(request, "prompt") or None,
        word_timestamps=False,
    )
    job = request.app.ctx.worker.submit("transcribe", params)
    return await job.result(), params


def _format(result: dict, params: TranscribeRequest, response_format: str) -> HTTPResponse:
    segments = result.get("segments", [])
    text = "".join(f"{seg['text']}\n" for seg in segments)
    if response_format == "text":
        return text_response(text, content_type="text/html; charset=utf-8")
    if response_format == "srt":
        return text_response(to_srt(segments), content_type="application/x-subrip")
    if response_format == "vtt":
        return text_response(to_vtt(segments), content_type="text/vtt")
    if response_format == "verbose_json":
        return json_response(verbose_json(result, params, text))
    return json_response({"text": text})


@bp.post("/inference")
async def inference(request: Request) -> HTTPResponse:
    response_format = (form_value(request, "response_format") or "json").lower()
    if response_format not in FORMATS:
        response_format = "json"  # whisper-server falls back to json
    result, params = await _transcribe(request, "transcribe")
    return _format(result, params, response_format)


@bp.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> HTTPResponse:
    return await _openai(request, "transcribe")


@bp.post("/v1/audio/translations")
async def translations(request: Request) -> HTTPResponse:
    return await _openai(request, "translate")


async def _openai(request: Request, task: str) -> HTTPResponse:
    response_format = (form_value(request, "response_format") or "json").lower()
    if response_format not in FORMATS:
        raise InvalidRequest(
            f"'response_format' must be one of {', '.join(FORMATS)}", param="response_format"
        )
    result, params = await _transcribe(request, task)
    if response_format == "json":
        return json_response({"text": result.get("text", "").strip()})
    return _format(result, params, response_format)


def _timestamp(seconds: float, separator: str) -> str:
    ms = int(round(max(seconds, 0.0) * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_srt(segments: list[dict]) -> str:
    cues = [
        f"{i}\n{_timestamp(s['start'], ',')} --> {_timestamp(s['end'], ',')}\n{s['text']}\n"
        for i, s in enumerate(segments, start=1)
    ]
    return "\n".join(cues) + ("\n" if cues else "")


def to_vtt(segments: list[dict]) -> str:
    cues = [
        f"{_timestamp(s['start'], '.')} --> {_timestamp(s['end'], '.')}\n{s['text']}\n"
        for s in segments
    ]
    return "WEBVTT\n\n" + "\n".join(cues)


def verbose_json(result: dict, params: TranscribeRequest, text: str) -> dict[str, Any]:
    code = result.get("language") or params.language or "en"
    name = result.get("language_name") or code
    return {
        "task": params.task,
        "language": name,
        "duration": round(len(params.audio) / 16000, 3),
        "text": text,
        "segments": [_segment(s) for s in result.get("segments", [])],
        "detected_language": name,
        "detected_language_probability": result.get("language_probability", 1.0),
        "language_probabilities": result.get("language_probabilities", {code: 1.0}),
    }


def _finite(value: Any, default: float = 0.0) -> float:
    """JSON has no NaN: mlx-whisper can report avg_logprob NaN for degenerate segments."""
    number = float(value) if isinstance(value, int | float) else default
    return number if math.isfinite(number) else default


def _segment(segment: dict) -> dict[str, Any]:
    return {
        "id": segment.get("id", 0),
        "text": segment["text"],
        "start": round(segment["start"], 3),
        "end": round(segment["end"], 3),
        "tokens": segment.get("tokens", []),
        "words": [
            {
                "word": w["word"],
                "start": w["start"],
                "end": w["end"],
                "t_dtw": -1,
                "probability": _finite(w.get("probability")),
            }
            for w in segment.get("words", [])
        ],
        "temperature": _finite(segment.get("temperature")),
        "avg_logprob": _finite(segment.get("avg_logprob")),
        "no_speech_prob": _finite(segment.get("no_speech_prob")),
    }


# ---- model-thread side -------------------------------------------------------------------


def transcribe_job(runner: Any, job: Job) -> dict:
    from mlx_whisper.tokenizer import LANGUAGES

    params: TranscribeRequest = job.payload
    result = runner.transcribe(
        params.audio,
        language=params.language,
        task=params.task,
        temperature=params.temperatures,
        initial_prompt=params.prompt,
        word_timestamps=params.word_timestamps,
        is_cancelled=lambda: job.cancelled,
    )
    result["language_name"] = LANGUAGES.get(result.get("language"), result.get("language"))
    return result


def load(model: ModelInfo, config: Config) -> Any:
    from engine.runners.speech import SpeechRunner

    return SpeechRunner.load(model.path, model.id)


SPEC = ServiceSpec(name="stt", blueprint=bp, load=load, handlers={"transcribe": transcribe_job})
