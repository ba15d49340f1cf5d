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
import math
import os
import socket
import time
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic.response import text as text_response

from conversions.store import ModelInfo
from engine.audio import SAMPLE_RATE, AudioError, decode_audio, find_ffmpeg
from engine.config import Config
from engine.errors import ClientClosed, InvalidRequest, status_error
from engine.languages import language_code, language_name
from engine.scheduler import Cancelled, Job
from engine.server import ServiceSpec, resolve_requested_model

log = logging.getLogger("mlxd.stt")
bp = Blueprint("stt")

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off", "")
DEFAULT_MAX_LEN = 60  # whisper-server wraps segments at 60 bytes when max_len is 0
MIN_TIME_LIMIT_S = 60.0
LANGUAGE_PROB_FLOOR = 0.001  # whisper-server lists only languages above this
DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Options:
    """Decoding options of one request; a fresh instance per request, never shared."""

    language: str | None = None
    task: str = "transcribe"
    temperatures: tuple[float, ...] = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    prompt: str | None = None
    word_timestamps: bool = False
    no_timestamps: bool = False
    detect_only: bool = False
    language_probs: bool = False
    best_of: int | None = None
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True


@dataclass(frozen=True)
class SttJob:
    audio: np.ndarray  # the samples to transcribe (after offset_t/duration)
    options: Options
    time_limit_s: float | None


@dataclass(frozen=True)
class Layout:
    """How a result is laid out: whisper-server's wrapping and numbering, or OpenAI's."""

    response_format: str = "json"
    offset_s: float = 0.0
    duration_s: float = 0.0  # of the whole upload
    clip_s: float = 0.0  # of the part transcribed (offset_t, duration)
    max_len: int = 0  # 0: no wrapping
    split_on_word: bool = False
    offset_n: int = 0
    words: bool = False  # OpenAI: top-level "words"
    segments: bool = True  # OpenAI: "segments"


# ---- form fields ----------------------------------------------------------------------------


class Fields:
    """Typed access to multipart form fields; every malformed value is a 400 naming the field."""

    def __init__(self, request: Request) -> None:
        self._form = request.form or {}

    def text(self, name: str) -> str | None:
        value = self._form.get(name)
        return value.strip() if isinstance(value, str) else None

    def texts(self, name: str) -> list[str]:
        values = self._form.getlist(name) if hasattr(self._form, "getlist") else []
        return [v.strip() for v in values or [] if isinstance(v, str)]

    def number(self, name: str, default: float, low: float, high: float) -> float:
        raw = self.text(name)
        if raw is None or raw == "":
            return default
        try:
            value = float(raw)
        except ValueError:
            raise InvalidRequest(f"'{name}' must be a number, got {raw!r}", param=name) from None
        if not math.isfinite(value) or not low <= value <= high:
            raise InvalidRequest(f"'{name}' is {raw}, outside [{low:g}, {high:g}]", param=name)
        return value

    def integer(self, name: str, default: int, low: int, high: int = 2**31 - 1) -> int:
        value = self.number(name, default, low, high)
        if not float(value).is_integer():
            raise InvalidRequest(f"'{name}' must be a whole number, got {value}", param=name)
        return int(value)

    def flag(self, name: str, default: bool = False) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        if raw.lower() in TRUE_WORDS:
            return True
        if raw.lower() in FALSE_WORDS:
            return False
        raise InvalidRequest(f"'{name}' must be true or false, got {raw!r}", param=name)

    def language(self, default: str) -> str | None:
        raw = self.text("language")
        try:
            return language_code(default if raw is None or raw == "" else raw)
        except ValueError as exc:
            raise InvalidRequest(str(exc), param="language", code="unsupported_language") from None


def _fallback(start: float, step: float) -> tuple[float, ...]:
    """start, start+step, ... up to 1.0 (whisper-server's temperature ladder)."""
    if step <= 0:
        return (start,)
    count = int(math.floor((1.0 - start) / step + 1e-6))
    return tuple(round(start + i * step, 4) for i in range(count + 1))


# Fields whisper-server accepts that change nothing here (checked for type, then ignored):
# beam search (mlx-whisper 0.4.3 has none: greedy), word_thold, audio_ctx, diarization, VAD,
# suppress_nst (non-speech tokens are always suppressed), debug_mode.
_IGNORED_FLAGS = (
    "diarize",
    "tinydiarize",
    "debug_mode",
    "suppress_nst",
    "suppress_non_speech",
    "vad",
    "print_special",
    "print_progress",
)
_IGNORED_NUMBERS = (
    "word_thold",
    "vad_threshold",
    "vad_max_speech_duration_s",
    "vad_samples_overlap",
)
_IGNORED_INTEGERS = (
    "audio_ctx",
    "vad_min_speech_duration_ms",
    "vad_min_silence_duration_ms",
    "vad_speech_pad_ms",
)


def _check_ignored(fields: Fields) -> None:
    for name in _IGNORED_FLAGS:
        fields.flag(name)
    for name in _IGNORED_NUMBERS:
        fields.number(name, 0.0, -1e9, 1e9)
    for name in _IGNORED_INTEGERS:
        fields.integer(name, 0, -(2**31))
    fields.integer("beam_size", -1, -1, 64)


def inference_options(fields: Fields, config: Config) -> tuple[Options, Layout, tuple[int, int]]:
    """whisper-server's form: the options, the layout and the (offset_t, duration) in ms."""
    _check_ignored(fields)
    response_format = (fields.text("response_format") or "json").lower()
    if response_format not in FORMATS:
        response_format = "json"  # whisper-server answers json for any other value
    detect_only = fields.flag("detect_language")
    no_timestamps = fields.flag("no_timestamps")
    timing = fields.flag("token_timestamps", not no_timestamps) and not no_timestamps
    start = fields.number("temperature", 0.0, 0.0, 1.0)
    step = 0.0 if fields.flag("no_fallback") else fields.number("temperature_inc", 0.2, 0.0, 1.0)
    max_context = fields.integer("max_context", -1, -1)
    verbose = response_format == "verbose_json"
    options = Options(
        language=None if detect_only else fields.language(config.stt_language),
        task="translate" if fields.flag("translate") else "transcribe",
        temperatures=_fallback(start, step),
        prompt=fields.text("prompt") or None,
        word_timestamps=verbose or (timing and response_format in ("srt", "vtt")),
        no_timestamps=no_timestamps,
        detect_only=detect_only,
        language_probs=verbose and not fields.flag("no_language_probabilities"),
        best_of=fields.integer("best_of", 2, 1, 16),
        compression_ratio_threshold=fields.number("entropy_thold", 2.4, 0.0, 1e6),
        logprob_threshold=fields.number("logprob_thold", -1.0, -1e6, 1e6),
        no_speech_threshold=fields.number("no_speech_thold", 0.6, 0.0, 1.0),
        condition_on_previous_text=max_context != 0,
    )
    max_len = fields.integer("max_len", 0, 0) or DEFAULT_MAX_LEN
    layout = Layout(
        response_format=response_format,
        max_len=max_len if timing else 0,
        split_on_word=fields.flag("split_on_word"),
        offset_n=fields.integer("offset_n", 0, 0),
    )
    window = (fields.integer("offset_t", 0, 0), fields.integer("duration", 0, 0))
    return options, layout, window


OPENAI_GRANULARITIES = ("word", "segment")


def openai_options(fields: Fields, task: str) -> tuple[Options, Layout]:
    """OpenAI's audio form: temperature 0 means "fall back as needed", as there."""
    response_format = (fields.text("response_format") or "json").lower()
    if response_format not in FORMATS:
        raise InvalidRequest(
            f"'response_format' must be one of {', '.join(FORMATS)}, got {response_format!r}",
            param="response_format",
        )
    if fields.flag("stream"):
        raise InvalidRequest("Streaming transcriptions are not supported", param="stream")
    granularities = _granularities(fields)
    temperature = fields.number("temperature", 0.0, 0.0, 1.0)
    verbose = response_format == "verbose_json"
    options = Options(
        language=fields.language("auto"),
        task=task,
        temperatures=_fallback(0.0, 0.2) if temperature == 0 else (temperature,),
        prompt=fields.text("prompt") or None,
        word_timestamps=verbose and "word" in granularities,
    )
    layout = Layout(
        response_format=response_format,
        words=options.word_timestamps,
        segments=not granularities or "segment" in granularities,
    )
    return options, layout


def _granularities(fields: Fields) -> list[str]:
    values = fields.texts("timestamp_granularities[]") + fields.texts("timestamp_granularities")
    for value in values:
        if value not in OPENAI_GRANULARITIES:
            raise InvalidRequest(
                f"'timestamp_granularities[]' takes word and/or segment, got {value!r}",
                param="timestamp_granularities[]",
            )
    return values


# ---- audio and the job ----------------------------------------------------------------------


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


def _clip(audio: np.ndarray, offset_ms: int, duration_ms: int) -> np.ndarray:
    start = offset_ms * SAMPLE_RATE // 1000
    end = start + duration_ms * SAMPLE_RATE // 1000 if duration_ms > 0 else len(audio)
    return audio[start:end]


def time_limit(config: Config, seconds: float) -> float | None:
    """Model-thread time a request may take: scales with the audio, at least a minute."""
    factor = config.stt_time_limit_factor
    return max(MIN_TIME_LIMIT_S, factor * seconds) if factor > 0 else None


async def run_job(request: Request, payload: SttJob) -> dict:
    """Queue the job and wait. A client that goes away cancels it: the work stops at the next
    window and the request ends as a 499 (logged; nobody reads it)."""
    job = request.app.ctx.worker.submit("transcribe", payload)
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
    clip = _clip(audio, offset_ms, duration_ms)
    layout = replace(
        layout,
        offset_s=offset_ms / 1000,
        duration_s=len(audio) / SAMPLE_RATE,
        clip_s=len(clip) / SAMPLE_RATE,
    )
    result = await _transcribe(request, clip, options)
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


# ---- segments: offset, wrapping ---------------------------------------------------------------


def placed(segments: list[dict], offset_s: float, length_s: float) -> list[dict]:
    """Segments of a clip timed on the whole upload (offset_t), each time clamped into the
    clip: a hallucinating decoder can emit timestamps past the audio, or an end before a start.
    """
    end_s = offset_s + length_s

    def clamp(start: float, end: float) -> tuple[float, float]:
        start = min(max(start + offset_s, offset_s), end_s)
        return start, min(max(end + offset_s, start), end_s)

    out = []
    for seg in segments:
        words = []
        for word in seg.get("words", []):
            start, end = clamp(word["start"], word["end"])
            words.append({**word, "start": start, "end": end})
        start, end = clamp(seg["start"], seg["end"])
        out.append({**seg, "start": start, "end": end, "words": words})
    return out


def wrap(segment: dict, max_len: int, split_on_word: bool) -> list[dict]:
    """Split a segment whose text is over `max_len` UTF-8 bytes, as whisper-server does: a new
    segment starts at the token that would overflow (with split_on_word, only at a token that
    starts a word). Times of the cut come from the word timestamps."""
    pieces = segment.get("pieces") or [[segment["text"], segment.get("tokens", [])]]
    groups: list[list[list[Any]]] = [[]]
    used = 0
    for piece in pieces:
        size = len(piece[0].encode())
        if groups[-1] and used + size > max_len and (not split_on_word or piece[0][:1] == " "):
            groups.append([])
            used = 0
        groups[-1].append(piece)
        used += size
    if len(groups) == 1:
        return [segment]
    return _cut(segment, groups)


def _cut(segment: dict, groups: list[list[list[Any]]]) -> list[dict]:
    clock = _TextClock(segment)
    starts, offset = [], 0
    for group in groups:
        starts.append(offset)
        offset += sum(len(text) for text, _ in group)
    bounds = [segment["start"]] + [clock.at(s) for s in starts[1:]] + [segment["end"]]
    words = clock.words_by_start(starts)
    parts = []
    for i, group in enumerate(groups):
        text = "".join(t for t, _ in group)
        tokens = [tok for _, ids in group for tok in ids]
        part = {**segment, "text": text, "tokens": tokens, "pieces": group, "words": words[i]}
        parts.append({**part, "start": bounds[i], "end": max(bounds[i], bounds[i + 1])})
    return parts


class _TextClock:
    """Maps a character offset in a segment's text to a time, through its words' timings
    (interpolated inside a word); without words, linearly over the segment."""

    def __init__(self, segment: dict) -> None:
        self.segment = segment
        self.spans: list[tuple[int, int, dict]] = []
        offset = 0
        for word in segment.get("words", []):
            self.spans.append((offset, offset + len(word["word"]), word))
            offset += len(word["word"])
        self.length = max(len(segment["text"]), 1)

    def at(self, offset: int) -> float:
        for first, last, word in self.spans:
            if first <= offset < last:
                share = (offset - first) / max(last - first, 1)
                return word["start"] + share * (word["end"] - word["start"])
        start, end = self.segment["start"], self.segment["end"]
        return start + (end - start) * min(offset / self.length, 1.0)

    def words_by_start(self, starts: list[int]) -> list[list[dict]]:
        """Each word goes to the part its first character falls in."""
        parts: list[list[dict]] = [[] for _ in starts]
        for first, _, word in self.spans:
            index = max(i for i, s in enumerate(starts) if s <= first)
            parts[index].append(word)
        return parts


def laid_out(result: dict, layout: Layout) -> list[dict]:
    segments = placed(result.get("segments", []), layout.offset_s, layout.clip_s)
    if layout.max_len <= 0:
        return segments
    return [part for seg in segments for part in wrap(seg, layout.max_len, layout.split_on_word)]


# ---- whisper-server responses -----------------------------------------------------------------


def whisper_response(result: dict, options: Options, layout: Layout) -> HTTPResponse:
    segments = laid_out(result, layout)
    text = "".join(f"{seg['text']}\n" for seg in segments)
    kind = layout.response_format
    if kind == "text":
        return text_response(text, content_type="text/html; charset=utf-8")
    if kind == "srt":
        return text_response(to_srt(segments, layout.offset_n), content_type="application/x-subrip")
    if kind == "vtt":
        return text_response(to_vtt(segments), content_type="text/vtt")
    if kind == "verbose_json":
        return json_response(verbose_json(result, segments, options, layout, text))
    return json_response({"text": text})


def timestamp(seconds: float, separator: str = ".") -> str:
    """HH:MM:SS.mmm (srt: a comma), hours always shown, as whisper-server writes them."""
    ms = int(round(max(seconds, 0.0) * 1000))
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{separator}{ms:03d}"


def to_srt(segments: list[dict], first: int = 0, strip: bool = False) -> str:
    cues = []
    for i, seg in enumerate(segments, start=first + 1):
        text = seg["text"].strip() if strip else seg["text"]
        cues.append(f"{i}\n{timestamp(seg['start'], ',')} --> {timestamp(seg['end'], ',')}\n")
        cues.append(f"{text}\n\n")
    return "".join(cues)


def to_vtt(segments: list[dict], strip: bool = False) -> str:
    cues = ["WEBVTT\n\n"]
    for seg in segments:
        text = seg["text"].strip() if strip else seg["text"]
        cues.append(f"{timestamp(seg['start'])} --> {timestamp(seg['end'])}\n{text}\n\n")
    return "".join(cues)


def verbose_json(
    result: dict, segments: list[dict], options: Options, layout: Layout, text: str
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "task": options.task,
        "language": language_name(result.get("language")),
        "duration": round(layout.duration_s, 3),
        "text": text,
        "segments": [_whisper_segment(i, s, options) for i, s in enumerate(segments)],
    }
    probs = result.get("language_probs")
    if options.language_probs and probs:
        best = max(probs, key=probs.get)
        body["detected_language"] = language_name(best)
        body["detected_language_probability"] = _finite(probs[best])
        body["language_probabilities"] = {
            code: _finite(p) for code, p in probs.items() if p > LANGUAGE_PROB_FLOOR
        }
    return body


def _finite(value: Any, default: float = 0.0) -> float:
    """JSON has no NaN: mlx-whisper can report avg_logprob NaN for degenerate segments."""
    number = float(value) if isinstance(value, int | float) else default
    return number if math.isfinite(number) else default


def _whisper_segment(index: int, segment: dict, options: Options) -> dict[str, Any]:
    out: dict[str, Any] = {"id": index, "text": segment["text"]}
    if not options.no_timestamps:
        out["start"], out["end"] = round(segment["start"], 3), round(segment["end"], 3)
    pieces = segment.get("pieces")
    out["tokens"] = [t for _, ids in pieces for t in ids] if pieces else segment.get("tokens", [])
    out["words"] = [_whisper_word(w, options) for w in segment.get("words", [])]
    out["temperature"] = _finite(segment.get("temperature"))
    out["avg_logprob"] = _finite(segment.get("avg_logprob"))
    out["no_speech_prob"] = _finite(segment.get("no_speech_prob"))
    return out


def _whisper_word(word: dict, options: Options) -> dict[str, Any]:
    out: dict[str, Any] = {"word": word["word"]}
    if not options.no_timestamps:
        out |= {"start": round(word["start"], 3), "end": round(word["end"], 3), "t_dtw": -1}
    out["probability"] = _finite(word.get("probability"))
    return out


# ---- OpenAI responses -------------------------------------------------------------------------


def openai_response(result: dict, options: Options, layout: Layout) -> HTTPResponse:
    segments = laid_out(result, layout)
    text = result.get("text", "").strip()
    kind = layout.response_format
    if kind == "text":
        return text_response(text + "\n", content_type="text/plain; charset=utf-8")
    if kind == "srt":
        return text_response(to_srt(segments, strip=True), content_type="application/x-subrip")
    if kind == "vtt":
        return text_response(to_vtt(segments, strip=True), content_type="text/vtt")
    usage = {"type": "duration", "seconds": math.ceil(layout.duration_s)}
    if kind == "json":
        return json_response({"text": text, "usage": usage})
    body = _openai_verbose(result, segments, options, layout, text)
    return json_response(body | {"usage": usage})


def _openai_verbose(
    result: dict, segments: list[dict], options: Options, layout: Layout, text: str
) -> dict:
    body: dict[str, Any] = {
        "task": options.task,
        "language": language_name(result.get("language")),
        "duration": round(layout.duration_s, 3),
        "text": text,
    }
    if layout.segments:
        body["segments"] = [_openai_segment(s) for s in segments]
    if layout.words:
        body["words"] = [
            {"word": w["word"].strip(), "start": round(w["start"], 3), "end": round(w["end"], 3)}
            for s in segments
            for w in s.get("words", [])
        ]
    return body


def _openai_segment(segment: dict) -> dict[str, Any]:
    return {
        "id": segment.get("id", 0),
        "seek": segment.get("seek", 0),
        "start": round(segment["start"], 3),
        "end": round(segment["end"], 3),
        "text": segment["text"],
        "tokens": segment.get("tokens", []),
        "temperature": _finite(segment.get("temperature")),
        "avg_logprob": _finite(segment.get("avg_logprob")),
        "compression_ratio": _finite(segment.get("compression_ratio")),
        "no_speech_prob": _finite(segment.get("no_speech_prob")),
    }


# ---- model-thread side ------------------------------------------------------------------------


class _Deadline:
    """Runs between windows: stops a cancelled or over-time job, then lets queued jobs run
    (their time does not count against this job)."""

    def __init__(self, job: Job, limit_s: float | None) -> None:
        self.job = job
        self.started = time.monotonic()
        self.deadline = self.started + limit_s if limit_s else math.inf

    def tick(self) -> None:
        self.job.check()
        if time.monotonic() > self.deadline:
            raise status_error(504, "Transcription exceeded its time limit", "time_limit_exceeded")
        self.deadline += self.job.yield_to_queue()
        self.job.check()


def transcribe_job(runner: Any, job: Job) -> dict:
    request: SttJob = job.payload
    clock = _Deadline(job, request.time_limit_s)
    try:
        return _run(runner, request, clock)
    except Cancelled:
        elapsed = time.monotonic() - clock.started
        log.info("stt: transcription cancelled after %.1f s (client gone)", elapsed)
        raise


def _run(runner: Any, request: SttJob, clock: _Deadline) -> dict:
    options = request.options
    if options.detect_only:
        probs = runner.detect_language(request.audio, on_window=clock.tick)
        best = max(probs, key=probs.get)
        return {"text": "", "segments": [], "language": best, "language_probs": probs}
    extra: dict[str, Any] = {}
    if options.best_of is not None:
        extra["best_of"] = options.best_of
    if options.no_timestamps:
        extra["without_timestamps"] = True
    return runner.transcribe(
        request.audio,
        language=options.language,
        task=options.task,
        temperature=options.temperatures,
        initial_prompt=options.prompt,
        word_timestamps=options.word_timestamps,
        language_probs=options.language_probs,
        on_window=clock.tick,
        compression_ratio_threshold=options.compression_ratio_threshold,
        logprob_threshold=options.logprob_threshold,
        no_speech_threshold=options.no_speech_threshold,
        condition_on_previous_text=options.condition_on_previous_text,
        **extra,
    )


def load(model: ModelInfo, config: Config) -> Any:
    from engine.runners.speech import SpeechRunner

    return SpeechRunner.load(model.path, model.id)


SPEC = ServiceSpec(name="stt", blueprint=bp, load=load, handlers={"transcribe": transcribe_job})
