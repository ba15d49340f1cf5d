"""A tiny random multilingual Whisper in mlx-whisper's own layout, built offline for tests.

Multilingual vocabulary (n_vocab 51865) so the real tokenizer, language tokens and
`language="zh"` all work; every other dimension is tiny. The output text is garbage but every
stage (log-mel, encoder, decoder, fallback, timestamps) runs.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

SEED = 4321
DIMS = {
    "n_mels": 80,
    "n_audio_ctx": 1500,
    "n_audio_state": 32,
    "n_audio_head": 2,
    "n_audio_layer": 1,
    "n_vocab": 51865,
    "n_text_ctx": 448,
    "n_text_state": 32,
    "n_text_head": 2,
    "n_text_layer": 2,
}


def _param_shapes() -> dict[str, tuple[int, ...]]:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**DIMS), mx.float32)
    params = dict(tree_flatten(model.parameters()))
    params.pop("alignment_heads", None)
    return {name: tuple(arr.shape) for name, arr in sorted(params.items())}


def _weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    out: dict[str, np.ndarray] = {}
    for name, shape in _param_shapes().items():
        if name.endswith("ln.weight") or name.endswith("ln_post.weight"):
            arr = 1.0 + 0.05 * rng.standard_normal(shape)
        elif name.endswith("bias"):
            arr = 0.02 * rng.standard_normal(shape)
        else:
            arr = 0.1 * rng.standard_normal(shape)
        out[name] = arr.astype(np.float32)
    layers, heads = DIMS["n_text_layer"], DIMS["n_text_head"]
    mask = np.zeros((layers, heads), dtype=bool)
    mask[layers // 2 :] = True
    out["alignment_heads"] = np.asarray(mask.nonzero()).T.astype(np.int64)
    return out


def build_whisper_mlx(dest: Path) -> Path:
    """Write config.json + weights.safetensors (float32) to `dest`; return `dest`."""
    from mlx_whisper.whisper import ModelDimensions

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    config = {"model_type": "whisper", **asdict(ModelDimensions(**DIMS))}
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(_weights(), str(dest / "weights.safetensors"), metadata={"format": "mlx"})
    return dest
