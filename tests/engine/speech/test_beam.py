"""engine.speech.beam: beam search and best-of sampling for one window, on a crafted language
model (whose self-attention cache holds the token history, so a wrongly reordered cache shows)
and on a tiny random Whisper."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
import pytest
from mlx_whisper.decoding import DecodingOptions
from mlx_whisper.tokenizer import get_tokenizer
from mlx_whisper.whisper import ModelDimensions, Whisper

from engine.speech.beam import (
    Candidate,
    TimestampRules,
    beam_proposals,
    choose,
    decode_window,
    sequence_score,
)
from tests.tiny.whisper import DIMS

TOKENIZER = get_tokenizer(True, num_languages=99, language="en", task="transcribe")
YES, NO, SURE, INDEED = (TOKENIZER.encode(w)[0] for w in (" yes", " no", " sure", " indeed"))
COLOURS = (" red", " green", " blue", " cyan", " pink", " gray", " gold", " teal")
FLAT = [TOKENIZER.encode(w)[0] for w in COLOURS]
EOT = TOKENIZER.eot
TEXT_OPTIONS = DecodingOptions(language="en", without_timestamps=True, fp16=False)

# Next-token probabilities after the prompt, by the tokens sampled so far. After " yes" eight
# words are equally likely; " no" leads to " sure indeed" almost surely. Greedy takes " yes"
# (0.6) and then one of the eight (score (ln 0.6 + ln 1/8) / 2 = -1.29); beam search keeps
# " no" (0.4) alive and finds " no sure indeed" (score about -0.33).
CRAFTED: dict[tuple[int, ...], dict[int, float]] = {
    (): {YES: 0.6, NO: 0.4},
    (YES,): {token: 1 / 8 for token in FLAT},
    (NO,): {SURE: 0.95, FLAT[0]: 0.05},
    (NO, SURE): {INDEED: 0.99, EOT: 0.01},
}


@dataclass
class _Dims:
    n_vocab: int = 51865
    n_text_ctx: int = 448
    n_audio_ctx: int = 1500


class CraftedModel:
    """A Whisper-shaped model whose decoder returns CRAFTED's distributions. Its cache has
    Whisper's layout; the keys are the token ids, so each row's history is read from it."""

    dims = _Dims()
    is_multilingual = True
    num_languages = 99

    def __init__(self, prompt_length: int) -> None:
        self.prompt_length = prompt_length

    def decoder(self, tokens: mx.array, features: mx.array, kv_cache: Any = None) -> Any:
        ids = tokens.astype(mx.float32)[..., None]
        if kv_cache is not None:
            (past, _), cross = kv_cache[0]
            ids = mx.concatenate([past, ids], axis=1)
        else:
            cross = (features, features)
        rows = np.array(ids[..., 0]).astype(int).tolist()
        width = tokens.shape[1]
        logits = [
            [self._logits(row[: len(row) - width + i + 1]) for i in range(width)] for row in rows
        ]
        return mx.array(np.array(logits)), [((ids, ids), cross)], None

    def _logits(self, history: list[int]) -> np.ndarray:
        sampled = tuple(history[self.prompt_length :])
        probs = CRAFTED.get(sampled, {EOT: 1.0}) if len(history) >= self.prompt_length else {}
        logits = np.full(self.dims.n_vocab, -30.0, np.float32)
        for token, p in probs.items():
            logits[token] = np.log(p)
        return logits


def crafted() -> CraftedModel:
    return CraftedModel(len(TOKENIZER.sot_sequence_including_notimestamps))


def features() -> mx.array:
    return mx.zeros((4, 8))


def test_beam_search_finds_a_higher_scoring_sequence_than_greedy() -> None:
    greedy, _ = decode_window(crafted(), features(), TEXT_OPTIONS, 1, None)
    beam, _ = decode_window(crafted(), features(), TEXT_OPTIONS, 3, None)
    assert greedy.tokens[0] == YES and greedy.tokens[1] in FLAT and len(greedy.tokens) == 2
    assert beam.tokens == [NO, SURE, INDEED]  # the cache was reordered with its beam
    assert beam.text == "no sure indeed"
    greedy_score = sequence_score(np.log(0.6) + np.log(1 / 8), 2)
    beam_score = sequence_score(np.log(0.4) + np.log(0.95) + np.log(0.99), 3)
    assert beam_score > greedy_score
    assert beam.avg_logprob == pytest.approx(beam_score * 3 / 4, abs=1e-4)  # EOT's 0 over 4
    assert beam.temperature == 0.0 and beam.language == "en"


def test_best_of_keeps_the_best_sample() -> None:
    mx.random.seed(3)
    options = DecodingOptions(language="en", without_timestamps=True, fp16=False, temperature=1.0)
    results = [decode_window(crafted(), features(), options, 8, None)[0] for _ in range(4)]
    for result in results:
        assert result.tokens in ([NO, SURE, INDEED], *([YES, t] for t in FLAT))
    # with eight samples the " no" branch (0.4 each) is drawn nearly always, and it wins
    assert sum(r.tokens == [NO, SURE, INDEED] for r in results) >= 3


def test_sequence_score_is_whisper_cpps() -> None:
    assert sequence_score(-6.0, 3) == -2.0
    assert sequence_score(-6.0, 3, length_penalty=-1.0) == -2.0  # whisper.cpp's default
    assert sequence_score(-6.0, 3, length_penalty=0.0) == -2.0  # openai-whisper: -6.0
    assert sequence_score(-6.0, 3, length_penalty=1.0) == pytest.approx(-6.0 / (8 / 6))
    assert sequence_score(0.0, 0) == -np.inf


def test_choose_skips_a_repetitive_candidate_unless_all_are() -> None:
    loop = Candidate([5] * 40, sum_logprob=-1.0)
    varied = Candidate(list(range(40)), sum_logprob=-20.0)
    assert choose([loop, varied], entropy_threshold=2.4) == (varied, False)
    assert choose([loop, varied], entropy_threshold=None) == (loop, False)
    assert choose([loop], entropy_threshold=2.4) == (loop, True)


def test_beam_proposals_rank_all_beams_by_cumulative_logprob() -> None:
    logprobs = np.log(np.array([[0.5, 0.3, 0.2], [0.9, 0.05, 0.05]]))
    live = [Candidate([7], sum_logprob=-0.1), Candidate([8], sum_logprob=-3.0)]
    assert beam_proposals(live, logprobs, 3) == [(0, 0), (0, 1), (0, 2)]
    live[1].sum_logprob = -0.2
    assert beam_proposals(live, logprobs, 2) == [(1, 0), (0, 0)]
    logprobs[0, 1:] = -np.inf
    assert beam_proposals(live[:1], logprobs[:1], 2) == [(0, 0)]  # never a forbidden token


def test_timestamp_rules() -> None:
    begin = TOKENIZER.timestamp_begin
    rules = TimestampRules(TOKENIZER, max_initial_index=50)
    word = YES
    logits = np.zeros((5, 51865), np.float32)
    logits[:3, word] = logits[3, EOT] = 20.0  # more probable than all timestamps together
    rows = [[], [begin + 3], [begin + 3, word], [begin + 3, word, begin + 9], [begin, word]]
    out = rules.apply(logits, rows)
    allowed = [set(np.flatnonzero(np.isfinite(row)).tolist()) for row in out]
    assert allowed[0] == set(range(begin, begin + 51))  # a timestamp, at most 1 s
    assert all(t < begin for t in allowed[1]) and word in allowed[1]  # text after the first
    assert begin + 3 not in allowed[2] and begin + 4 in allowed[2] and word in allowed[2]
    assert min(allowed[3]) == EOT and begin + 8 not in allowed[3] and begin + 9 in allowed[3]
    assert TOKENIZER.no_timestamps not in set().union(*allowed)
    # the timestamps' total probability beats every single text token: a timestamp is next
    assert allowed[4] == set(range(begin + 1, 51865))


def test_timestamp_rules_always_leave_a_token() -> None:
    rng = np.random.default_rng(0)
    begin = TOKENIZER.timestamp_begin
    rules = TimestampRules(TOKENIZER, max_initial_index=50)
    for _ in range(20):
        logits = rng.normal(0, 5, (3, 51865)).astype(np.float32)
        logits[:, begin:] += rng.normal(0, 5)
        rows = [[begin + 2], [begin + 2, YES], [begin + 2, YES, begin + 6]]
        assert np.isfinite(rules.apply(logits, rows)).any(axis=-1).all()


@pytest.fixture(scope="module")
def tiny() -> Whisper:
    mx.random.seed(0)  # mlx initialises the weights at random
    return Whisper(ModelDimensions(**DIMS), mx.float32)


def test_one_beam_is_greedy_on_a_tiny_whisper(tiny: Whisper) -> None:
    mel = mx.random.normal((3000, DIMS["n_mels"]), key=mx.random.key(1))
    audio = tiny.encoder(mel[None])[0]
    options = DecodingOptions(language="en", without_timestamps=True, fp16=False, sample_len=24)
    greedy = tiny.decode(audio, options)
    beam, _ = decode_window(tiny, audio, options, 1, None)
    assert beam.tokens == greedy.tokens
    assert beam.no_speech_prob == pytest.approx(greedy.no_speech_prob, rel=1e-4)


def test_beams_with_timestamps_on_a_tiny_whisper(tiny: Whisper) -> None:
    mel = mx.random.normal((3000, DIMS["n_mels"]), key=mx.random.key(2))
    audio = tiny.encoder(mel[None])[0]
    options = DecodingOptions(language="en", fp16=False, sample_len=40)
    result, _ = decode_window(tiny, audio, options, 4, None)
    begin = TOKENIZER.timestamp_begin
    stamps = [t for t in result.tokens if t >= begin]
    assert result.tokens and result.tokens[0] >= begin and EOT not in result.tokens
    assert stamps == sorted(stamps) and np.isfinite(result.avg_logprob)
