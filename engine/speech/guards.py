"""Hallucination guards of the speech service (no MLX): the temperature fallback ladder, the
entropy check and the suppression of a segment that repeats the previous one.

The ladder follows whisper.cpp's `whisper_full_with_state`: each 30 s window is decoded at the
first temperature; a decode that failed goes to the next one, and the last is kept whatever it
gives. A decode fails when

- its tokens look like a repetition loop: more than 32 tokens whose last 32 have an entropy
  under `entropy_threshold` (whisper.cpp's `entropy_thold`); a silent window does not excuse it;
- or, unless the window is silent (no-speech probability over `no_speech_threshold`), it is
  improbable (average log probability under `logprob_threshold`) or, when a
  `compression_ratio_threshold` is set (openai-whisper's check: /v1/audio/transcriptions keeps
  it; /inference uses the entropy check instead, as whisper.cpp), its text gzips too well.

A window whose no-speech probability is over `no_speech_threshold` and whose average log
probability is under `logprob_threshold` is then dropped (mlx-whisper's transcribe loop applies
that rule, the same as whisper.cpp's).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ENTROPY_TOKENS = 32  # whisper.cpp: the entropy of the last 32 tokens, checked past 32 tokens
DEFAULT_ENTROPY_THRESHOLD = 2.4


def token_entropy(tokens: Sequence[int], last: int = ENTROPY_TOKENS) -> float:
    """Entropy (nats) of the histogram of the last `last` tokens."""
    window = list(tokens)[-last:]
    if not window:
        return 0.0
    counts = Counter(window).values()
    return -sum(c / len(window) * math.log(c / len(window)) for c in counts)


def entropy_failed(tokens: Sequence[int], threshold: float | None) -> bool:
    """whisper.cpp's repetition check: over 32 tokens and their tail's entropy under threshold."""
    if threshold is None or len(tokens) <= ENTROPY_TOKENS:
        return False
    return token_entropy(tokens) < threshold


@dataclass(frozen=True)
class Ladder:
    """How one window is decoded: temperatures tried in turn, candidates per rung, checks."""

    temperatures: tuple[float, ...] = (0.0,)
    beam_size: int = 1  # > 1: beam search at temperature 0; otherwise greedy
    best_of: int = 1  # candidates sampled at each temperature above 0, the best one kept
    entropy_threshold: float | None = None
    compression_ratio_threshold: float | None = None
    logprob_threshold: float | None = -1.0
    no_speech_threshold: float | None = 0.6

    def width(self, temperature: float) -> int:
        """Candidates decoded together at this temperature (whisper.cpp's n_decoders_cur)."""
        return max(1, self.beam_size if temperature == 0 else self.best_of)

    def needs_fallback(self, result: Any, *, repetitive: bool) -> bool:
        """Whether a rung's result (a DecodingResult) failed; `repetitive`: the entropy check
        rejected it (every candidate, when several were decoded)."""
        if repetitive:
            return True
        silent = (
            self.no_speech_threshold is not None
            and result.no_speech_prob > self.no_speech_threshold
        )
        improbable = (
            self.logprob_threshold is not None and result.avg_logprob < self.logprob_threshold
        )
        compressible = (
            self.compression_ratio_threshold is not None
            and result.compression_ratio > self.compression_ratio_threshold
        )
        return (improbable or compressible) and not silent


def _comparable(text: str) -> str:
    """Text as compared for repetition: case, punctuation and spacing ignored."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())


def drop_repeated_segments(result: dict) -> dict:
    """Remove each segment whose text repeats the previous kept segment's (a repetition loop,
    e.g. "Thank you." over and over). The result's text is rebuilt when anything was dropped."""
    kept: list[dict] = []
    for segment in result.get("segments", []):
        text = _comparable(segment.get("text", ""))
        if kept and text and text == _comparable(kept[-1].get("text", "")):
            continue
        kept.append(segment)
    if len(kept) == len(result.get("segments", [])):
        return result
    for index, segment in enumerate(kept):
        segment["id"] = index
    return {**result, "segments": kept, "text": "".join(s.get("text", "") for s in kept)}
