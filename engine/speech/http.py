"""Speech-to-text service (port 8082): whisper.cpp's `POST /inference` and OpenAI's
`/v1/audio/transcriptions` and `/v1/audio/translations`.

Handlers parse the form (a large one in a thread), take the request's queue slot, decode the
audio (in a thread, within --stt-max-audio-seconds), queue one job and format its result;
the job (`transcribe_job`) runs on the model thread. Response shapes follow whisper-server
(json text lines, srt/vtt cues, verbose_json fields and order, 60-byte segment wrapping) and
OpenAI's audio API respectively. See README "Speech-to-text" for the field-by-field mapping.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request
from sanic.headers import parse_content_header
from sanic.request.form import parse_multipart_form

from engine.app import ServiceSpec, resolve_requested_model
from engine.audio import SAMPLE_RATE, AudioError, AudioTooLong, decode_audio, find_ffmpeg
from engine.config import Config
from engine.errors import ClientClosed, InvalidRequest
from engine.lifecycle import admitted, result, submit
from engine.speech import decode, metrics, openapi
from engine.speech.request import (
    Fields,
    Options,
    SttJob,
    clip,
    inference_options,
    openai_options,
    time_limit,
)
from engine.speech.response import openai_response, whisper_response
from engine.store import ModelInfo, ModelMissing, Store
from engine.validation import LARGE_BODY_BYTES

log = logging.getLogger("mlxd.stt")
bp = Blueprint("stt")


async def parse_form(request: Request) -> None:
    """Parse the multipart form once (Sanic caches it), a large one in a thread so that the
    event loop keeps answering meanwhile."""
    if len(request.body or b"") > LARGE_BODY_BYTES:
        await asyncio.get_running_loop().run_in_executor(None, read_form, request)
    else:
        read_form(request)


def read_form(request: Request) -> None:
    """Sanic logs a multipart form it cannot read (a field that is not UTF-8, an unknown
    charset) and hands out an empty one: here that is a 400 saying why."""
    media, parameters = parse_content_header(request.headers.get("content-type", ""))
    if media != "multipart/form-data" or request.parsed_form is not None:
        return
    boundary = str(parameters.get("boundary") or "").encode("utf-8", "replace")
    try:
        request.parsed_form, request.parsed_files = parse_multipart_form(request.body, boundary)
    except (UnicodeError, LookupError, ValueError) as exc:
        raise InvalidRequest(
            f"The multipart form could not be read: {exc}", code="invalid_form"
        ) from None


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
    limit = request.app.ctx.config.stt_max_audio_seconds
    loop = asyncio.get_running_loop()
    try:
        return await loop.run_in_executor(
            None,
            lambda: decode_audio(
                upload.body, filename=upload.name, ffmpeg=find_ffmpeg(), max_seconds=limit
            ),
        )
    except AudioTooLong as exc:
        raise InvalidRequest(
            f"{exc} (--stt-max-audio-seconds)",
            param="file",
            code="audio_too_long",
            status=413,
            extra={"audio_seconds": round(exc.seconds, 3), "max_audio_seconds": exc.limit_s},
        ) from None
    except AudioError as exc:
        raise InvalidRequest(str(exc), param="file", code="invalid_audio") from None


async def run_job(request: Request, payload: SttJob) -> dict:
    """Queue the job and wait; a client that goes away cancels it at the next window (499)."""
    job = submit(request, payload)
    try:
        return await result(request, job, "transcription")
    except ClientClosed:
        seconds = len(payload.audio) / SAMPLE_RATE
        log.info("stt: client disconnected; cancelling its %.1f s transcription (499)", seconds)
        raise


async def _prepare(request: Request) -> np.ndarray:
    """The decoded upload, once the request holds its queue slot (a full queue is a 503 before
    anything is decoded)."""
    resolve_requested_model(request, Fields(request).text("model") or None)
    with admitted(request):
        return await read_audio(request)


@bp.post("/inference")
async def inference(request: Request) -> HTTPResponse:
    await parse_form(request)
    fields = Fields(request)
    options, layout, (offset_ms, duration_ms) = inference_options(fields, request.app.ctx.config)
    audio = await _prepare(request)
    part = clip(audio, offset_ms, duration_ms)
    layout = replace(
        layout,
        offset_s=offset_ms / 1000,
        duration_s=len(audio) / SAMPLE_RATE,
        clip_s=len(part) / SAMPLE_RATE,
    )
    result = await _transcribe(request, part, options)
    return whisper_response(result, options, layout)


async def _transcribe(request: Request, audio: np.ndarray, options: Options) -> dict:
    if len(audio) == 0:  # offset_t past the end: nothing to transcribe, as whisper-server
        return {"text": "", "segments": [], "language": options.language or "en"}
    config = request.app.ctx.config
    vad_dir = _vad_model(config) if options.vad is not None else None
    limit = time_limit(config, len(audio) / SAMPLE_RATE)
    return await run_job(request, SttJob(audio, options, limit, vad_dir, config.stt_batch))


def _vad_model(config: Config) -> Path:
    """The VAD model's directory; not installed: a 400 naming the command that installs it."""
    try:
        return Store(config.home).resolve(config.stt_vad_model, "vad").path
    except ModelMissing as exc:
        raise InvalidRequest(
            f"vad needs the voice activity detector: {exc}", param="vad", code="vad_unavailable"
        ) from None


@bp.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> HTTPResponse:
    return await _openai(request, "transcribe")


@bp.post("/v1/audio/translations")
async def translations(request: Request) -> HTTPResponse:
    return await _openai(request, "translate")


async def _openai(request: Request, task: str) -> HTTPResponse:
    await parse_form(request)
    options, layout = openai_options(Fields(request), task, request.app.ctx.config)
    audio = await _prepare(request)
    seconds = len(audio) / SAMPLE_RATE
    layout = replace(layout, duration_s=seconds, clip_s=seconds)
    result = await _transcribe(request, audio, options)
    return openai_response(result, options, layout)


def load(model: ModelInfo, config: Config) -> Any:
    from engine.speech.runner import SpeechRunner

    return SpeechRunner.load(model.path, model.id)


SERVICE = ServiceSpec(
    name="stt",
    blueprint=bp,
    load=load,
    policy=decode.policy,
    metrics=metrics.observer,
    openapi=openapi.paths,
)
