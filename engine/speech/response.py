"""Speech results on the wire: segments placed on the upload's timeline and wrapped as
whisper-server does, and the json/text/srt/vtt/verbose_json bodies of whisper-server and OpenAI."""

from __future__ import annotations

import math
from typing import Any

from sanic import HTTPResponse
from sanic.response import json as json_response
from sanic.response import text as text_response

from engine.languages import language_name
from engine.speech.request import Layout, Options

LANGUAGE_PROB_FLOOR = 0.001  # whisper-server lists only languages above this


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
