"""The speech port's routes in its OpenAPI document (`GET /openapi.json`): the multipart forms
`request` reads and the formats `response` writes."""

from __future__ import annotations

from engine.openapi import JSON, Paths, Schema, multipart_body, work
from engine.speech.request import FORMATS

FILE: Schema = {"type": "string", "contentMediaType": "application/octet-stream"}
FLAG: Schema = {"enum": ["true", "false", "1", "0"]}
NUMBER: Schema = {"type": "number"}
INTEGER: Schema = {"type": "integer", "minimum": 0, "maximum": 2**31 - 1}
VAD_FIELDS: dict[str, Schema] = {
    "vad": FLAG,
    "vad_threshold": {"type": "number", "minimum": 0, "maximum": 1},
    "vad_min_speech_duration_ms": INTEGER,
    "vad_min_silence_duration_ms": INTEGER,
    "vad_max_speech_duration_s": {"type": "number", "minimum": 0},
    "vad_speech_pad_ms": INTEGER,
    "vad_samples_overlap": {"type": "number", "minimum": 0, "maximum": 10},
}
INFERENCE_FORM: Schema = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": FILE,
        "response_format": {"enum": list(FORMATS), "description": "Any other value: json"},
        "language": {"type": "string", "description": "A code, a name or auto"},
        "translate": FLAG,
        "detect_language": FLAG,
        "no_timestamps": FLAG,
        "token_timestamps": FLAG,
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "temperature_inc": {
            "description": "0: no fallback",
            "anyOf": [{"const": 0}, {"type": "number", "minimum": 0.01, "maximum": 1}],
        },
        "no_fallback": FLAG,
        "prompt": {"type": "string"},
        "best_of": {"type": "integer", "minimum": 1, "maximum": 16},
        "beam_size": {"type": "integer", "minimum": -1, "maximum": 64},
        "max_context": {"type": "integer", "minimum": -1, "maximum": 2**31 - 1},
        "max_len": INTEGER,
        "split_on_word": FLAG,
        "offset_t": INTEGER,
        "offset_n": INTEGER,
        "duration": INTEGER,
        "entropy_thold": {"type": "number", "minimum": 0, "maximum": 1e6},
        "logprob_thold": {"type": "number", "minimum": -1e6, "maximum": 1e6},
        "no_speech_thold": {"type": "number", "minimum": 0, "maximum": 1},
        "no_language_probabilities": FLAG,
        "model": {"type": "string"},
        "keep_alive": {"type": "string"},
        **VAD_FIELDS,
    },
}
OPENAI_FORM: Schema = {
    "type": "object",
    "required": ["file"],
    "properties": {
        "file": FILE,
        "model": {"type": "string"},
        "response_format": {"enum": list(FORMATS)},
        "language": {"type": "string"},
        "prompt": {"type": "string"},
        "temperature": {"type": "number", "minimum": 0, "maximum": 1},
        "timestamp_granularities[]": {
            "type": "array",
            "items": {"enum": ["word", "segment"]},
        },
        "stream": {"const": "false"},
        "keep_alive": {"type": "string"},
        **VAD_FIELDS,
    },
}
TRANSCRIPT: Schema = {
    "type": "object",
    "required": ["text"],
    "properties": {"text": {"type": "string"}},
}
TEXT: Schema = {"type": "string"}


def _formats(plain_text: str) -> dict[str, Schema]:
    """JSON (json, verbose_json), text, srt and vtt answers."""
    return {
        JSON: TRANSCRIPT,
        plain_text: TEXT,
        "application/x-subrip": TEXT,
        "text/vtt": TEXT,
    }


def paths() -> Paths:
    errors = {"413": "The body, or the audio (--stt-max-audio-seconds), is too long"}
    inference = work(
        "whisper.cpp's transcription",
        _formats("text/html"),
        multipart_body(INFERENCE_FORM),
        errors=errors,
    )

    def openai(summary: str) -> dict:
        return work(summary, _formats("text/plain"), multipart_body(OPENAI_FORM), errors=errors)

    return {
        "/inference": {"post": inference},
        "/v1/audio/transcriptions": {"post": openai("OpenAI transcription")},
        "/v1/audio/translations": {"post": openai("OpenAI translation into English")},
    }
