"""Speech-to-text service (port 8082): whisper.cpp's `POST /inference` and OpenAI's
`/v1/audio/transcriptions` and `/v1/audio/translations`.

Handlers parse the form, decode the audio (in a thread), queue one job and format its result;
the job (`transcribe_job`) runs on the model thread. Response shapes follow whisper-server
(json text lines, srt/vtt cues, verbose_json fields and order, 60-byte segment wrapping) and
OpenAI's audio API respectively. See README "Speech-to-text" for the field-by-field mapping.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from dataclasses import replace
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request

from engine.app import ServiceSpec, resolve_requested_model
from engine.audio import SAMPLE_RATE, AudioError, decode_audio, find_ffmpeg
from engine.config import Config
from engine.errors import ClientClosed, InvalidRequest
from engine.lifecycle import submit
from engine.speech import decode, metrics
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
from engine.store import ModelInfo

log = logging.getLogger("mlxd.stt")
bp = Blueprint("stt")

DISCONNECT_POLL_S = 0.25


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


async def run_job(request: Request, payload: SttJob) -> dict:
    """Queue the job and wait. A client that goes away cancels it: the work stops at the next
    window and the request ends as a 499 (logged; nobody reads it)."""
    job = submit(request, payload)
    try:
        while not (await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S))[0]:
            if peer_gone(request):
                break
        else:
            return job.future.result()
    except asyncio.CancelledError:
        pass
    job.cancel()
    seconds = len(payload.audio) / SAMPLE_RATE
    log.info("stt: client disconnected; cancelling its %.1f s transcription (499)", seconds)
    raise ClientClosed("Client closed the request", code="client_closed")


def peer_gone(request: Request) -> bool:
    """Has the client closed its connection? Sanic stops reading after a large body, so the
    closed socket goes unnoticed: peek at it (non-blocking; EOF reads as b"")."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as probe:
            return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


async def _prepare(request: Request) -> np.ndarray:
    request.app.ctx.worker.ensure_ready()
    resolve_requested_model(request, Fields(request).text("model") or None)
    return await read_audio(request)


@bp.post("/inference")
async def inference(request: Request) -> HTTPResponse:
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
    limit = time_limit(request.app.ctx.config, len(audio) / SAMPLE_RATE)
    return await run_job(request, SttJob(audio, options, limit))


@bp.post("/v1/audio/transcriptions")
async def transcriptions(request: Request) -> HTTPResponse:
    return await _openai(request, "transcribe")


@bp.post("/v1/audio/translations")
async def translations(request: Request) -> HTTPResponse:
    return await _openai(request, "translate")


async def _openai(request: Request, task: str) -> HTTPResponse:
    options, layout = openai_options(Fields(request), task)
    audio = await _prepare(request)
    seconds = len(audio) / SAMPLE_RATE
    layout = replace(layout, duration_s=seconds, clip_s=seconds)
    result = await _transcribe(request, audio, options)
    return openai_response(result, options, layout)


def load(model: ModelInfo, config: Config) -> Any:
    from engine.speech.runner import SpeechRunner

    return SpeechRunner.load(model.path, model.id)


SERVICE = ServiceSpec(
    name="stt", blueprint=bp, load=load, policy=decode.policy, metrics=metrics.observer
)
