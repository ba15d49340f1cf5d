"""Long audio decoded in batches. Runs only on the speech worker's model thread.

The audio comes as independent pieces (VAD speech spans, or one file cut at its quietest
moments, `split_pieces`). Each piece runs Whisper's own window loop (decode 30 s, move to the
last timestamp, skip windows without speech) without conditioning on its previous text, so its
windows depend only on its own audio. The current window of every piece in flight is a row:
each row is encoded once, then all rows go through one greedy decoder together, one token step
for every row at a time, each row keeping its cross-attention keys and values from its first
step. A row leaves the batch at its end-of-text. Rows whose text fails the compression-ratio or
log-probability checks are decoded again at the next temperature, batched among themselves.

Whisper's logit rules (blank and non-speech suppression, timestamp pairing, the first
timestamp at most 1 s, timestamps over text when they are likelier) are applied per row as
mlx-whisper 0.4.3 applies them to one window, so a piece decoded here gives the tokens that
`mlx_whisper.transcribe(piece, condition_on_previous_text=False)` gives. Sampling above
temperature 0 draws from a random stream seeded by the row's place in the audio, so a row
draws the same tokens whatever else is in its batch.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map
from mlx_whisper.decoding import compression_ratio

from engine.audio import SAMPLE_RATE
from engine.speech.beam import sequence_score
from engine.speech.guards import Ladder, entropy_failed
from engine.speech.text_decoder import cross_kv, forward

HOP = 160  # samples per mel frame
FRAMES = 3000  # mel frames in a 30 s window
WINDOW_SAMPLES = FRAMES * HOP
FRAMES_PER_SECOND = SAMPLE_RATE // HOP
MAX_PIECE_S = 28.0  # a longer piece is cut while the batch has room (slack for the quiet cut)
QUIET_STEP = SAMPLE_RATE // 10  # the cut lands in the quietest 0.1 s ...
QUIET_SEARCH_S = 2.0  # ... within this far of the piece's middle
MAX_INITIAL_TIMESTAMP_S = 1.0

Piece = tuple[np.ndarray, int]  # samples, and where they start in the original audio


@dataclass(frozen=True)
class Decoding:
    """The decoding settings every row of a request shares; `ladder` is the sequential path's
    temperature fallback and its checks (engine.speech.guards), greedy (no beam search)."""

    language: str | None
    task: str = "transcribe"
    initial_prompt: str | None = None
    word_timestamps: bool = False
    without_timestamps: bool = False
    ladder: Ladder = field(default_factory=Ladder)


# ---- cutting the audio into pieces ----------------------------------------------------------


def split_pieces(pieces: Sequence[Piece], batch: int) -> list[Piece]:
    """Cut the longest piece at its quietest 0.1 s near its middle, while there are fewer
    pieces than `batch` and the longest is over MAX_PIECE_S, so the batch has rows to fill."""
    out = [(np.asarray(audio, np.float32), start) for audio, start in pieces]
    while len(out) < batch:
        longest = max(range(len(out)), key=lambda i: len(out[i][0]), default=None)
        if longest is None or len(out[longest][0]) <= MAX_PIECE_S * SAMPLE_RATE:
            break
        audio, start = out[longest]
        cut = quiet_point(audio)
        out[longest : longest + 1] = [(audio[:cut], start), (audio[cut:], start + cut)]
    return out


def quiet_point(audio: np.ndarray) -> int:
    """The middle of the quietest 0.1 s within QUIET_SEARCH_S of the middle of `audio`."""
    middle = len(audio) // 2
    reach = int(min(QUIET_SEARCH_S * SAMPLE_RATE, len(audio) / 8))
    lo = middle - reach
    steps = max(1, (2 * reach) // QUIET_STEP)
    frames = audio[lo : lo + steps * QUIET_STEP].reshape(steps, -1)
    quietest = int(np.argmin(np.mean(frames.astype(np.float64) ** 2, axis=1)))
    return lo + quietest * QUIET_STEP + QUIET_STEP // 2


# ---- Whisper's logit rules, per row ---------------------------------------------------------


class _Vocabulary:
    """The tokenizer's special tokens and the masks every row uses."""

    def __init__(self, model: Any, decoding: Decoding, language: str) -> None:
        from mlx_whisper.tokenizer import get_tokenizer

        self.tokenizer = tokenizer = get_tokenizer(
            model.is_multilingual,
            num_languages=model.num_languages,
            language=language,
            task=decoding.task,
        )
        self.language = language
        self.n_vocab = model.dims.n_vocab
        self.eot = tokenizer.eot
        self.timestamp_begin = tokenizer.timestamp_begin
        self.timestamps = not decoding.without_timestamps
        self.sot_sequence = tuple(
            tokenizer.sot_sequence
            if self.timestamps
            else tokenizer.sot_sequence_including_notimestamps
        )
        precision = 30 / model.dims.n_audio_ctx
        self.max_initial = round(MAX_INITIAL_TIMESTAMP_S / precision)
        self.suppress = self._mask(self._suppressed())
        self.blank = self._mask([*tokenizer.encode(" "), tokenizer.eot])
        prompt = decoding.initial_prompt
        self.prompt = tokenizer.encode(" " + prompt.strip()) if prompt else []
        self.sample_len = model.dims.n_text_ctx // 2
        self.n_ctx = model.dims.n_text_ctx

    def _mask(self, tokens: Sequence[int]) -> mx.array:
        mask = np.zeros(self.n_vocab, np.float32)
        mask[list(tokens)] = -np.inf
        return mx.array(mask)

    def _suppressed(self) -> list[int]:
        t = self.tokenizer
        tokens = [*t.non_speech_tokens, t.transcribe, t.translate, t.sot, t.sot_prev, t.sot_lm]
        if t.no_speech is not None:
            tokens.append(t.no_speech)
        return sorted(set(tokens))

    def prefix(self, prompt: bool) -> tuple[int, ...]:
        """The tokens a row starts from: the previous-text prompt (initial prompt) first."""
        if not (prompt and self.prompt):
            return self.sot_sequence
        head = self.prompt[-(self.n_ctx // 2 - 1) :]
        return (self.tokenizer.sot_prev, *head, *self.sot_sequence)

    def apply(self, logits: mx.array, sampled: list[list[int]], first: bool) -> mx.array:
        if first:
            logits = logits + self.blank
        logits = logits + self.suppress
        if not self.timestamps:
            return logits
        mask = mx.array(self._timestamp_mask(sampled, first))
        tb = self.timestamp_begin
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        timestamp = mx.logsumexp(logprobs[:, tb:], axis=-1, keepdims=True)
        best_text = logprobs[:, :tb].max(axis=-1, keepdims=True)
        text_mask = mx.where(timestamp > best_text, -mx.inf, mask[:, :tb])
        return logits + mx.concatenate([text_mask, mask[:, tb:]], axis=1)

    def _timestamp_mask(self, sampled: list[list[int]], first: bool) -> np.ndarray:
        """Timestamps come in pairs (except right before end-of-text); the first token is a
        timestamp of at most 1 s. mlx-whisper 0.4.3's rule against decreasing timestamps masks
        an empty range (it compares positions with token ids), so it is left out here too."""
        tb, mask = self.timestamp_begin, np.zeros((len(sampled), self.n_vocab), np.float32)
        if self.tokenizer.no_timestamps is not None:
            mask[:, self.tokenizer.no_timestamps] = -np.inf
        for row, seq in enumerate(sampled):
            if seq and seq[-1] >= tb:
                if len(seq) < 2 or seq[-2] >= tb:
                    mask[row, tb:] = -np.inf
                else:
                    mask[row, : self.eot] = -np.inf
        if first:
            mask[:, :tb] = -np.inf
            mask[:, tb + self.max_initial + 1 :] = -np.inf
        return mask


# ---- the batched greedy decoder -------------------------------------------------------------


@dataclass
class _Row:
    """One window to decode: its encoder output, start tokens and random seed."""

    features: mx.array
    prefix: tuple[int, ...]
    seed: int


@dataclass
class Decoded:
    """One row's decode, as mlx-whisper's DecodingResult reports it."""

    tokens: list[int]
    sum_logprob: float
    no_speech_prob: float
    temperature: float
    text: str = ""
    avg_logprob: float = 0.0
    compression_ratio: float = 0.0


def decode_rows(
    model: Any, vocab: _Vocabulary, rows: list[_Row], temperature: float
) -> list[Decoded]:
    """Every row decoded, rows with the same start tokens in one batch."""
    out: list[Decoded | None] = [None] * len(rows)
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, row in enumerate(rows):
        groups.setdefault(row.prefix, []).append(index)
    for prefix, members in groups.items():
        features = mx.stack([rows[i].features for i in members])
        seeds = [rows[i].seed for i in members]
        for index, decoded in zip(
            members, _decode(model, vocab, features, prefix, temperature, seeds), strict=True
        ):
            out[index] = decoded
    return [d for d in out if d is not None]


def _decode(
    model: Any,
    vocab: _Vocabulary,
    features: mx.array,
    prefix: tuple[int, ...],
    temperature: float,
    seeds: list[int],
) -> list[Decoded]:
    count = features.shape[0]
    sampled: list[list[int]] = [[] for _ in range(count)]
    sums = [np.float32(0.0)] * count
    alive = list(range(count))
    inputs = mx.array([prefix] * count)
    cache = _Cache.of(model, features)
    no_speech = [float("nan")] * count
    for step in range(vocab.sample_len):
        if step and len(prefix) + step > vocab.n_ctx:
            break
        logits = _forward(model, inputs, cache).astype(mx.float32)
        if step == 0:
            no_speech = _no_speech(vocab, logits, prefix)
        last = vocab.apply(logits[:, -1], [sampled[i] for i in alive], step == 0)
        tokens, logprobs = _pick(last, temperature, [seeds[i] for i in alive], step)
        mx.eval(tokens, logprobs)
        keep = _record(vocab.eot, alive, tokens, logprobs, sampled, sums)
        if not keep:
            break
        if len(keep) < len(alive):
            index = mx.array(keep)
            cache.keep(index)
            tokens = tokens[index]
        alive = [alive[slot] for slot in keep]
        inputs = tokens[:, None]
    return [
        _result(vocab, seq, float(total), no_speech[row], temperature)
        for row, (seq, total) in enumerate(zip(sampled, sums, strict=True))
    ]


@dataclass
class _Cache:
    """Per decoder layer, as engine.speech.text_decoder's forward pass keeps it: the rows'
    self-attention keys and values so far (None before the first step), and their
    cross-attention keys and values, computed once from the encoder output in the layout the
    attention product reads, so no step re-reads the encoder output or re-lays it out."""

    entries: list[tuple[Any, tuple[mx.array, mx.array]]]

    @classmethod
    def of(cls, model: Any, features: mx.array) -> _Cache:
        cross = [cross_kv(block.cross_attn, features) for block in model.decoder.blocks]
        mx.eval(cross)
        return cls([(None, kv) for kv in cross])

    def keep(self, index: mx.array) -> None:
        """Only the rows at `index` go on (after a step: every layer has its own keys)."""
        self.entries = tree_map(lambda x: x[index], self.entries)


def _forward(model: Any, tokens: mx.array, cache: _Cache) -> mx.array:
    """mlx-whisper's TextDecoder on `tokens` after the cached ones; logits (B, L, vocab)."""
    logits, cache.entries, _ = forward(model.decoder, tokens, None, cache.entries)
    return logits


def _record(
    eot: int,
    alive: list[int],
    tokens: mx.array,
    logprobs: mx.array,
    sampled: list[list[int]],
    sums: list[np.float32],
) -> list[int]:
    """Each live row's new token and its log probability (summed in float32, as mlx-whisper
    sums them); the slots of the rows that go on."""
    keep = []
    for slot, (row, token, logprob) in enumerate(
        zip(alive, tokens.tolist(), logprobs.tolist(), strict=True)
    ):
        sampled[row].append(token)
        sums[row] = np.float32(sums[row] + np.float32(logprob))
        if token != eot:
            keep.append(slot)
    return keep


def _no_speech(vocab: _Vocabulary, logits: mx.array, prefix: tuple[int, ...]) -> list[float]:
    no_speech = vocab.tokenizer.no_speech
    if no_speech is None:
        return [float("nan")] * logits.shape[0]
    probs = mx.softmax(logits[:, prefix.index(vocab.tokenizer.sot)], axis=-1)
    return probs[:, no_speech].tolist()


def _pick(
    logits: mx.array, temperature: float, seeds: list[int], step: int
) -> tuple[mx.array, mx.array]:
    """The next token of each row and its log-probability."""
    if temperature == 0:
        tokens = logits.argmax(axis=-1)
    else:
        keys = [mx.random.key((seed * 1009 + step) % 2**32) for seed in seeds]
        noise = mx.stack([mx.random.gumbel((logits.shape[-1],), key=key) for key in keys])
        tokens = mx.argmax(logits / temperature + noise, axis=-1)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    return tokens, logprobs[mx.arange(logits.shape[0]), tokens]


def _result(
    vocab: _Vocabulary, sampled: list[int], total: float, no_speech: float, temperature: float
) -> Decoded:
    tokens = sampled[: sampled.index(vocab.eot)] if vocab.eot in sampled else sampled
    text = vocab.tokenizer.decode(tokens).strip()
    return Decoded(
        tokens=tokens,
        sum_logprob=total,
        no_speech_prob=no_speech,
        temperature=temperature,
        text=text,
        avg_logprob=total / (len(tokens) + 1),
        compression_ratio=compression_ratio(text),
    )


# ---- temperature fallback -------------------------------------------------------------------


def _failed(decoded: Decoded, ladder: Ladder) -> bool:
    repetitive = entropy_failed(decoded.tokens, ladder.entropy_threshold)
    return ladder.needs_fallback(decoded, repetitive=repetitive)


def decode_with_fallback(
    model: Any,
    vocab: _Vocabulary,
    rows: list[_Row],
    decoding: Decoding,
    on_window: Callable[[], None],
) -> list[Decoded]:
    """Each row at the first temperature; the rows that fail, again at the next one. Above
    temperature 0, `best_of` samples of a row, the best kept (engine.speech.beam's score)."""
    ladder = decoding.ladder
    results: list[Decoded | None] = [None] * len(rows)
    waiting = list(range(len(rows)))
    for step, temperature in enumerate(ladder.temperatures):
        if step:
            on_window()
        samples = ladder.width(temperature) if temperature > 0 else 1
        trials = [
            _Row(rows[i].features, rows[i].prefix, (rows[i].seed * 16 + step) * 16 + k)
            for i in waiting
            for k in range(samples)
        ]
        decoded = decode_rows(model, vocab, trials, temperature)
        for at, index in enumerate(waiting):
            results[index] = _best(decoded[at * samples : (at + 1) * samples], ladder)
        last = step == len(ladder.temperatures) - 1
        waiting = [i for i in waiting if not last and _failed(results[i], ladder)]  # type: ignore[arg-type]
        if not waiting:
            break
    return [r for r in results if r is not None]


def _best(samples: list[Decoded], ladder: Ladder) -> Decoded:
    """One candidate passing the entropy check if any does, the best scored among those."""

    def rank(d: Decoded) -> tuple[bool, float]:
        passes = not entropy_failed(d.tokens, ladder.entropy_threshold)
        return passes, sequence_score(d.sum_logprob, len(d.tokens))

    return max(samples, key=rank)


# ---- pieces and their windows ---------------------------------------------------------------


@dataclass
class _Window:
    mel: mx.array  # (FRAMES, n_mels), padded
    frames: int  # frames of audio in it
    seek: int  # its first frame in the piece


@dataclass
class _Piece:
    """One piece's window loop: where it is, and the segments so far (in piece time)."""

    start: int  # sample in the original audio
    mel: mx.array  # the piece's log-mel frames, 30 s of silence padded after
    frames: int
    seek: int = 0
    windows: int = 0
    segments: list[dict] = field(default_factory=list)
    last_speech: float = 0.0

    @classmethod
    def of(cls, model: Any, audio: np.ndarray, start: int, dtype: mx.Dtype) -> _Piece:
        from mlx_whisper.audio import log_mel_spectrogram

        mel = log_mel_spectrogram(audio, n_mels=model.dims.n_mels, padding=WINDOW_SAMPLES)
        return cls(start, mel.astype(dtype), mel.shape[0] - FRAMES)

    @property
    def done(self) -> bool:
        return self.seek >= self.frames

    def window(self) -> _Window:
        frames = min(FRAMES, self.frames - self.seek)
        mel = self.mel[self.seek : self.seek + frames]
        if frames < FRAMES:
            mel = mx.pad(mel, [(0, FRAMES - frames), (0, 0)])
        return _Window(mel, frames, self.seek)


def _silent(decoded: Decoded, ladder: Ladder) -> bool:
    """mlx_whisper.transcribe's no-speech skip."""
    if ladder.no_speech_threshold is None:
        return False
    if ladder.logprob_threshold is not None and decoded.avg_logprob > ladder.logprob_threshold:
        return False
    return decoded.no_speech_prob > ladder.no_speech_threshold


def _segments(
    vocab: _Vocabulary, window: _Window, decoded: Decoded
) -> tuple[list[dict], int, bool]:
    """The window's segments from its timestamp tokens (times in piece seconds), how many
    frames the piece moves on, and whether the window ended on a single timestamp."""
    tokens = np.array(decoded.tokens, dtype=np.int64)
    offset = window.seek * HOP / SAMPLE_RATE
    precision = 0.02
    is_time = tokens >= vocab.timestamp_begin
    single_end = is_time[-2:].tolist() == [False, True]
    cuts = (np.where(is_time[:-1] & is_time[1:])[0] + 1).tolist()
    if not cuts:
        times = tokens[is_time]
        duration = window.frames * HOP / SAMPLE_RATE
        if len(times) and times[-1] != vocab.timestamp_begin:
            duration = (int(times[-1]) - vocab.timestamp_begin) * precision
        segment = _segment(vocab, window, decoded, tokens, offset, offset + duration)
        return [segment], window.frames, single_end
    if single_end:
        cuts.append(len(tokens))
    segments, last = [], 0
    for cut in cuts:
        part = tokens[last:cut]
        start = offset + (int(part[0]) - vocab.timestamp_begin) * precision
        end = offset + (int(part[-1]) - vocab.timestamp_begin) * precision
        segments.append(_segment(vocab, window, decoded, part, start, end))
        last = cut
    if single_end:
        return segments, window.frames, True
    return segments, (int(tokens[last - 1]) - vocab.timestamp_begin) * 2, False


def _segment(
    vocab: _Vocabulary,
    window: _Window,
    decoded: Decoded,
    tokens: np.ndarray,
    start: float,
    end: float,
) -> dict:
    ids = tokens.tolist()
    return {
        "seek": window.seek,
        "start": start,
        "end": end,
        "text": vocab.tokenizer.decode([t for t in ids if t < vocab.eot]),
        "tokens": ids,
        "temperature": decoded.temperature,
        "avg_logprob": decoded.avg_logprob,
        "compression_ratio": decoded.compression_ratio,
        "no_speech_prob": decoded.no_speech_prob,
    }


class _Aligner:
    """The model as mlx_whisper.timing sees it, with this window's encoder output reused."""

    def __init__(self, model: Any, features: mx.array) -> None:
        self._model = model
        self._features = features
        self.dims = model.dims
        self.alignment_heads = model.alignment_heads

    def forward_with_cross_qk(self, mel: mx.array, tokens: mx.array) -> Any:
        logits, _, cross_qk = self._model.decoder(tokens, self._features[None])
        return logits, cross_qk


def _advance(
    model: Any,
    vocab: _Vocabulary,
    piece: _Piece,
    window: _Window,
    features: mx.array,
    decoded: Decoded,
    decoding: Decoding,
) -> None:
    """mlx_whisper.transcribe's step after one window, for one piece."""
    piece.windows += 1
    if _silent(decoded, decoding.ladder):
        piece.seek += window.frames
        return
    segments, moved, single_end = _segments(vocab, window, decoded)
    piece.seek += moved
    if decoding.word_timestamps:
        _add_words(model, vocab, piece, window, features, segments, single_end)
    for segment in segments:
        if segment["start"] == segment["end"] or not segment["text"].strip():
            segment.update(text="", tokens=[], words=[])
    piece.segments += segments


def _add_words(
    model: Any,
    vocab: _Vocabulary,
    piece: _Piece,
    window: _Window,
    features: mx.array,
    segments: list[dict],
    single_end: bool,
) -> None:
    from mlx_whisper.timing import add_word_timestamps

    add_word_timestamps(
        segments=segments,
        model=_Aligner(model, features),
        tokenizer=vocab.tokenizer,
        mel=window.mel,
        num_frames=window.frames,
        last_speech_timestamp=piece.last_speech,
    )
    end = _last_end(segments)
    if not single_end and end is not None and end > window.seek * HOP / SAMPLE_RATE:
        piece.seek = round(end * FRAMES_PER_SECOND)
    if end is not None:
        piece.last_speech = end


def _last_end(segments: list[dict]) -> float | None:
    words = [w for s in segments for w in s.get("words", [])]
    if words:
        return words[-1]["end"]
    return segments[-1]["end"] if segments else None


# ---- the whole request ----------------------------------------------------------------------


@dataclass
class Outcome:
    result: dict
    language_probs: dict[str, float] | None


def transcribe_pieces(
    model: Any,
    pieces: Sequence[Piece],
    decoding: Decoding,
    *,
    batch: int,
    dtype: mx.Dtype,
    on_window: Callable[[], None],
) -> Outcome:
    """Every piece's window loop, up to `batch` pieces' windows decoded together; the result in
    mlx_whisper.transcribe's shape, times in the original audio (pieces in timeline order)."""
    pending = deque(enumerate(pieces))
    active: list[tuple[int, _Piece]] = []
    done: dict[int, _Piece] = {}
    vocab: _Vocabulary | None = None
    probs = None
    while pending or active:
        while pending and len(active) < batch:
            index, (audio, start) = pending.popleft()
            piece = _Piece.of(model, audio, start, dtype)
            if piece.done:
                done[index] = piece
            else:
                active.append((index, piece))
        if not active:
            break
        on_window()
        windows = [piece.window() for _, piece in active]
        features = [_encode(model, w.mel) for w in windows]
        if vocab is None:
            language, probs = _language(model, decoding, features[0])
            vocab = _Vocabulary(model, decoding, language)
        rows = [
            _Row(f, vocab.prefix(piece.windows == 0), _seed(piece, w))
            for (_, piece), w, f in zip(active, windows, features, strict=True)
        ]
        results = decode_with_fallback(model, vocab, rows, decoding, on_window)
        for (index, piece), window, feats, decoded in zip(
            active, windows, features, results, strict=True
        ):
            _advance(model, vocab, piece, window, feats, decoded, decoding)
            if piece.done:
                done[index] = piece
        active = [(i, p) for i, p in active if not p.done]
    language = vocab.language if vocab else (decoding.language or "en")
    return Outcome(_merge(vocab, [done[i] for i in sorted(done)], language), probs)


def _encode(model: Any, mel: mx.array) -> mx.array:
    """One window through the encoder (one at a time: the encoder is already wide, and its
    attention scores grow with the batch)."""
    features = model.encoder(mel[None])[0]
    mx.eval(features)
    return features


def _seed(piece: _Piece, window: _Window) -> int:
    return (piece.start * 7 + window.seek) % 2**31


def _language(
    model: Any, decoding: Decoding, features: mx.array
) -> tuple[str, dict[str, float] | None]:
    """The request's language, else the one detected in the first window."""
    if decoding.language is not None:
        return decoding.language, None
    if not model.is_multilingual:
        return "en", None
    _, probs = model.detect_language(features[None])
    probs = dict(probs[0])
    return max(probs, key=probs.get), probs


def _merge(vocab: _Vocabulary | None, pieces: list[_Piece], language: str) -> dict:
    segments: list[dict] = []
    tokens: list[int] = []
    for piece in pieces:
        shift = piece.start / SAMPLE_RATE
        for segment in piece.segments:
            segment = {"id": len(segments), **segment}
            segment["seek"] += piece.start // HOP
            segment["start"] = round(segment["start"] + shift, 3)
            segment["end"] = round(segment["end"] + shift, 3)
            for word in segment.get("words", []):
                word["start"] = round(word["start"] + shift, 3)
                word["end"] = round(word["end"] + shift, 3)
            segments.append(segment)
            tokens += segment["tokens"]
    text = vocab.tokenizer.decode(tokens) if vocab else ""
    return {"text": text, "segments": segments, "language": language}
