"""Whisper checkpoints -> mlx-whisper's own layout (config.json + weights.safetensors).

Three sources, detected from `source`:

- a Hugging Face transformers directory (config.json with model_type whisper, model.safetensors
  or pytorch_model.bin, generation_config.json with alignment_heads);
- OpenAI's original `.pt` checkpoint (a torch pickle with "dims" and "model_state_dict");
- a CTranslate2 / faster-whisper directory (model.bin, config.json with alignment_heads).

The output is what `mlx_whisper.load_models.load_model` reads: config.json holds the
ModelDimensions fields (plus `"quantization": {"group_size", "bits"}` when quantized), and
weights.safetensors holds every parameter of `mlx_whisper.whisper.Whisper` with MLX names, the
conv kernels as (out, kernel, in), and the word-timestamp heads as an int64 `alignment_heads`
entry of (layer, head) rows (load_model's `model.update` sets the model's attribute from it).
The encoder's sinusoidal positions are not stored: mlx-whisper computes them.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import mlx.core as mx
import numpy as np

from conversions.common import ConversionError, check_options, read_source_json
from conversions.progress import stage

CONVERTER_VERSION = "1"
WEIGHTS = "weights.safetensors"
DIM_FIELDS = (
    "n_mels",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_vocab",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
)

# OpenAI's table (whisper/__init__.py): base85 of gzip of the (n_text_layer, n_text_head) bool mask
# of cross-attention heads that track word timing. Public data, MIT licensed.
OPENAI_ALIGNMENT_HEADS: dict[str, bytes] = {
    "tiny.en": b"ABzY8J1N>@0{>%R00Bk>$p{7v037`oCl~+#00",
    "tiny": b"ABzY8bu8Lr0{>%RKn9Fp%m@SkK7Kt=7ytkO",
    "base.en": b"ABzY8;40c<0{>%RzzG;p*o+Vo09|#PsxSZm00",
    "base": b"ABzY8KQ!870{>%RzyTQH3`Q^yNP!>##QT-<FaQ7m",
    "small.en": b"ABzY8>?_)10{>%RpeA61k&I|OI3I$65C{;;pbCHh0B{qLQ;+}v00",
    "small": b"ABzY8DmU6=0{>%Rpa?J`kvJ6qF(V^F86#Xh7JUGMK}P<N0000",
    "medium.en": b"ABzY8usPae0{>%R7<zz_OvQ{)4kMa0BMw6u5rT}kRKX;$NfYBv00*Hl@qhsU00",
    "medium": b"ABzY8B0Jh+0{>%R7}kK1fFL7w6%<-Pf*t^=N)Qr&0RR9",
    "large-v1": b"ABzY8r9j$a0{>%R7#4sLmoOs{s)o3~84-RPdcFk!JR<kSfC2yj",
    "large-v2": b"ABzY8zd+h!0{>%R7=D0pU<_bnWW*tkYAhobTNnu$jnkEkXqp)j;w1Tzk)UH3X%SZd&fFZ2fC2yj",
    "large-v3": b"ABzY8gWO1E0{>%R7(9S+Kn!D~%ngiGaR?*L!iJG9p-nab0JQ=-{D1-g00",
    "large-v3-turbo": b"ABzY8j^C+e0{>%RARaKHP%t(lGR*)0g!tONPyhe`",
}
OPENAI_ALIASES = {"large": "large-v3", "turbo": "large-v3-turbo"}

# (n_mels, n_audio_state, n_audio_layer, n_text_layer, n_vocab) of the official sizes.
_OFFICIAL_DIMS: dict[tuple[int, int, int, int, int], str] = {
    (80, 384, 4, 4, 51864): "tiny.en",
    (80, 384, 4, 4, 51865): "tiny",
    (80, 512, 6, 6, 51864): "base.en",
    (80, 512, 6, 6, 51865): "base",
    (80, 768, 12, 12, 51864): "small.en",
    (80, 768, 12, 12, 51865): "small",
    (80, 1024, 24, 24, 51864): "medium.en",
    (80, 1024, 24, 24, 51865): "medium",
    (80, 1280, 32, 32, 51865): "large-v2",  # large-v1 has the same shape: told apart by name
    (128, 1280, 32, 32, 51866): "large-v3",
    (128, 1280, 32, 4, 51866): "large-v3-turbo",
}


@dataclass
class Checkpoint:
    """A source read into MLX names: dims, float weights, and the alignment heads if known."""

    source_format: str
    dims: dict[str, int]
    weights: dict[str, mx.array]
    alignment_heads: np.ndarray | None
    name_hint: str = ""


# ---------------------------------------------------------------------------- alignment heads


def decode_alignment_heads(dump: bytes, n_layer: int, n_head: int) -> np.ndarray:
    """OpenAI's base85 mask -> (k, 2) int64 rows of (layer, head)."""
    mask = np.frombuffer(gzip.decompress(base64.b85decode(dump)), dtype=bool)
    return np.argwhere(mask.reshape(n_layer, n_head)).astype(np.int64)


def official_name(dims: dict[str, int], hint: str = "") -> str | None:
    """The official model size these dims are, using a file/dir name to break ties."""
    stem = hint.lower().removeprefix("whisper-").removesuffix(".pt")
    stem = OPENAI_ALIASES.get(stem, stem)
    key = tuple(dims[k] for k in ("n_mels", "n_audio_state", "n_audio_layer", "n_text_layer"))
    name = _OFFICIAL_DIMS.get((*key, dims["n_vocab"]))  # type: ignore[arg-type]
    if name == "large-v2" and "v1" in stem:
        return "large-v1"
    return name


def _as_heads(value: Any, dims: dict[str, int]) -> np.ndarray:
    try:
        heads = np.asarray(value, dtype=np.int64).reshape(-1, 2)
    except (TypeError, ValueError) as exc:
        raise ConversionError(
            f"alignment_heads must be [layer, head] pairs, got {value!r}"
        ) from exc
    bad = (heads[:, 0] >= dims["n_text_layer"]) | (heads[:, 1] >= dims["n_text_head"])
    if (heads < 0).any() or bad.any():
        raise ConversionError(
            f"alignment_heads {heads.tolist()} do not fit {dims['n_text_layer']} decoder layers "
            f"x {dims['n_text_head']} heads"
        )
    return heads


def resolve_alignment_heads(ckpt: Checkpoint) -> tuple[np.ndarray | None, str]:
    """The source's own heads, else OpenAI's table for an official size, else none (default)."""
    if ckpt.alignment_heads is not None and len(ckpt.alignment_heads):
        return _as_heads(ckpt.alignment_heads, ckpt.dims), "source"
    name = official_name(ckpt.dims, ckpt.name_hint)
    if name is not None:
        dims = ckpt.dims
        heads = decode_alignment_heads(
            OPENAI_ALIGNMENT_HEADS[name], dims["n_text_layer"], dims["n_text_head"]
        )
        return heads, f"openai:{name}"
    return None, "default (last half of the decoder layers)"


# ---------------------------------------------------------------------------- common helpers


def _to_mx(array: Any) -> mx.array:
    """numpy (any float/int) or mx array -> mx array."""
    return array if isinstance(array, mx.array) else mx.array(np.ascontiguousarray(array))


def _conv_to_mlx(name: str, value: mx.array) -> mx.array:
    """PyTorch/CTranslate2 conv kernels are (out, in, k); MLX wants (out, k, in)."""
    if re.fullmatch(r"encoder\.conv[12]\.weight", name) and value.ndim == 3:
        return value.transpose(0, 2, 1)
    return value


def _expected_shapes(dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    from mlx.utils import tree_flatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**dims), mx.float32)
    params = dict(tree_flatten(model.parameters()))
    params.pop("alignment_heads", None)
    return {name: tuple(value.shape) for name, value in params.items()}


def _check_complete(ckpt: Checkpoint) -> None:
    expected = _expected_shapes(ckpt.dims)
    missing = sorted(set(expected) - set(ckpt.weights))
    extra = sorted(set(ckpt.weights) - set(expected))
    wrong = [
        f"{name} {tuple(ckpt.weights[name].shape)} (expected {shape})"
        for name, shape in expected.items()
        if name in ckpt.weights and tuple(ckpt.weights[name].shape) != shape
    ]
    if missing or extra or wrong:
        parts = [
            f"missing {', '.join(missing[:8])}" if missing else "",
            f"unexpected {', '.join(extra[:8])}" if extra else "",
            f"wrong shape {', '.join(wrong[:8])}" if wrong else "",
        ]
        detail = "; ".join(p for p in parts if p)
        raise ConversionError(f"{ckpt.source_format} checkpoint does not match Whisper: {detail}")


def _int(config: dict[str, Any], key: str, where: str) -> int:
    if key not in config:
        raise ConversionError(f"{where} has no {key!r}")
    return int(config[key])


# ---------------------------------------------------------------------------- Hugging Face

_HF_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^(encoder|decoder)\.layers\.", r"\1.blocks."),
    (r"\.self_attn_layer_norm\.", ".attn_ln."),
    (r"\.encoder_attn_layer_norm\.", ".cross_attn_ln."),
    (r"\.final_layer_norm\.", ".mlp_ln."),
    (r"\.self_attn\.", ".attn."),
    (r"\.encoder_attn\.", ".cross_attn."),
    (r"\.q_proj\.", ".query."),
    (r"\.k_proj\.", ".key."),
    (r"\.v_proj\.", ".value."),
    (r"\.out_proj\.", ".out."),
    (r"\.fc1\.", ".mlp1."),
    (r"\.fc2\.", ".mlp2."),
    (r"^encoder\.layer_norm\.", "encoder.ln_post."),
    (r"^decoder\.layer_norm\.", "decoder.ln."),
    (r"^decoder\.embed_tokens\.", "decoder.token_embedding."),
    (r"^decoder\.embed_positions\.weight$", "decoder.positional_embedding"),
)
# Computed by mlx-whisper (encoder sinusoids) or tied to the token embedding (proj_out).
_HF_DROPPED = ("encoder.embed_positions.weight", "proj_out.weight")


def hf_to_mlx_name(name: str) -> str | None:
    """A transformers Whisper parameter name -> mlx-whisper's, or None when it is not stored."""
    name = name.removeprefix("model.")
    if name in _HF_DROPPED:
        return None
    for pattern, replacement in _HF_RENAMES:
        name = re.sub(pattern, replacement, name)
    return name


def _hf_dims(config: dict[str, Any], where: str) -> dict[str, int]:
    d_model = _int(config, "d_model", where)
    for key in ("encoder_ffn_dim", "decoder_ffn_dim"):
        if int(config.get(key, 4 * d_model)) != 4 * d_model:
            raise ConversionError(f"{where}: {key} must be 4 x d_model for mlx-whisper")
    if config.get("scale_embedding"):
        raise ConversionError(f"{where}: scale_embedding is not supported by mlx-whisper")
    return {
        "n_mels": _int(config, "num_mel_bins", where),
        "n_audio_ctx": _int(config, "max_source_positions", where),
        "n_audio_state": d_model,
        "n_audio_head": _int(config, "encoder_attention_heads", where),
        "n_audio_layer": _int(config, "encoder_layers", where),
        "n_vocab": _int(config, "vocab_size", where),
        "n_text_ctx": _int(config, "max_target_positions", where),
        "n_text_state": d_model,
        "n_text_head": _int(config, "decoder_attention_heads", where),
        "n_text_layer": _int(config, "decoder_layers", where),
    }


def _hf_weight_files(source: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = source / index_name
        if index.is_file():
            shards = sorted(set((read_source_json(index) or {})["weight_map"].values()))
            missing = [s for s in shards if not (source / s).is_file()]
            if missing:
                raise ConversionError(f"{source}: missing weight shards {', '.join(missing)}")
            return [source / s for s in shards]
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (source / name).is_file():
            return [source / name]
    raise ConversionError(
        f"{source} is a Hugging Face Whisper directory without weights: "
        "expected model.safetensors (or pytorch_model.bin)"
    )


def _load_torch_state(path: Path) -> dict[str, Any]:
    import torch  # only the .bin/.pt formats need torch

    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many kinds for a foreign file
        raise ConversionError(f"{path} is not a readable torch checkpoint: {exc}") from exc


def _torch_to_mx(tensor: Any) -> mx.array:
    import torch

    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        return mx.array(tensor.float().numpy()).astype(mx.bfloat16)
    return mx.array(tensor.numpy())


def _read_weight_file(path: Path) -> dict[str, mx.array]:
    if path.suffix == ".safetensors":
        return dict(mx.load(str(path)).items())  # type: ignore[union-attr]
    state = _load_torch_state(path)
    return {k: _torch_to_mx(v) for k, v in state.items() if hasattr(v, "detach")}


def read_hf(source: Path) -> Checkpoint:
    where = str(source / "config.json")
    config = read_source_json(source / "config.json") or {}
    dims = _hf_dims(config, where)
    weights: dict[str, mx.array] = {}
    for path in _hf_weight_files(source):
        for name, value in _read_weight_file(path).items():
            mlx_name = hf_to_mlx_name(name)
            if mlx_name is not None:
                weights[mlx_name] = _conv_to_mlx(mlx_name, value)
    generation = read_source_json(source / "generation_config.json") or {}
    heads = generation.get("alignment_heads")
    heads_array = None if heads is None else _as_heads(heads, dims)
    hint = str(config.get("_name_or_path") or source.name).rsplit("/", 1)[-1]
    return Checkpoint("hf", dims, weights, heads_array, hint)


# ---------------------------------------------------------------------------- OpenAI .pt


def openai_to_mlx_name(name: str) -> str | None:
    if name in ("encoder.positional_embedding", "alignment_heads"):
        return None
    return name.replace(".mlp.0.", ".mlp1.").replace(".mlp.2.", ".mlp2.")


def read_openai_pt(path: Path) -> Checkpoint:
    checkpoint = _load_torch_state(path)
    if not isinstance(checkpoint, dict) or not {"dims", "model_state_dict"} <= set(checkpoint):
        keys = sorted(checkpoint)[:6] if isinstance(checkpoint, dict) else type(checkpoint)
        raise ConversionError(
            f"{path} is not an OpenAI Whisper checkpoint: expected a dict with 'dims' and "
            f"'model_state_dict', found {keys}"
        )
    raw_dims = dict(checkpoint["dims"])
    missing = [k for k in DIM_FIELDS if k not in raw_dims]
    if missing:
        raise ConversionError(f"{path}: 'dims' lacks {', '.join(missing)}")
    dims = {k: int(raw_dims[k]) for k in DIM_FIELDS}
    weights = {}
    for name, tensor in checkpoint["model_state_dict"].items():
        mlx_name = openai_to_mlx_name(name)
        if mlx_name is not None:
            weights[mlx_name] = _conv_to_mlx(mlx_name, _torch_to_mx(tensor))
    return Checkpoint("openai-pt", dims, weights, None, path.name)


# ---------------------------------------------------------------------------- CTranslate2

_CT2_DTYPES: dict[int, np.dtype] = {
    0: np.dtype("<f4"),
    1: np.dtype("i1"),
    2: np.dtype("<i2"),
    3: np.dtype("<i4"),
    4: np.dtype("<f2"),
    5: np.dtype("<u2"),  # bfloat16 bits
}


@dataclass
class Ct2Variable:
    name: str
    shape: tuple[int, ...]
    dtype_code: int
    offset: int


class _Reader:
    def __init__(self, handle: BinaryIO, path: Path) -> None:
        self.handle, self.path = handle, path

    def unpack(self, fmt: str) -> tuple[int, ...]:
        size = struct.calcsize("<" + fmt)
        data = self.handle.read(size)
        if len(data) != size:
            raise ConversionError(f"{self.path} is truncated (CTranslate2 header cut short)")
        return struct.unpack("<" + fmt, data)

    def string(self) -> str:
        (length,) = self.unpack("H")
        return self.handle.read(length).rstrip(b"\0").decode("utf-8", "replace")


def read_ct2_header(path: Path) -> tuple[str, dict[str, Ct2Variable], dict[str, str]]:
    """Spec name, variables (with file offsets) and aliases of a CTranslate2 model.bin."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        reader = _Reader(handle, path)
        (version,) = reader.unpack("I")
        if version not in (5, 6):
            raise ConversionError(f"{path}: unsupported CTranslate2 model.bin version {version}")
        spec = reader.string()
        reader.unpack("I")  # spec revision
        (count,) = reader.unpack("I")
        variables = {}
        for _ in range(count):
            var = _read_variable(reader)
            variables[var.name] = var
        (n_aliases,) = reader.unpack("I")
        aliases = {reader.string(): reader.string() for _ in range(n_aliases)}
        if handle.tell() > size:
            raise ConversionError(f"{path} is truncated")
    return spec, variables, aliases


def _nbytes(var: Ct2Variable) -> int:
    return int(np.prod(var.shape, dtype=np.int64)) * _CT2_DTYPES[var.dtype_code].itemsize


def _read_variable(reader: _Reader) -> Ct2Variable:
    name = reader.string()
    (rank,) = reader.unpack("B")
    shape = reader.unpack("I" * rank) if rank else ()
    dtype_code, nbytes = reader.unpack("BI")
    if dtype_code not in _CT2_DTYPES:
        raise ConversionError(f"{reader.path}: {name} has unsupported dtype code {dtype_code}")
    var = Ct2Variable(name, tuple(shape), dtype_code, reader.handle.tell())
    if _nbytes(var) != nbytes:
        raise ConversionError(f"{reader.path}: {name} size {nbytes} does not match its shape")
    reader.handle.seek(nbytes, 1)
    return var


def _ct2_array(path: Path, var: Ct2Variable) -> np.ndarray:
    dtype = _CT2_DTYPES[var.dtype_code]
    data = np.fromfile(path, dtype=dtype, count=_nbytes(var) // dtype.itemsize, offset=var.offset)
    data = data.reshape(var.shape)
    if var.dtype_code == 5:
        return (data.astype(np.uint32) << 16).view(np.float32)
    return data


class _Ct2Tensors:
    """Lazy access to model.bin tensors by name (aliases resolved, int8/int16 dequantized)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.spec, self.variables, self.aliases = read_ct2_header(path)

    def __contains__(self, name: str) -> bool:
        return self.aliases.get(name, name) in self.variables

    def __getitem__(self, name: str) -> np.ndarray:
        name = self.aliases.get(name, name)
        if name not in self.variables:
            raise ConversionError(f"{self.path} has no variable {name!r}")
        data = _ct2_array(self.path, self.variables[name])
        scale_name = f"{name}_scale"
        if data.dtype.kind == "i" and scale_name in self.variables:
            scale = _ct2_array(self.path, self.variables[scale_name]).astype(np.float32)
            scale = scale.reshape(-1, *([1] * (data.ndim - 1)))
            return data.astype(np.float32) / scale
        return data

    def scalar(self, name: str) -> int:
        return int(self[name].reshape(-1)[0])

    def count_layers(self, prefix: str) -> int:
        pattern = re.compile(rf"^{prefix}/layer_(\d+)/")
        found = {int(m.group(1)) for n in self.variables if (m := pattern.match(n))}
        return max(found) + 1 if found else 0


def _split(array: np.ndarray, parts: int) -> list[np.ndarray]:
    return np.split(array, parts, axis=0)


def _ct2_linear(t: _Ct2Tensors, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.weight", t[f"{src}/weight"]
    yield f"{dst}.bias", t[f"{src}/bias"]


def _ct2_norm(t: _Ct2Tensors, src: str, dst: str) -> Iterator[tuple[str, np.ndarray]]:
    yield f"{dst}.weight", t[f"{src}/gamma"]
    yield f"{dst}.bias", t[f"{src}/beta"]


def _ct2_fused(
    t: _Ct2Tensors, src: str, dst: str, names: tuple[str, ...]
) -> Iterator[tuple[str, np.ndarray]]:
    """A fused [q;k;v] or [k;v] linear, split; the key projection has no bias in Whisper."""
    weights = _split(t[f"{src}/weight"], len(names))
    biases = _split(t[f"{src}/bias"], len(names))
    for name, weight, bias in zip(names, weights, biases, strict=True):
        yield f"{dst}.{name}.weight", weight
        if name != "key":
            yield f"{dst}.{name}.bias", bias


def _ct2_block(t: _Ct2Tensors, side: str, i: int) -> Iterator[tuple[str, np.ndarray]]:
    src, dst = f"{side}/layer_{i}", f"{side}.blocks.{i}"
    yield from _ct2_norm(t, f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
    qkv = ("query", "key", "value")
    yield from _ct2_fused(t, f"{src}/self_attention/linear_0", f"{dst}.attn", qkv)
    yield from _ct2_linear(t, f"{src}/self_attention/linear_1", f"{dst}.attn.out")
    if side == "decoder":
        cross = f"{src}/attention"
        yield from _ct2_norm(t, f"{cross}/layer_norm", f"{dst}.cross_attn_ln")
        yield from _ct2_linear(t, f"{cross}/linear_0", f"{dst}.cross_attn.query")
        yield from _ct2_fused(t, f"{cross}/linear_1", f"{dst}.cross_attn", ("key", "value"))
        yield from _ct2_linear(t, f"{cross}/linear_2", f"{dst}.cross_attn.out")
    yield from _ct2_norm(t, f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
    yield from _ct2_linear(t, f"{src}/ffn/linear_0", f"{dst}.mlp1")
    yield from _ct2_linear(t, f"{src}/ffn/linear_1", f"{dst}.mlp2")


def _ct2_weights(t: _Ct2Tensors, dims: dict[str, int]) -> Iterator[tuple[str, np.ndarray]]:
    for conv in ("conv1", "conv2"):
        yield f"encoder.{conv}.weight", t[f"encoder/{conv}/weight"]
        yield f"encoder.{conv}.bias", t[f"encoder/{conv}/bias"]
    for i in range(dims["n_audio_layer"]):
        yield from _ct2_block(t, "encoder", i)
    yield from _ct2_norm(t, "encoder/layer_norm", "encoder.ln_post")
    yield "decoder.token_embedding.weight", t["decoder/embeddings/weight"]
    yield "decoder.positional_embedding", t["decoder/position_encodings/encodings"]
    for i in range(dims["n_text_layer"]):
        yield from _ct2_block(t, "decoder", i)
    yield from _ct2_norm(t, "decoder/layer_norm", "decoder.ln")


def _ct2_dims(t: _Ct2Tensors) -> dict[str, int]:
    conv1 = t.variables["encoder/conv1/weight"].shape  # (out, n_mels, 3)
    embed = t.variables[t.aliases.get(n := "decoder/embeddings/weight", n)].shape
    positions = t.variables.get("encoder/position_encodings/encodings")
    return {
        "n_mels": conv1[1],
        "n_audio_ctx": positions.shape[0] if positions else 1500,
        "n_audio_state": conv1[0],
        "n_audio_head": t.scalar("encoder/num_heads"),
        "n_audio_layer": t.count_layers("encoder"),
        "n_vocab": embed[0],
        "n_text_ctx": t.variables["decoder/position_encodings/encodings"].shape[0],
        "n_text_state": embed[1],
        "n_text_head": t.scalar("decoder/num_heads"),
        "n_text_layer": t.count_layers("decoder"),
    }


def read_ct2(source: Path, model_bin: Path | None = None) -> Checkpoint:
    model_bin = model_bin or source / "model.bin"
    if not model_bin.is_file():
        raise ConversionError(f"{source} looks like a CTranslate2 directory but has no model.bin")
    tensors = _Ct2Tensors(model_bin)
    if tensors.spec != "WhisperSpec":
        raise ConversionError(
            f"{model_bin} is a CTranslate2 {tensors.spec or 'unknown'} model, not Whisper"
        )
    dims = _ct2_dims(tensors)
    weights = {name: _to_mx(value) for name, value in _ct2_weights(tensors, dims)}
    weights = {name: _conv_to_mlx(name, value) for name, value in weights.items()}
    config = read_source_json(source / "config.json") or {}
    heads = config.get("alignment_heads")
    heads_array = None if heads is None else _as_heads(heads, dims)
    return Checkpoint("ct2", dims, weights, heads_array, source.name)


# ---------------------------------------------------------------------------- detection


def _is_ct2_bin(path: Path) -> bool:
    """A CTranslate2 model.bin: u32 version, then the spec name (e.g. "WhisperSpec")."""
    if not path.is_file():
        return False
    with path.open("rb") as handle:
        head = handle.read(6 + 64)
    if len(head) < 6:
        return False
    version, length = struct.unpack("<IH", head[:6])
    name = head[6 : 6 + length].rstrip(b"\0")
    return 1 <= version <= 16 and 0 < length <= 64 and name.endswith(b"Spec")


def read_checkpoint(source: Path) -> Checkpoint:
    """Detect the format of `source` and read it into MLX names."""
    source = Path(source).expanduser()
    if not source.exists():
        raise ConversionError(f"{source} does not exist")
    if source.is_file():
        if _is_ct2_bin(source):  # a CTranslate2 model.bin given directly
            return read_ct2(source.parent, source)
        return read_openai_pt(source)
    config = read_source_json(source / "config.json")
    if (source / "model.bin").is_file() and _is_ct2_bin(source / "model.bin"):
        return read_ct2(source)
    if config is None:
        raise ConversionError(
            f"{source} is not a Whisper checkpoint: no config.json (Hugging Face or CTranslate2) "
            "and no model.bin; pass a directory or an OpenAI .pt file"
        )
    model_type = config.get("model_type")
    if model_type == "whisper":
        return read_hf(source)
    if model_type is None and {"alignment_heads", "lang_ids", "suppress_ids"} & set(config):
        return read_ct2(source)  # names the missing model.bin
    if "n_audio_state" in config:
        raise ConversionError(f"{source} is already an mlx-whisper model; nothing to convert")
    raise ConversionError(
        f"{source} is not a Whisper model (config.json model_type={model_type!r}); "
        "expected a Hugging Face Whisper, CTranslate2 Whisper or OpenAI .pt checkpoint"
    )


# ---------------------------------------------------------------------------- writing


def _check_options(quantization: int | None, group_size: int, dtype: str) -> mx.Dtype:
    check_options(quantization, group_size, dtype)
    return getattr(mx, dtype)


def _cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        name: value.astype(dtype) if mx.issubdtype(value.dtype, mx.floating) else value
        for name, value in weights.items()
    }


def quantizable(group_size: int) -> Callable[[str, Any], bool]:
    """Linear and Embedding layers whose input dimension splits into whole groups."""
    import mlx.nn as nn

    def predicate(_path: str, module: Any) -> bool:
        kinds = (nn.Linear, nn.Embedding)
        return isinstance(module, kinds) and module.weight.shape[-1] % group_size == 0

    return predicate


def _quantize(
    weights: dict[str, mx.array], dims: dict[str, int], dtype: mx.Dtype, bits: int, group: int
) -> dict[str, mx.array]:
    import mlx.nn as nn
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_whisper.whisper import ModelDimensions, Whisper

    model = Whisper(ModelDimensions(**dims), dtype)
    model.update(tree_unflatten(list(weights.items())))
    nn.quantize(model, group_size=group, bits=bits, class_predicate=quantizable(group))
    return dict(tree_flatten(model.parameters()))


def convert(
    source: str | Path,
    dest: str | Path,
    *,
    quantization: int | None = None,
    group_size: int = 64,
    dtype: str = "float16",
) -> dict[str, Any]:
    """Write an mlx-whisper model directory at `dest`; return the manifest fields."""
    target_dtype = _check_options(quantization, group_size, dtype)
    with stage("read"):
        ckpt = read_checkpoint(Path(source))
    _check_complete(ckpt)
    heads, heads_source = resolve_alignment_heads(ckpt)
    weights = _cast(ckpt.weights, target_dtype)
    if heads is not None:
        weights["alignment_heads"] = mx.array(heads)
    if quantization is not None:
        weights = _quantize(weights, ckpt.dims, target_dtype, quantization, group_size)
    quant = None if quantization is None else {"group_size": group_size, "bits": quantization}
    _write(Path(dest), ckpt.dims, weights, quant)
    n_heads = len(heads) if heads is not None else _default_head_count(ckpt.dims)
    return {
        "source_format": ckpt.source_format,
        "dtype": dtype,
        "quantization": None if quant is None else {"bits": quantization, "group_size": group_size},
        "n_mels": ckpt.dims["n_mels"],
        "n_vocab": ckpt.dims["n_vocab"],
        "multilingual": ckpt.dims["n_vocab"] >= 51865,
        "alignment_heads": n_heads,
        "alignment_heads_source": heads_source,
    }


def _default_head_count(dims: dict[str, int]) -> int:
    return (dims["n_text_layer"] - dims["n_text_layer"] // 2) * dims["n_text_head"]


def _write(
    dest: Path, dims: dict[str, int], weights: dict[str, mx.array], quant: dict[str, int] | None
) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {"model_type": "whisper", **dims}
    if quant is not None:
        config["quantization"] = quant
    with stage("cast, quantize and write" if quant else "cast and write"):
        mx.eval(weights)
        mx.save_safetensors(str(dest / WEIGHTS), weights, metadata={"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


# ---------------------------------------------------------------------------- smoke test


# ---------------------------------------------------------------------------- CLI
