"""Silero VAD (v5/v6, 16 kHz) on MLX, and whisper-server's rules for turning its per-frame
speech probabilities into speech spans. Runs only on the speech worker's model thread.

The network sees the audio in 512-sample frames (32 ms), each with the 64 samples before it
as context: a magnitude STFT (a strided convolution), four convolutions that reduce the frame
to one 128-wide vector, one LSTM step carrying its state from frame to frame, and a sigmoid.
Everything but the LSTM is independent per frame, so all frames go through it as one batch;
only the LSTM steps run in sequence.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.audio import SAMPLE_RATE
from engine.speech.request import VadParams

FRAME = 512  # samples per probability at 16 kHz
CONTEXT = 64  # samples of the previous frame each frame sees
STFT_PAD = 64  # reflection padding on the right of each frame
CUTOFF = 129  # frequency bins of the STFT
HIDDEN = 128
WEIGHTS_FILE = "weights.safetensors"
EVAL_EVERY = 128  # LSTM steps per evaluation (keeps the lazy graph small)

# (name, stride) of the convolutions after the STFT; each pads one sample on both sides.
CONVS = (("conv1", 1), ("conv2", 2), ("conv3", 2), ("conv4", 1))


class SileroVad:
    """The 16 kHz network. Weights in MLX layout: convolutions (out, kernel, in)."""

    def __init__(self, weights: dict[str, mx.array]) -> None:
        self.w = weights

    @classmethod
    def load(cls, model_dir: Path) -> SileroVad:
        model_dir = Path(model_dir)
        path = model_dir / WEIGHTS_FILE
        if not path.is_file():
            raise FileNotFoundError(f"no Silero VAD weights at {path}")
        return cls({k: v.astype(mx.float32) for k, v in mx.load(str(path)).items()})

    def probabilities(self, audio: np.ndarray) -> np.ndarray:
        """Speech probability of each 512-sample frame (the last one zero-padded)."""
        if len(audio) == 0:
            return np.zeros(0, np.float32)
        frames = _frames(np.asarray(audio, np.float32))
        inputs = self._encode(mx.array(frames))
        hidden = self._lstm(inputs)
        logits = hidden @ self.w["final_conv.weight"][:, 0, :].T + self.w["final_conv.bias"]
        probs = mx.sigmoid(logits)[:, 0]
        return np.array(probs, dtype=np.float32)

    def _encode(self, frames: mx.array) -> mx.array:
        """(n, 576) frames with context -> (n, 128), all frames at once."""
        x = mx.concatenate([frames, frames[:, -STFT_PAD - 1 : -1][:, ::-1]], axis=1)
        spectrum = mx.conv1d(x[:, :, None], self.w["stft_conv.weight"], stride=128)
        real, imag = spectrum[..., :CUTOFF], spectrum[..., CUTOFF:]
        x = mx.sqrt(real * real + imag * imag)
        for name, stride in CONVS:
            x = mx.conv1d(x, self.w[f"{name}.weight"], stride=stride, padding=1)
            x = mx.maximum(x + self.w[f"{name}.bias"], 0)
        return x[:, 0, :]

    def _lstm(self, inputs: mx.array) -> mx.array:
        """One LSTM step per frame (PyTorch's gate order: input, forget, cell, output);
        returns relu(h) of every step."""
        w = self.w
        gates_in = inputs @ w["lstm_cell.weight_ih"].T + w["lstm_cell.bias_ih"]
        gates_in = gates_in + w["lstm_cell.bias_hh"]
        w_hh = w["lstm_cell.weight_hh"].T
        h = mx.zeros((1, HIDDEN))
        c = mx.zeros((1, HIDDEN))
        outputs = []
        for step in range(inputs.shape[0]):
            gates = gates_in[step : step + 1] + h @ w_hh
            i, f, g, o = mx.split(gates, 4, axis=1)
            c = mx.sigmoid(f) * c + mx.sigmoid(i) * mx.tanh(g)
            h = mx.sigmoid(o) * mx.tanh(c)
            outputs.append(h)
            if (step + 1) % EVAL_EVERY == 0:
                mx.eval(h, c, *outputs[-EVAL_EVERY:])
        return mx.maximum(mx.concatenate(outputs, axis=0), 0)


def _frames(audio: np.ndarray) -> np.ndarray:
    """(n, CONTEXT + FRAME): each frame after the CONTEXT samples before it (zeros at first)."""
    count = math.ceil(len(audio) / FRAME)
    padded = np.zeros(CONTEXT + count * FRAME, np.float32)
    padded[CONTEXT : CONTEXT + len(audio)] = audio
    starts = np.arange(count) * FRAME
    return padded[starts[:, None] + np.arange(CONTEXT + FRAME)]


# ---- probabilities to speech spans (whisper-server's parameters and defaults) --------------


MIN_SILENCE_AT_MAX_SPEECH_MS = 98  # a silence this long is where an over-long span may be cut


@dataclass
class _Tracker:
    """Silero's hysteresis over the frames: speech starts at `threshold`, ends after
    `min_silence` below `threshold - 0.15`; a span longer than `max_speech` is cut at its
    last long-enough silence (or where it is)."""

    params: VadParams
    spans: list[list[int]]
    start: int | None = None
    temp_end: int = 0
    prev_end: int = 0
    next_start: int = 0

    def _samples(self, ms: float) -> float:
        return SAMPLE_RATE * ms / 1000

    def feed(self, prob: float, at: int) -> None:
        p = self.params
        if prob >= p.threshold and self.temp_end:
            self.temp_end = 0
            if self.next_start < self.prev_end:
                self.next_start = at
        if prob >= p.threshold and self.start is None:
            self.start = at
            return
        if self.start is not None and at - self.start > self._max_speech():
            self._cut(at)
            if self.start is None:
                return
        if self.start is not None and prob < max(p.threshold - 0.15, 0.01):
            self._silence(at)

    def _max_speech(self) -> float:
        pad = 2 * self._samples(self.params.speech_pad_ms)
        return SAMPLE_RATE * self.params.max_speech_duration_s - FRAME - pad

    def _cut(self, at: int) -> None:
        assert self.start is not None
        if self.prev_end:
            self.spans.append([self.start, self.prev_end])
            self.start = None if self.next_start < self.prev_end else self.next_start
        else:
            self.spans.append([self.start, at])
            self.start = None
        self.prev_end = self.next_start = self.temp_end = 0

    def _silence(self, at: int) -> None:
        assert self.start is not None
        if not self.temp_end:
            self.temp_end = at
        silent = at - self.temp_end
        if silent > self._samples(MIN_SILENCE_AT_MAX_SPEECH_MS):
            self.prev_end = self.temp_end
        if silent < self._samples(self.params.min_silence_duration_ms):
            return
        if self.temp_end - self.start > self._samples(self.params.min_speech_duration_ms):
            self.spans.append([self.start, self.temp_end])
        self.start = None
        self.prev_end = self.next_start = self.temp_end = 0

    def finish(self, total: int) -> list[list[int]]:
        min_speech = self._samples(self.params.min_speech_duration_ms)
        if self.start is not None and total - self.start > min_speech:
            self.spans.append([self.start, total])
        return self.spans


def speech_spans(probs: np.ndarray, total: int, params: VadParams) -> list[tuple[int, int]]:
    """[start, end) sample spans of speech in audio of `total` samples, padded by
    `speech_pad_ms` (half the gap each where two spans are closer than twice that)."""
    tracker = _Tracker(params, [])
    for index, prob in enumerate(probs.tolist()):
        tracker.feed(prob, index * FRAME)
    spans = tracker.finish(total)
    pad = int(SAMPLE_RATE * params.speech_pad_ms / 1000)
    for index, span in enumerate(spans):
        if index == 0:
            span[0] = max(0, span[0] - pad)
        if index == len(spans) - 1:
            span[1] = min(total, span[1] + pad)
            continue
        after = spans[index + 1]
        gap = after[0] - span[1]
        share = gap // 2 if gap < 2 * pad else pad
        span[1] = min(total, span[1] + share)
        after[0] = max(0, after[0] - share)
    return [(int(a), int(b)) for a, b in spans]


def smoke_test(model_dir: Path) -> None:
    """Load as the speech service does and run one second of silence (`mlxd convert` runs it)."""
    probs = SileroVad.load(model_dir).probabilities(np.zeros(SAMPLE_RATE, np.float32))
    if probs.shape != (math.ceil(SAMPLE_RATE / FRAME),) or not np.all(np.isfinite(probs)):
        raise ValueError(f"smoke test: probabilities {probs!r}")


SILENCE_BETWEEN_S = 0.1  # zeros whisper-server puts between spliced spans


@dataclass(frozen=True)
class Splice:
    """The speech spans joined into one clip, as whisper-server feeds Whisper: each span but
    the last runs `samples_overlap` seconds past its end, with 0.1 s of silence between
    spans. `to_original` maps a time in the clip back to the uploaded audio."""

    audio: np.ndarray
    clip_starts: tuple[int, ...]  # sample where each piece starts in the clip
    starts: tuple[int, ...]  # ... and in the original audio
    lengths: tuple[int, ...]

    @classmethod
    def join(cls, audio: np.ndarray, spans: list[tuple[int, int]], overlap_s: float) -> Splice:
        overlap = int(overlap_s * SAMPLE_RATE)
        gap = np.zeros(int(SILENCE_BETWEEN_S * SAMPLE_RATE), np.float32)
        pieces: list[np.ndarray] = []
        clip_starts: list[int] = []
        at = 0
        for index, (start, end) in enumerate(spans):
            last = index == len(spans) - 1
            piece = audio[start : end if last else min(len(audio), end + overlap)]
            clip_starts.append(at)
            pieces += [piece] if last else [piece, gap]
            at += len(piece) + (0 if last else len(gap))
        joined = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
        lengths = tuple(len(p) for p in pieces[::2])
        return cls(joined, tuple(clip_starts), tuple(s for s, _ in spans), lengths)

    def to_original(self, seconds: float) -> float:
        at = seconds * SAMPLE_RATE
        index = max(0, int(np.searchsorted(self.clip_starts, at, side="right")) - 1)
        offset = at - self.clip_starts[index]
        if offset > self.lengths[index] and index + 1 < len(self.starts):
            past = offset - self.lengths[index]
            to_next = self.clip_starts[index + 1] - at
            if to_next < past:
                return self.starts[index + 1] / SAMPLE_RATE
            offset = self.lengths[index]
        return (self.starts[index] + max(0.0, min(offset, self.lengths[index]))) / SAMPLE_RATE

    def pieces(self, max_s: float) -> list[tuple[np.ndarray, int]]:
        """The clip cut where spans start into pieces of consecutive spans, each at most
        `max_s` seconds unless one span alone is longer: (samples, first sample in the clip).
        The batched path decodes them as independent pieces; `remap` maps its times back."""
        limit = max_s * SAMPLE_RATE
        cuts, previous = [0], 0
        for bound in [*self.clip_starts[1:], len(self.audio)]:
            if bound - cuts[-1] > limit and previous > cuts[-1]:
                cuts.append(previous)
            previous = bound
        ends = [*cuts[1:], len(self.audio)]
        return [(self.audio[a:b], a) for a, b in zip(cuts, ends, strict=True)]

    def remap(self, result: dict) -> dict:
        """A transcription of `audio` with its segment and word times in the original audio."""
        for segment in result.get("segments", []):
            for item in [segment, *segment.get("words", [])]:
                for key in ("start", "end"):
                    if key in item:
                        item[key] = round(self.to_original(item[key]), 3)
        return result


_LOADED: dict[Path, SileroVad] = {}  # model thread only


def detector(model_dir: Path) -> SileroVad:
    """The VAD at `model_dir`, loaded on first use and kept."""
    key = Path(model_dir).resolve()
    if key not in _LOADED:
        _LOADED[key] = SileroVad.load(key)
    return _LOADED[key]


def transcribe_speech(
    model_dir: Path,
    audio: np.ndarray,
    params: VadParams,
    transcribe: Callable[[np.ndarray], dict],
    language: str | None,
) -> dict:
    """Whisper (`transcribe`) on the speech in `audio` only, its times in `audio`'s timeline;
    audio without speech is an empty transcription at once."""
    splice = speech_splice(model_dir, audio, params)
    if splice is None:
        return {"text": "", "segments": [], "language": language or "en"}
    return splice.remap(transcribe(splice.audio))


def speech_splice(model_dir: Path, audio: np.ndarray, params: VadParams) -> Splice | None:
    """The speech in `audio` joined as whisper-server feeds Whisper; None without speech."""
    spans = _spans(model_dir, audio, params)
    return Splice.join(audio, spans, params.samples_overlap) if spans else None


def _spans(model_dir: Path, audio: np.ndarray, params: VadParams) -> list[tuple[int, int]]:
    return speech_spans(detector(model_dir).probabilities(audio), len(audio), params)
