"""Several candidates for one 30 s window: beam search at temperature 0 and best-of-N sampling
above it, as whisper.cpp's `whisper_full_with_state` defines them. Model thread only.

mlx-whisper's `DecodingTask` supplies the prompt tokens and the blank and non-speech
suppression; the timestamp rules are `TimestampRules` below (mlx-whisper 0.4.3's own weigh the
timestamps against the text before masking, which can forbid every token of a row, and never
keep timestamps from decreasing). The decoder runs all live candidates as one batch: the
window's prompt is decoded once, the cross-attention keys and values are computed once from the
audio features (batch 1, broadcast over the candidates) and the self-attention cache is gathered
row by row whenever the beams are reordered.

Beam search (whisper.cpp's, not openai-whisper's): `beam_size` slots; at each step every live
beam proposes its `beam_size` most probable next tokens, and the live slots take the best of
all proposals by cumulative log probability (ties: the earlier beam). A slot whose token is the
end of text is finished and keeps its sequence; the search stops when every slot has finished.
openai-whisper instead keeps `beam_size` live beams and collects finished ones until
`beam_size * patience` have finished (patience is not implemented in whisper.cpp either).
Recent whisper.cpp draws the proposals at random from the distribution; these are the most
probable ones, as in whisper.cpp up to 1.5 and in openai-whisper.

Sampling (temperature > 0): `best_of` independent samples.

Ranking (`sequence_score`, whisper.cpp's `whisper_sequence_score`): the sum of the tokens' log
probabilities over the length, or over ((5 + length) / 6) ** length_penalty when
length_penalty > 0 (whisper.cpp's default is -1: the plain length). openai-whisper applies the
Google NMT penalty for any length_penalty given (0 included) and counts the end-of-text token's
log probability in the sum; here, as in whisper.cpp, the sum is over the text and timestamp
tokens. A candidate failing the entropy check (engine.speech.guards) is not chosen when another
passes (whisper.cpp marks that decoder failed). Log probabilities are those of the unscaled
logits at every temperature (mlx-whisper's and openai-whisper's; whisper.cpp's are of the
temperature-scaled ones), so avg_logprob means the same on every rung.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import mlx.core as mx
import numpy as np

from engine.speech.guards import entropy_failed


def sequence_score(sum_logprob: float, length: int, length_penalty: float | None = None) -> float:
    """whisper.cpp's candidate score: log probability per token (or per GNMT length unit)."""
    if length == 0:
        return -np.inf
    penalty = float(length)
    if length_penalty is not None and length_penalty > 0:
        penalty = ((5.0 + length) / 6.0) ** length_penalty
    return sum_logprob / penalty


@dataclass
class Candidate:
    """One decoded sequence: its sampled tokens (no end of text) and their log probabilities."""

    tokens: list[int]
    sum_logprob: float = 0.0  # over `tokens`
    eot_logprob: float = 0.0  # of the end-of-text token that finished it (0: cut at the limit)
    finished: bool = False

    @property
    def cumulative(self) -> float:
        return self.sum_logprob + self.eot_logprob

    def score(self, length_penalty: float | None = None) -> float:
        return sequence_score(self.sum_logprob, len(self.tokens), length_penalty)

    def avg_logprob(self) -> float:
        """As mlx-whisper's greedy decode reports it: end of text included."""
        return self.cumulative / (len(self.tokens) + 1)


@dataclass
class _Step:
    """Where the search stands: the live rows (tokens after the prompt) and the finished."""

    live: list[Candidate]
    finished: list[Candidate]


def choose(
    candidates: list[Candidate],
    entropy_threshold: float | None,
    length_penalty: float | None = None,
) -> tuple[Candidate, bool]:
    """The best-scoring candidate that passes the entropy check, and False; when none passes,
    the best of all and True (the rung failed)."""
    passing = [c for c in candidates if not entropy_failed(c.tokens, entropy_threshold)]
    pool = passing or candidates
    best = max(pool, key=lambda c: c.score(length_penalty))  # first of equals: lowest slot
    return best, not passing


class TimestampRules:
    """openai-whisper's timestamp rules, which whisper.cpp applies too, for rows of sampled
    tokens (the prompt excluded): the first token is a timestamp no later than
    `max_initial_timestamp`; timestamps come in pairs (a lone one may only precede the end of
    text); they never decrease; and when the timestamps together are more probable than any
    one text token, a timestamp comes next."""

    def __init__(self, tokenizer: Any, max_initial_index: int | None) -> None:
        self.begin = tokenizer.timestamp_begin
        self.eot = tokenizer.eot
        self.no_timestamps = tokenizer.no_timestamps
        self.max_initial_index = max_initial_index

    def apply(self, logits: np.ndarray, rows: list[list[int]]) -> np.ndarray:
        """`logits` (rows, vocab) with the forbidden tokens at -inf."""
        logits = logits + self._pair_mask(rows, logits.shape[-1])
        logprobs = _log_softmax(logits)
        with np.errstate(divide="ignore"):
            stamps = np.logaddexp.reduce(logprobs[:, self.begin :], axis=-1)
        text_first = stamps > logprobs[:, : self.begin].max(axis=-1)
        logits[text_first, : self.begin] = -np.inf
        return logits

    def _pair_mask(self, rows: list[list[int]], vocab: int) -> np.ndarray:
        mask = np.zeros((len(rows), vocab), np.float32)
        if self.no_timestamps is not None:
            mask[:, self.no_timestamps] = -np.inf
        for k, seq in enumerate(rows):
            if not seq:
                mask[k, : self.begin] = -np.inf
                if self.max_initial_index is not None:
                    mask[k, self.begin + self.max_initial_index + 1 :] = -np.inf
                continue
            last = seq[-1] >= self.begin
            penultimate = len(seq) < 2 or seq[-2] >= self.begin
            if last and penultimate:
                mask[k, self.begin :] = -np.inf
            elif last:
                mask[k, : self.eot] = -np.inf
            stamps = [t for t in seq if t >= self.begin]
            if stamps:
                # never earlier than the last one; a segment's end strictly after its start
                floor = stamps[-1] if last and not penultimate else stamps[-1] + 1
                mask[k, self.begin : floor] = -np.inf
        return mask


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    top = logits.max(axis=-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore"):
        return logits - top - np.log(np.exp(logits - top).sum(axis=-1, keepdims=True))


class WindowDecoder:
    """Decodes one window's candidates with a Whisper model's decoder and mlx-whisper's rules."""

    def __init__(self, model: Any, options: Any) -> None:
        from mlx_whisper.decoding import ApplyTimestampRules, DecodingTask

        self.model = model
        self.options = options
        # DecodingTask refuses beam_size (no beam search in mlx-whisper) and best_of at T=0.
        self.task = DecodingTask(model, replace(options, beam_size=None, best_of=None))
        self.tokenizer = self.task.tokenizer
        self.prompt = list(self.task.initial_tokens)
        filters = self.task.logit_filters
        self.filters = [f for f in filters if not isinstance(f, ApplyTimestampRules)]
        self.timestamps = None if options.without_timestamps else self._timestamp_rules()
        self.max_steps = min(self.task.sample_len, self.task.n_ctx - len(self.prompt))

    @property
    def sampling(self) -> bool:
        return self.options.temperature > 0

    def decode(self, features: mx.array, width: int) -> tuple[list[Candidate], float]:
        """All candidates (finished or cut at the length limit) and the no-speech probability.
        `features`: the window's encoder output, (n_audio_ctx, n_audio_state)."""
        features = features[None]
        logits, cache, _ = self.model.decoder(mx.array([self.prompt]), features)
        no_speech = self._no_speech_prob(logits)
        rows = width if self.sampling else 1  # beams branch from one row; samples start apart
        step = _Step(live=[Candidate([]) for _ in range(rows)], finished=[])
        cache = _gather(cache, [0] * rows)
        logits = mx.broadcast_to(logits[:, -1], (rows, logits.shape[-1]))
        for _ in range(self.max_steps):
            parents = self._advance(step, self._logprobs(logits, step.live), width)
            if not step.live:
                break
            cache = _gather(cache, parents)
            inputs = mx.array([[c.tokens[-1]] for c in step.live])
            logits, cache, _ = self.model.decoder(inputs, features, kv_cache=cache)
            logits = logits[:, -1]
        return step.finished + step.live, no_speech

    def _no_speech_prob(self, logits: mx.array) -> float:
        """At the start-of-transcript position, before any filter (as mlx-whisper and
        openai-whisper; whisper.cpp reads it at the prompt's last position)."""
        no_speech = self.tokenizer.no_speech
        if no_speech is None:
            return float("nan")
        probs = mx.softmax(logits[0, self.task.sot_index].astype(mx.float32), axis=-1)
        return float(probs[no_speech].item())

    def _timestamp_rules(self) -> TimestampRules:
        from mlx_whisper.audio import CHUNK_LENGTH

        initial = self.options.max_initial_timestamp
        precision = CHUNK_LENGTH / self.model.dims.n_audio_ctx
        return TimestampRules(self.tokenizer, round(initial / precision) if initial else None)

    def _logprobs(self, logits: mx.array, live: list[Candidate]) -> np.ndarray:
        """Filtered log probabilities of the next token, one row per live candidate. A row
        the rules leave no token for ends (its end of text is allowed)."""
        logits = logits.astype(mx.float32)
        context = mx.array([self.prompt + c.tokens for c in live])
        for logit_filter in self.filters:  # blank and suppressed tokens
            logits = logit_filter.apply(logits, context)
        values = np.array(logits)
        if self.timestamps is not None:
            values = self.timestamps.apply(values, [c.tokens for c in live])
        values[~np.isfinite(values).any(axis=-1), self.tokenizer.eot] = 0.0
        return _log_softmax(values)

    def _advance(self, step: _Step, logprobs: np.ndarray, width: int) -> list[int]:
        """Extend the search by one token; returns the parent row of each row still live."""
        if self.sampling:
            proposals = self._samples(logprobs)
        else:
            proposals = beam_proposals(step.live, logprobs, width - len(step.finished))
        eot = self.tokenizer.eot
        live, parents = [], []
        for row, token in proposals:
            candidate = _extend(step.live[row], token, float(logprobs[row, token]), eot)
            if candidate.finished:
                step.finished.append(candidate)
            else:
                live.append(candidate)
                parents.append(row)
        step.live = live
        return parents

    def _samples(self, logprobs: np.ndarray) -> list[tuple[int, int]]:
        """One token per live row, drawn from its distribution at the rung's temperature."""
        scaled = mx.array(logprobs) / self.options.temperature
        drawn = np.array(mx.random.categorical(scaled, axis=-1)).tolist()
        return [(row, int(token)) for row, token in enumerate(drawn)]


def decode_window(
    model: Any, features: mx.array, options: Any, width: int, entropy_threshold: float | None
) -> tuple[Any, bool]:
    """One window decoded with `width` candidates at `options.temperature` (beam search at 0,
    sampling above): mlx-whisper's DecodingResult for the chosen one, and whether every
    candidate failed the entropy check."""
    from mlx_whisper.decoding import DecodingResult, compression_ratio

    decoder = WindowDecoder(model, options)
    candidates, no_speech = decoder.decode(features, width)
    best, repetitive = choose(candidates, entropy_threshold, options.length_penalty)
    text = decoder.tokenizer.decode(best.tokens).strip()
    result = DecodingResult(
        audio_features=features,
        language=options.language,
        tokens=best.tokens,
        text=text,
        avg_logprob=best.avg_logprob(),
        no_speech_prob=no_speech,
        temperature=options.temperature,
        compression_ratio=compression_ratio(text),
    )
    return result, repetitive


def _extend(candidate: Candidate, token: int, logprob: float, eot: int) -> Candidate:
    if token == eot:
        return replace(candidate, eot_logprob=logprob, finished=True)
    return Candidate(candidate.tokens + [token], candidate.sum_logprob + logprob)


def beam_proposals(
    live: list[Candidate], logprobs: np.ndarray, slots: int
) -> list[tuple[int, int]]:
    """(row, token) of the `slots` best extensions of all live beams by cumulative log
    probability, ties to the earlier beam, then the more probable token. Each beam's
    `slots` most probable tokens are enough to fill them (whisper.cpp takes beam_size)."""
    pool: list[tuple[float, int, float, int]] = []
    for row, candidate in enumerate(live):
        top = np.argpartition(-logprobs[row], slots - 1)[:slots]
        for token in top.tolist():
            value = float(logprobs[row, token])
            if np.isfinite(value):
                pool.append((-(candidate.cumulative + value), row, -value, token))
    pool.sort()
    return [(row, token) for _, row, _, token in pool[:slots]]


def _gather(cache: list, rows: list[int]) -> list:
    """The self-attention cache of the given rows; cross-attention keys and values stay shared."""
    index = mx.array(rows)
    return [((k[index], v[index]), cross) for (k, v), cross in cache]
