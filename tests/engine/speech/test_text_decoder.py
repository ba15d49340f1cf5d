"""engine.speech.text_decoder: the decoder with laid-out cross-attention keys computes exactly
what mlx-whisper's own decoder computes, step after step through its cache."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_whisper.whisper import ModelDimensions, TextDecoder, Whisper

from engine.speech.text_decoder import CrossCachedTextDecoder, adopt, forward
from tests.tiny.whisper import DIMS


@pytest.fixture(scope="module")
def tiny() -> Whisper:
    mx.random.seed(3)
    return Whisper(ModelDimensions(**DIMS), mx.float32)


def steps(call, tokens: mx.array, audio: mx.array, n: int) -> list[tuple[mx.array, list]]:
    """The prompt, then `n` one-token steps (each row's argmax) through the cache."""
    logits, cache, qk = call(tokens, audio, None)
    out = [(logits, qk)]
    for _ in range(n):
        nxt = mx.argmax(logits[:, -1], axis=-1)[:, None]
        logits, cache, qk = call(nxt, audio, cache)
        out.append((logits, qk))
    return out


@pytest.mark.parametrize("rows", [1, 3])
def test_the_same_logits_and_cross_attention_as_mlx_whisper(tiny: Whisper, rows: int) -> None:
    mel = mx.random.normal((rows, 3000, DIMS["n_mels"]), key=mx.random.key(rows))
    audio = tiny.encoder(mel)
    prompt = mx.array([[50258, 50259, 50359]] * rows)
    theirs = steps(lambda x, a, c: TextDecoder.__call__(tiny.decoder, x, a, c), prompt, audio, 6)
    ours = steps(lambda x, a, c: forward(tiny.decoder, x, a, c), prompt, audio, 6)
    for (their_logits, their_qk), (our_logits, our_qk) in zip(theirs, ours, strict=True):
        assert mx.array_equal(their_logits, our_logits).item()
        assert all(mx.array_equal(a, b).item() for a, b in zip(their_qk, our_qk, strict=True))


def test_adopt_keeps_the_weights_and_changes_only_the_call(tiny: Whisper) -> None:
    mx.random.seed(3)
    model = Whisper(ModelDimensions(**DIMS), mx.float32)
    before = dict(model.decoder.parameters())
    assert adopt(model) is model and type(model.decoder) is CrossCachedTextDecoder
    assert isinstance(model.decoder, TextDecoder) and dict(model.decoder.parameters()) == before
    mel = mx.random.normal((1, 3000, DIMS["n_mels"]), key=mx.random.key(9))
    audio = tiny.encoder(mel)
    tokens = mx.array([[50258, 50259, 50359]])
    assert mx.array_equal(model.logits(tokens, audio), tiny.logits(tokens, audio)).item()
