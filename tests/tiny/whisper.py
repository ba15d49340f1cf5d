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


# ------------------------------------------------------------------ other upstream layouts
# The same tiny weights written the way upstream checkpoints name and shape them, so the
# converters can be checked for an exact round trip. Non-default alignment heads make it
# visible whether the converter kept the source's own heads.

SOURCE_ALIGNMENT_HEADS = [[0, 1], [1, 0]]

_HF_SEGMENTS = {
    "blocks": "layers",
    "attn": "self_attn",
    "cross_attn": "encoder_attn",
    "attn_ln": "self_attn_layer_norm",
    "cross_attn_ln": "encoder_attn_layer_norm",
    "mlp_ln": "final_layer_norm",
    "query": "q_proj",
    "key": "k_proj",
    "value": "v_proj",
    "out": "out_proj",
    "mlp1": "fc1",
    "mlp2": "fc2",
    "ln_post": "layer_norm",
    "ln": "layer_norm",
    "token_embedding": "embed_tokens",
}


def tiny_weights() -> dict[str, np.ndarray]:
    """The float32 tiny weights in mlx-whisper names (conv kernels (out, k, in)), no heads."""
    weights = _weights()
    weights.pop("alignment_heads")
    return weights


def _conv_kernel(name: str, value: np.ndarray) -> np.ndarray:
    """mlx (out, k, in) conv kernels -> PyTorch / CTranslate2 (out, in, k)."""
    is_kernel = name.startswith("encoder.conv") and name.endswith(".weight")
    return value.transpose(0, 2, 1) if is_kernel else value


def sinusoids(length: int, channels: int) -> np.ndarray:
    """Whisper's encoder positions (what checkpoints store and mlx-whisper recomputes)."""
    increment = np.log(10000) / (channels // 2 - 1)
    inv = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


def hf_name(name: str) -> str:
    """mlx-whisper name -> transformers WhisperForConditionalGeneration name."""
    if name == "decoder.positional_embedding":
        return "model.decoder.embed_positions.weight"
    return "model." + ".".join(_HF_SEGMENTS.get(part, part) for part in name.split("."))


def hf_state() -> dict[str, np.ndarray]:
    state = {}
    for name, value in tiny_weights().items():
        state[hf_name(name)] = _conv_kernel(name, value)
    state["model.encoder.embed_positions.weight"] = sinusoids(
        DIMS["n_audio_ctx"], DIMS["n_audio_state"]
    )
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def hf_config() -> dict:
    return {
        "model_type": "whisper",
        "architectures": ["WhisperForConditionalGeneration"],
        "vocab_size": DIMS["n_vocab"],
        "num_mel_bins": DIMS["n_mels"],
        "d_model": DIMS["n_audio_state"],
        "encoder_layers": DIMS["n_audio_layer"],
        "encoder_attention_heads": DIMS["n_audio_head"],
        "decoder_layers": DIMS["n_text_layer"],
        "decoder_attention_heads": DIMS["n_text_head"],
        "encoder_ffn_dim": 4 * DIMS["n_audio_state"],
        "decoder_ffn_dim": 4 * DIMS["n_text_state"],
        "max_source_positions": DIMS["n_audio_ctx"],
        "max_target_positions": DIMS["n_text_ctx"],
        "activation_function": "gelu",
        "scale_embedding": False,
        "tie_word_embeddings": True,
        "bos_token_id": 50257,
        "eos_token_id": 50257,
        "pad_token_id": 50257,
        "decoder_start_token_id": 50258,
        "torch_dtype": "float32",
    }


def build_whisper_hf(dest: Path) -> Path:
    """A Hugging Face transformers layout: config.json, generation_config.json, safetensors."""
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "config.json").write_text(json.dumps(hf_config(), indent=2) + "\n")
    generation = {
        "alignment_heads": SOURCE_ALIGNMENT_HEADS,
        "decoder_start_token_id": 50258,
        "eos_token_id": 50257,
        "is_multilingual": True,
    }
    (dest / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    save_file(hf_state(), str(dest / "model.safetensors"), metadata={"format": "pt"})
    return dest


def openai_state() -> dict[str, np.ndarray]:
    """OpenAI whisper's state_dict names (mlp.0 / mlp.2, conv (out, in, k), encoder positions)."""
    state = {}
    for name, value in tiny_weights().items():
        name = name.replace(".mlp1.", ".mlp.0.").replace(".mlp2.", ".mlp.2.")
        state[name] = _conv_kernel(name, value)
    state["encoder.positional_embedding"] = sinusoids(DIMS["n_audio_ctx"], DIMS["n_audio_state"])
    return {k: np.ascontiguousarray(v) for k, v in state.items()}


def build_whisper_openai_pt(path: Path) -> Path:
    """OpenAI's checkpoint format: torch.save({"dims": ..., "model_state_dict": ...})."""
    import torch

    state = {k: torch.from_numpy(v) for k, v in openai_state().items()}
    torch.save({"dims": dict(DIMS), "model_state_dict": state}, str(path))
    return Path(path)
