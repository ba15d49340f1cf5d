"""Gemma 4 audio input on the model thread: clips to soft tokens in the prompt.

The processor's feature extractor turns each clip into log-mel frames; each clip's audio
placeholder in the rendered prompt becomes ``<boa>`` + one audio token per encoder frame +
``<eoa>``; at prefill the model's own audio tower and embedder encode the frames and their
outputs replace the audio tokens' embeddings. The soft-token count of a clip is its valid
frames after the tower's two stride-2 convolutions (what Hugging Face's Gemma 4 processor
computes), and each clip contributes exactly its own frames: mlx-vlm's processor counts
ceil(ms / 40), at times one more than the tower yields, and its scatter reads the clips
flattened with their padding, so a second, shorter clip would get the first one's padding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_vlm.models.gemma4.gemma4 import masked_scatter

from engine.audio import SAMPLE_RATE

SUBSAMPLING_CONVS = 2  # the tower's stride-2 convolutions over time (kernel 3, padding 1)


@dataclass(frozen=True)
class AudioFeatures:
    """The log-mel frames of a prompt's clips, in prompt order."""

    features: mx.array  # (clips, frames, mel bins), padded to the longest clip
    valid: mx.array  # (clips, frames): True on a clip's own frames
    tokens: tuple[int, ...]  # soft tokens of each clip in the prompt


def audio_limit_s(processor: Any) -> float:
    """The longest clip the model takes: its soft-token cap times the audio per token."""
    return processor.audio_seq_length * processor.audio_ms_per_token / 1000


def soft_token_count(frame_valid: np.ndarray) -> int:
    """Valid frames left after the tower's strided convolutions (its own mask arithmetic)."""
    mask = np.asarray(frame_valid, dtype=bool)
    for _ in range(SUBSAMPLING_CONVS):
        mask = mask[::2][: (len(mask) - 1) // 2 + 1]
    return int(mask.sum())


def expand_audio(
    processor: Any, text: str, clips: Sequence[np.ndarray]
) -> tuple[str, AudioFeatures]:
    """The prompt with each audio placeholder expanded to its clip's soft tokens, and the
    clips' features."""
    extractor = processor.feature_extractor
    out = extractor(
        [np.asarray(c, dtype=np.float32) for c in clips],
        sampling_rate=SAMPLE_RATE,
        return_attention_mask=True,
    )
    valid = np.stack([np.asarray(m, dtype=bool) for m in out["input_features_mask"]])
    tokens = tuple(min(soft_token_count(m), processor.audio_seq_length) for m in valid)
    placeholder = re.escape(processor.audio_token)
    found = len(re.findall(placeholder, text))
    if found != len(clips):
        raise ValueError(f"the prompt has {found} audio tokens for {len(clips)} audio clips")
    pieces = iter(
        f"{processor.boa_token}{processor.audio_token * n}{processor.eoa_token}" for n in tokens
    )
    expanded = re.sub(placeholder, lambda _: next(pieces), text)
    features = np.stack([np.asarray(f, dtype=np.float32) for f in out["input_features"]])
    return expanded, AudioFeatures(mx.array(features), mx.array(valid), tokens)


def embed_audio(
    model: Any, audio: AudioFeatures, ids: mx.array, embeds: mx.array, audio_token_id: int
) -> mx.array:
    """``embeds`` (1, L, hidden) of the prompt ``ids`` (1, L) with the audio tokens replaced by
    the clips' encoded frames, each clip's own frames in order."""
    encoded, _ = model.audio_tower(audio.features, ~audio.valid)
    projected = model.embed_audio(encoded)
    frames = mx.concatenate([projected[i, :n] for i, n in enumerate(audio.tokens)])
    where = mx.broadcast_to((ids == audio_token_id)[..., None], embeds.shape)
    return masked_scatter(embeds, where, frames.astype(embeds.dtype))
