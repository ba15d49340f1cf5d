"""Parse and validate the speech forms: whisper-server's `/inference` fields and OpenAI's audio
form, into decoding `Options` and an output `Layout` (event-loop side; no MLX)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sanic import Request

from engine.audio import SAMPLE_RATE
from engine.config import Config
from engine.errors import InvalidRequest
from engine.languages import language_code

FORMATS = ("json", "text", "srt", "vtt", "verbose_json")
TRUE_WORDS = ("true", "1", "yes", "y", "on")
FALSE_WORDS = ("false", "0", "no", "n", "off", "")
DEFAULT_MAX_LEN = 60  # whisper-server wraps segments at 60 bytes when max_len is 0
MIN_TIME_LIMIT_S = 60.0
MAX_CANDIDATES = 16  # beam_size and best_of: candidates decoded together for one window


@dataclass(frozen=True)
class VadParams:
    """whisper-server's VAD parameters and defaults (engine.speech.vad applies them)."""

    threshold: float = 0.5
    min_speech_duration_ms: int = 250
    min_silence_duration_ms: int = 100
    max_speech_duration_s: float = math.inf
    speech_pad_ms: int = 30
    samples_overlap: float = 0.1  # seconds of audio kept after each span when splicing


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
    beam_size: int = -1  # > 1: beam search at temperature 0 (whisper-server); else greedy
    entropy_threshold: float | None = None  # whisper.cpp's repetition check (engine.speech.guards)
    compression_ratio_threshold: float | None = 2.4
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6
    condition_on_previous_text: bool = True
    vad: VadParams | None = None  # None: the whole audio reaches Whisper


@dataclass(frozen=True)
class SttJob:
    audio: np.ndarray  # the samples to transcribe (after offset_t/duration)
    options: Options
    time_limit_s: float | None
    vad_dir: Path | None = None  # the VAD model, when options.vad is set
    batch: int = 1  # --stt-batch: windows decoded together when they are independent


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


MIN_TEMPERATURE_INC = 0.01  # at most 101 temperatures to fall back through


def _temperature_step(fields: Fields) -> float:
    """`temperature_inc`: 0 (no fallback) or a step that makes a ladder of bounded length."""
    step = fields.number("temperature_inc", 0.2, 0.0, 1.0)
    if 0 < step < MIN_TEMPERATURE_INC:
        raise InvalidRequest(
            f"'temperature_inc' is {step:g}: use 0 (no fallback) or at least {MIN_TEMPERATURE_INC}",
            param="temperature_inc",
        )
    return step


def _fallback(start: float, step: float) -> tuple[float, ...]:
    """start, start+step, ... up to 1.0 (whisper-server's temperature ladder)."""
    if step <= 0:
        return (start,)
    count = int(math.floor((1.0 - start) / step + 1e-6))
    return tuple(round(start + i * step, 4) for i in range(count + 1))


# Fields whisper-server accepts that change nothing here (checked for type, then ignored):
# word_thold, audio_ctx, diarization, suppress_nst (non-speech tokens are always suppressed),
# debug_mode.
_IGNORED_FLAGS = (
    "diarize",
    "tinydiarize",
    "debug_mode",
    "suppress_nst",
    "suppress_non_speech",
    "print_special",
    "print_progress",
)
_IGNORED_NUMBERS = ("word_thold",)
_IGNORED_INTEGERS = ("audio_ctx",)


def _check_ignored(fields: Fields) -> None:
    for name in _IGNORED_FLAGS:
        fields.flag(name)
    for name in _IGNORED_NUMBERS:
        fields.number(name, 0.0, -1e9, 1e9)
    for name in _IGNORED_INTEGERS:
        fields.integer(name, 0, -(2**31))


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
    step = 0.0 if fields.flag("no_fallback") else _temperature_step(fields)
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
        best_of=fields.integer("best_of", 2, 1, MAX_CANDIDATES),
        beam_size=fields.integer("beam_size", -1, -1, MAX_CANDIDATES),
        # whisper.cpp's entropy check replaces openai-whisper's compression ratio here.
        entropy_threshold=fields.number("entropy_thold", 2.4, 0.0, 1e6),
        compression_ratio_threshold=None,
        logprob_threshold=fields.number("logprob_thold", -1.0, -1e6, 1e6),
        no_speech_threshold=fields.number("no_speech_thold", 0.6, 0.0, 1.0),
        condition_on_previous_text=max_context != 0,
        vad=vad_params(fields, config),
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


def vad_params(fields: Fields, config: Config) -> VadParams | None:
    """whisper-server's VAD fields (its defaults); None unless `vad` (or --stt-vad) is on."""
    if not fields.flag("vad", config.stt_vad):
        return None
    defaults = VadParams()
    max_speech = fields.number("vad_max_speech_duration_s", math.inf, 0.0, math.inf)
    return VadParams(
        threshold=fields.number("vad_threshold", defaults.threshold, 0.0, 1.0),
        min_speech_duration_ms=fields.integer(
            "vad_min_speech_duration_ms", defaults.min_speech_duration_ms, 0
        ),
        min_silence_duration_ms=fields.integer(
            "vad_min_silence_duration_ms", defaults.min_silence_duration_ms, 0
        ),
        max_speech_duration_s=max_speech if max_speech > 0 else math.inf,
        speech_pad_ms=fields.integer("vad_speech_pad_ms", defaults.speech_pad_ms, 0),
        samples_overlap=fields.number("vad_samples_overlap", defaults.samples_overlap, 0.0, 10.0),
    )


OPENAI_GRANULARITIES = ("word", "segment")


def openai_options(
    fields: Fields, task: str, config: Config | None = None
) -> tuple[Options, Layout]:
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
        vad=vad_params(fields, config or Config()),
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


def clip(audio: np.ndarray, offset_ms: int, duration_ms: int) -> np.ndarray:
    start = offset_ms * SAMPLE_RATE // 1000
    end = start + duration_ms * SAMPLE_RATE // 1000 if duration_ms > 0 else len(audio)
    return audio[start:end]


def time_limit(config: Config, seconds: float) -> float | None:
    """Model-thread time a request may take: scales with the audio, at least a minute."""
    factor = config.stt_time_limit_factor
    return max(MIN_TIME_LIMIT_S, factor * seconds) if factor > 0 else None
