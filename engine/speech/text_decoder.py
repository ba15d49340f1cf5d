"""Whisper's text decoder with each window's cross-attention keys and values laid out once.

mlx-whisper's `TextDecoder` caches the cross-attention keys and values of a window, but its
attention re-lays them out at every token: the keys are reshaped, transposed and scaled
(`k.transpose(0, 2, 3, 1) * scale`), and MLX's CPU backend copies that transposed view before
each product, a full pass over the encoder output per layer and token. Here the keys are kept
pre-scaled in the (batch, heads, head_dim, frames) layout the product reads and the values in
(batch, heads, frames, head_dim), computed on the window's first call. The arithmetic is the
same (same products of the same numbers), so the tokens are too. Model thread only.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_whisper.whisper import TextDecoder

CrossKV = tuple[mx.array, mx.array]


def cross_kv(attention: Any, features: mx.array) -> CrossKV:
    """One layer's cross-attention keys (pre-scaled) and values from the encoder output
    (batch, frames, width), in the layout `cross_attention` reads."""
    rows, frames, width = features.shape
    heads = attention.n_head
    scale = (width // heads) ** -0.25
    keys = attention.key(features).reshape(rows, frames, heads, -1).transpose(0, 2, 3, 1)
    values = attention.value(features).reshape(rows, frames, heads, -1).transpose(0, 2, 1, 3)
    return mx.contiguous(keys * scale), mx.contiguous(values)


def cross_attention(
    attention: Any, x: mx.array, keys: mx.array, values: mx.array
) -> tuple[mx.array, mx.array]:
    """The layer's output and its attention logits (what word timestamps align on)."""
    rows, length, width = x.shape
    heads = attention.n_head
    scale = (width // heads) ** -0.25
    q = attention.query(x).reshape(rows, length, heads, -1).transpose(0, 2, 1, 3) * scale
    qk = q @ keys
    weights = mx.softmax(qk, axis=-1, precise=True)
    out = (weights @ values).transpose(0, 2, 1, 3).reshape(rows, length, width)
    return attention.out(out), qk


def forward(
    decoder: TextDecoder, x: mx.array, xa: mx.array | None, kv_cache: list | None = None
) -> tuple[mx.array, list, list]:
    """A `TextDecoder`'s forward pass over tokens `x` after the cached ones: (logits, cache,
    cross-attention logits per layer). Each cache entry is (self keys/values or None, cross
    keys/values or None); missing cross keys/values are made from the audio features `xa`."""
    first = kv_cache[0] if kv_cache else None
    offset = first[0][0].shape[1] if first and first[0] is not None else 0
    x = decoder.token_embedding(x) + decoder.positional_embedding[offset : offset + x.shape[-1]]
    cache = list(kv_cache) if kv_cache else [None] * len(decoder.blocks)
    cross_qk: list[mx.array | None] = [None] * len(decoder.blocks)
    for layer, block in enumerate(decoder.blocks):
        own, cross = cache[layer] or (None, None)
        y, own, _ = block.attn(block.attn_ln(x), mask=decoder._mask, kv_cache=own)
        x = x + y
        if cross is None:
            cross = cross_kv(block.cross_attn, xa)
        y, cross_qk[layer] = cross_attention(block.cross_attn, block.cross_attn_ln(x), *cross)
        x = x + y
        x = x + block.mlp2(nn.gelu(block.mlp1(block.mlp_ln(x))))
        cache[layer] = (own, cross)
    return decoder.token_embedding.as_linear(decoder.ln(x)), cache, cross_qk


class CrossCachedTextDecoder(TextDecoder):
    """`TextDecoder` whose cache entries hold (self keys/values, laid-out cross keys/values);
    called exactly as mlx-whisper calls its own (tokens, audio features, cache)."""

    def __call__(
        self, x: mx.array, xa: mx.array, kv_cache: list | None = None
    ) -> tuple[mx.array, list, list]:
        return forward(self, x, xa, kv_cache)


def adopt(model: Any) -> Any:
    """Make a loaded mlx-whisper model's decoder lay its cross-attention keys out once per
    window. The decoder object (and its weights) stays; only its class changes."""
    if type(model.decoder) is TextDecoder:
        model.decoder.__class__ = CrossCachedTextDecoder
    return model
