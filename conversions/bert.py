"""BERT-family text embedders (bge, MiniLM, XLM-RoBERTa) -> the MLX layout mlx-embeddings loads.

Source: a local Hugging Face directory (config.json with model_type bert or xlm-roberta,
model*.safetensors or pytorch_model*.bin, tokenizer files, optional sentence-transformers
modules.json and 1_Pooling/config.json).

Output (what `engine.embeddings.runner.EmbeddingsRunner.load` reads):
  config.json        the source config plus `mlxd_pooling`, `mlxd_normalize`, `torch_dtype` and,
                     when quantized, `quantization: {group_size, bits}` (mlx-embeddings' key)
  model.safetensors  weights in the chosen dtype; quantized layers as weight/scales/biases
  tokenizer files    tokenizer.json, vocab.txt, tokenizer_config.json (model_max_length kept), ...
  1_Pooling/         sentence-transformers' pooling config, kept for reference

The pooling is written into config.json so the service never falls back to a default: bge is
CLS-pooled, MiniLM mean-pooled; a source without a pooling config gets CLS (bge's).

    python -m conversions.bert SOURCE DEST [-q 4|8] [--group-size N] [--dtype D]
"""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten

from conversions.common import ConversionError, check_options, read_source_json
from conversions.progress import progress, stage
from engine.jsonfile import write_json

CONVERTER_VERSION = "1"

POOLINGS = ("cls", "mean", "last")
# model_type -> mlx_embeddings.models module, and the prefix task-head checkpoints put on keys.
ARCHITECTURES = {"bert": ("bert", "bert."), "xlm-roberta": ("xlm_roberta", "roberta.")}
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "sentencepiece.bpe.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
)
VOCAB_FILES = ("tokenizer.json", "vocab.txt", "sentencepiece.bpe.model")
HEAD_PREFIXES = ("cls.", "lm_head.", "classifier.", "qa_outputs.")
ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
# Embedding tables other than the vocabulary stay unquantized: small, and sensitive.
UNQUANTIZED = ("embeddings.position_embeddings", "embeddings.token_type_embeddings")


# ----------------------------------------------------------------------------- source checks


def read_source_config(source: Path) -> dict[str, Any]:
    """config.json of a supported BERT-family directory, or ConversionError saying why not."""
    if not source.is_dir():
        raise ConversionError(f"{source} is not a directory (expected a Hugging Face model dir)")
    path = source / "config.json"
    if not path.is_file():
        raise ConversionError(f"{source} is not a Hugging Face model directory: no config.json")
    config = read_source_json(path) or {}
    model_type = str(config.get("model_type", "")).replace("_", "-")
    if model_type not in ARCHITECTURES:
        raise ConversionError(
            f"unsupported architecture: {source} has model_type {config.get('model_type')!r}; "
            f"this converter handles BERT-family embedders ({', '.join(ARCHITECTURES)})"
        )
    config["model_type"] = model_type
    return config


def weight_files(source: Path) -> list[Path]:
    files = sorted(source.glob("model*.safetensors")) or sorted(source.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError(
            f"no weights in {source}: expected model.safetensors (or model-*-of-*.safetensors) "
            "or pytorch_model.bin"
        )
    return files


def check_tokenizer(source: Path) -> None:
    if not any((source / name).is_file() for name in VOCAB_FILES):
        raise ConversionError(
            f"no tokenizer in {source}: expected {' or '.join(VOCAB_FILES)} "
            "(plus tokenizer_config.json and special_tokens_map.json)"
        )


# ----------------------------------------------------------------------------- pooling


def source_pooling(source: Path) -> str:
    """The pooling sentence-transformers' files name; CLS (bge's) when there are none.

    Normalisation is not read from modules.json: bge ships no Normalize module although it is
    meant to be used normalised, and OpenAI-style clients expect unit vectors, so `convert`
    normalises unless told otherwise.
    """
    modules = read_source_json(source / "modules.json") or []
    pooling_dir = _pooling_dir(source, modules)
    st = read_source_json(pooling_dir / "config.json") if pooling_dir else None
    return _pooling_mode(st, pooling_dir) if st and pooling_dir else "cls"


def _pooling_dir(source: Path, modules: list[dict[str, Any]]) -> Path | None:
    for module in modules:
        if str(module.get("type", "")).endswith(".Pooling"):
            return source / str(module.get("path", "1_Pooling"))
    default = source / "1_Pooling"
    return default if default.is_dir() else None


def _pooling_mode(st: dict[str, Any], pooling_dir: Path) -> str:
    if isinstance(st.get("pooling_mode"), str):
        modes = [st["pooling_mode"]]
    else:
        modes = [mode for key, mode in ST_POOLING_KEYS.items() if st.get(key)]
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise ConversionError(
            f"unsupported sentence-transformers pooling {modes or 'none'} in "
            f"{pooling_dir}/config.json: mlxd serves one of {', '.join(POOLINGS)} "
            "(pass --pooling to override)"
        )
    return modes[0]


# ----------------------------------------------------------------------------- weights


def load_weights(files: list[Path]) -> dict[str, mx.array]:
    weights: dict[str, mx.array] = {}
    with progress("read", len(files), unit="files") as bar:
        for path in files:
            try:
                weights.update(_load_torch(path) if path.suffix == ".bin" else mx.load(str(path)))
            except (OSError, RuntimeError, ValueError) as exc:
                raise ConversionError(f"cannot read weights from {path}: {exc}") from exc
            bar.update()
    return weights


def _load_torch(path: Path) -> dict[str, mx.array]:
    try:
        import torch
    except ImportError as exc:
        raise ConversionError(
            f"{path.name} is a PyTorch checkpoint and torch is not installed: "
            "install torch or convert from model.safetensors"
        ) from exc
    state = torch.load(path, map_location="cpu", weights_only=True)
    out = {}
    for key, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        out[key] = mx.array(tensor.numpy())
    return out


def sanitize(weights: dict[str, mx.array], model_type: str) -> dict[str, mx.array]:
    """Keys as mlx-embeddings names them: no task heads, no model prefix, no buffers."""
    prefix = ARCHITECTURES[model_type][1]
    out = {}
    for key, value in weights.items():
        if key.startswith(HEAD_PREFIXES) or key.endswith("position_ids"):
            continue
        key = key.removeprefix(prefix)
        key = key.replace("LayerNorm.gamma", "LayerNorm.weight")
        out[key.replace("LayerNorm.beta", "LayerNorm.bias")] = value
    return out


def expected_shapes(config: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the mlx-embeddings model for `config`."""
    module = importlib.import_module(
        f"mlx_embeddings.models.{ARCHITECTURES[config['model_type']][0]}"
    )
    model = module.Model(module.ModelArgs.from_dict(config))
    return {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}


def match_expected(
    weights: dict[str, mx.array], config: dict[str, Any], source: Path
) -> dict[str, mx.array]:
    """Check names and shapes against the model; fill a missing pooler (unused by mlxd)."""
    expected = expected_shapes(config)
    missing = sorted(set(expected) - set(weights))
    for key in [k for k in missing if k.startswith("pooler.")]:
        weights[key] = mx.zeros(expected[key])
        missing.remove(key)
    unexpected = sorted(set(weights) - set(expected))
    wrong = [k for k in expected if k in weights and tuple(weights[k].shape) != expected[k]]
    problems = [f"missing {k}" for k in missing[:5]] + [f"unexpected {k}" for k in unexpected[:5]]
    problems += [f"{k} has shape {tuple(weights[k].shape)}, not {expected[k]}" for k in wrong[:5]]
    if problems:
        raise ConversionError(
            f"weights in {source} do not match its config.json: {'; '.join(problems)}"
        )
    return weights


def cast(weights: dict[str, mx.array], dtype: mx.Dtype) -> dict[str, mx.array]:
    return {
        k: v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v for k, v in weights.items()
    }


def quantizable(key: str, value: mx.array, group_size: int) -> bool:
    """2-D weights of Linear layers and the vocabulary table, as mlx-embeddings' loader will
    rebuild them (it quantizes a module when `<path>.scales` exists and its size is a multiple
    of 64)."""
    if not key.endswith(".weight") or value.ndim != 2 or key.startswith(UNQUANTIZED):
        return False
    if "LayerNorm" in key:
        return False
    return value.shape[-1] % group_size == 0 and value.size % 64 == 0


def quantize(weights: dict[str, mx.array], bits: int, group_size: int) -> dict[str, mx.array]:
    out: dict[str, mx.array] = {}
    count = 0
    with progress("quantize", len(weights)) as bar:
        for key, value in weights.items():
            bar.update()
            if not quantizable(key, value, group_size):
                out[key] = value
                continue
            base = key.removesuffix(".weight")
            # MLX's CPU quantize is several times faster on float32 and gives the same result;
            # scales and biases keep the weights' dtype, as mlx-embeddings' converter writes.
            wq, scales, biases = mx.quantize(value.astype(mx.float32), group_size, bits)
            out[key] = wq
            out[f"{base}.scales"] = scales.astype(value.dtype)
            out[f"{base}.biases"] = biases.astype(value.dtype)
            mx.eval(wq, out[f"{base}.scales"], out[f"{base}.biases"])
            count += 1
    if count == 0:
        raise ConversionError(
            f"no layer can be quantized with group size {group_size}: "
            "weights' last dimensions are not multiples of it"
        )
    return out


# ----------------------------------------------------------------------------- tokenizer


def copy_tokenizer(source: Path, dest: Path, limit: int) -> int:
    """Copy the tokenizer files; return the token limit: model_max_length when it is set and
    within `limit` (bge's 512 is kept), else `limit`, which is then written."""
    for name in TOKENIZER_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    path = dest / "tokenizer_config.json"
    tok_config = read_source_json(path) or {}
    max_length = tok_config.get("model_max_length")
    if not isinstance(max_length, int) or not 0 < max_length <= limit:
        tok_config["model_max_length"] = limit
        write_json(path, tok_config)
    return int(tok_config["model_max_length"])


def position_limit(config: dict[str, Any]) -> int:
    """Tokens the position table allows (RoBERTa-style positions start after the pad id)."""
    limit = int(config.get("max_position_embeddings", 512))
    if config["model_type"] == "xlm-roberta":
        limit -= int(config.get("pad_token_id", 1)) + 1
    return limit


# ----------------------------------------------------------------------------- convert


def convert(
    source: str | Path,
    dest: str | Path,
    *,
    quantization: int | None = None,
    group_size: int = 64,
    dtype: str = "float16",
    pooling: str | None = None,
    normalize: bool = True,
) -> dict[str, Any]:
    """Convert a Hugging Face BERT-family embedder in `source` into `dest` (new or empty).

    `quantization` is 4 or 8 bits (affine, `group_size` per group) or None; `pooling`
    overrides the sentence-transformers config ("cls", "mean", "last"). Returns manifest fields.
    """
    source, dest = Path(source), Path(dest)
    _check_options(quantization, group_size, dtype, pooling)
    config = read_source_config(source)
    files = weight_files(source)
    check_tokenizer(source)
    pooling = pooling or source_pooling(source)
    _prepare_dest(source, dest)

    weights = match_expected(sanitize(load_weights(files), config["model_type"]), config, source)
    weights = cast(weights, getattr(mx, dtype))
    quant = None
    if quantization is not None:
        quant = {"group_size": group_size, "bits": quantization}
        weights = quantize(weights, quantization, group_size)
    with stage("write"):
        mx.save_safetensors(str(dest / "model.safetensors"), weights, metadata={"format": "mlx"})

    max_tokens = copy_tokenizer(source, dest, position_limit(config))
    _copy_pooling_dir(source, dest)
    _write_config(dest, config, dtype=dtype, quant=quant, pooling=pooling, normalize=normalize)
    return {
        "source_format": "hf",
        "dtype": dtype,
        "quantization": quant,
        "pooling": pooling,
        "normalize": normalize,
        "hidden_size": int(config["hidden_size"]),
        "max_tokens": max_tokens,
    }


def _check_options(
    quantization: int | None, group_size: int, dtype: str, pooling: str | None
) -> None:
    check_options(quantization, group_size, dtype)
    if pooling is not None and pooling not in POOLINGS:
        raise ConversionError(f"unsupported pooling {pooling!r}: use one of {', '.join(POOLINGS)}")


def _prepare_dest(source: Path, dest: Path) -> None:
    if dest.resolve() == source.resolve():
        raise ConversionError("destination must differ from the source directory")
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ConversionError(f"destination {dest} exists and is not an empty directory")
    dest.mkdir(parents=True, exist_ok=True)


def _copy_pooling_dir(source: Path, dest: Path) -> None:
    modules = read_source_json(source / "modules.json") or []
    pooling_dir = _pooling_dir(source, modules)
    if pooling_dir and pooling_dir.is_dir():
        shutil.copytree(pooling_dir, dest / "1_Pooling", dirs_exist_ok=True)


def _write_config(
    dest: Path,
    config: dict[str, Any],
    *,
    dtype: str,
    quant: dict[str, int] | None,
    pooling: str,
    normalize: bool,
) -> None:
    out = {k: v for k, v in config.items() if k not in ("quantization", "quantization_config")}
    out["torch_dtype"] = dtype
    if "dtype" in out:
        out["dtype"] = dtype
    if quant:
        out["quantization"] = quant
    out["mlxd_pooling"] = pooling
    out["mlxd_normalize"] = normalize
    write_json(dest / "config.json", out)


# ----------------------------------------------------------------------------- smoke test


# ----------------------------------------------------------------------------- CLI
