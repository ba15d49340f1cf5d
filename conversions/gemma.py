"""Gemma converters.

Sources, detected automatically:

* a Hugging Face directory of Gemma 4 (``model_type`` gemma4, vision-language): converted with
  mlx-vlm's own machinery (load, cast, quantize, save) into mlx-vlm's layout. The language model
  is quantized; the vision and audio towers and their embedders into the text space stay in
  ``dtype``;
* a GGUF file of a Gemma 3 text model (llama.cpp architecture ``gemma3``): every tensor is read
  and dequantized with the ``gguf`` package, renamed back to the Hugging Face names, and saved in
  mlx-lm's layout with a rebuilt tokenizer, a Gemma 3 chat template and a generation config;
* a Hugging Face directory of a Gemma text model (gemma3_text, gemma2, gemma): mlx-lm's converter.
"""

from __future__ import annotations

import re
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from conversions.common import ConversionError, check_options, read_source_json
from conversions.progress import progress, stage
from engine.jsonfile import write_json

CONVERTER_VERSION = "1"
GGUF_MAGIC = b"GGUF"
GGUF_ARCHITECTURES = ("gemma3",)
VLM_MODEL_TYPES = ("gemma4",)
TEXT_MODEL_TYPES = ("gemma3_text", "gemma2", "gemma")
# Modules that must stay precise in a quantized vision-language model: the encoders and the
# projections of their features into the text embedding space.
PRECISE_MODULES = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")
# Files a Hugging Face directory carries besides the weights and config.json.
SIDE_FILES = ("*.json", "*.jinja", "*.model", "*.txt")
SKIPPED_SIDE_FILES = ("config.json", "model.safetensors.index.json")
# The audio front end's settings in processor_config.json, kept as the source has them.
AUDIO_PROCESSOR_KEYS = ("feature_extractor", "audio_seq_length", "audio_ms_per_token")

# Gemma 3's turn format; the system prompt goes at the top of the first user turn.
GEMMA3_CHAT_TEMPLATE = """{{- bos_token -}}
{%- macro text_of(content) -%}
    {%- if content is string -%}
        {{- content | trim -}}
    {%- else -%}
        {%- for part in content -%}
            {%- if part['type'] == 'text' -%}{{- part['text'] | trim -}}{%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(system='') -%}
{%- set turns = messages -%}
{%- if messages and messages[0]['role'] in ['system', 'developer'] -%}
    {%- set ns.system = text_of(messages[0]['content']) + '\\n\\n' -%}
    {%- set turns = messages[1:] -%}
{%- endif -%}
{%- for message in turns -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- if role not in ['user', 'model'] -%}
        {{- raise_exception('Gemma 3 only knows user and assistant turns, not ' + role) -}}
    {%- endif -%}
    {%- if (role == 'user') != (loop.index0 % 2 == 0) -%}
        {{- raise_exception('Turns must alternate user/assistant/user/...') -}}
    {%- endif -%}
    {{- '<start_of_turn>' + role + '\\n' -}}
    {%- if loop.first -%}{{- ns.system -}}{%- endif -%}
    {{- text_of(message['content'] or '') -}}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
"""

# llama.cpp tensor names (after "blk.N.") -> Hugging Face names (after "model.layers.N.").
GGUF_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
GGUF_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
# float32 values dequantized at a time (16 MB).
BLOCK_ELEMENTS = 1 << 22
GGUF_LAYER_PATTERN = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


# ------------------------------------------------------------------------------- entry point


def convert(
    source: str | Path,
    dest: str | Path,
    *,
    quantization: int | None = 4,
    group_size: int = 64,
    dtype: str = "bfloat16",
) -> dict[str, Any]:
    """Convert ``source`` into ``dest`` (which must not exist yet); returns manifest fields."""
    source, dest = Path(source), Path(dest)
    check_options(quantization, group_size, dtype)
    if dest.exists() and any(dest.iterdir()):
        raise ConversionError(f"destination {dest} already exists and is not empty")
    kind, path = detect_source(source)
    converter = {"gguf": _convert_gguf, "hf-vlm": _convert_hf_vlm, "hf-text": _convert_hf_text}
    fields = converter[kind](path, dest, quantization, group_size, dtype)
    quant = None if quantization is None else {"bits": quantization, "group_size": group_size}
    return {"dtype": dtype, "quantization": quant, **fields}


def detect_source(source: Path) -> tuple[str, Path]:
    """("gguf" | "hf-vlm" | "hf-text", the path to read) for a GGUF file or an HF directory."""
    if not source.exists():
        raise ConversionError(f"source {source} does not exist")
    if source.is_file():
        if _is_gguf(source):
            return "gguf", source
        raise ConversionError(f"{source} is neither a GGUF file nor a model directory")
    config_path = source / "config.json"
    if not config_path.is_file():
        ggufs = sorted(p for p in source.glob("*.gguf") if _is_gguf(p))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise ConversionError(f"{source} has no config.json (and not exactly one .gguf file)")
    model_type = (read_source_json(config_path) or {}).get("model_type")
    if model_type in VLM_MODEL_TYPES:
        return "hf-vlm", source
    if model_type in TEXT_MODEL_TYPES:
        return "hf-text", source
    known = ", ".join(VLM_MODEL_TYPES + TEXT_MODEL_TYPES)
    raise ConversionError(f"{source} is model_type {model_type!r}, not a Gemma model ({known})")


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as handle:
        return handle.read(4) == GGUF_MAGIC


# ------------------------------------------------------------------ Gemma 4 (mlx-vlm layout)


def keep_precise(path: str) -> bool:
    """Whether a module stays in the float dtype (vision/audio encoders and embedders)."""
    from mlx_vlm.utils import skip_multimodal_module

    return skip_multimodal_module(path) or any(name in path for name in PRECISE_MODULES)


def _vlm_predicate(model: Any) -> Callable[[str, Any], bool | dict]:
    own = getattr(model, "quant_predicate", None)

    def predicate(path: str, module: Any) -> bool | dict:
        if keep_precise(path):
            return False
        return own(path, module) if own is not None else True

    return predicate


def _convert_hf_vlm(
    source: Path, dest: Path, quantization: int | None, group_size: int, dtype: str
) -> dict[str, Any]:
    from mlx_vlm.quant_utils import quantize_model
    from mlx_vlm.utils import fetch_from_hub, save_config, save_weights

    with stage("load"):
        model, config, processor = fetch_from_hub(source, lazy=True, trust_remote_code=False)
    _cast(model, dtype)
    if quantization is not None:  # lazy: the work happens as the weights are written
        model, config = quantize_model(
            model, config, group_size, quantization, quant_predicate=_vlm_predicate(model)
        )
    with stage("cast, quantize and write" if quantization else "cast and write"):
        save_weights(dest, model, donate_weights=True)
    _copy_side_files(source, dest)
    processor.save_pretrained(str(dest))
    _keep_audio_processor(source, dest)
    save_config(config, config_path=dest / "config.json")
    return {"source_format": "hf", "model_type": config.get("model_type")}


def _keep_audio_processor(source: Path, dest: Path) -> None:
    """Put the source's audio feature-extractor settings back into processor_config.json.

    mlx-vlm's processor writes its own stub there (num_mel_filters, fft_length, ...: names the
    extractor ignores), so without this a model whose front end is not the default one would be
    fed other features than it was trained on, and conversions that drop the block entirely
    leave a processor that ignores audio."""
    kept = _source_audio_processor(source)
    path = dest / "processor_config.json"
    if not kept or not path.is_file():
        return
    write_json(path, {**(read_source_json(path) or {}), **kept})


def _source_audio_processor(source: Path) -> dict[str, Any]:
    config = read_source_json(source / "processor_config.json") or {}
    kept = {key: config[key] for key in AUDIO_PROCESSOR_KEYS if key in config}
    if "feature_extractor" not in kept:  # a standalone feature-extractor config
        standalone = read_source_json(source / "preprocessor_config.json") or {}
        if "feature_extractor_type" in standalone:
            kept["feature_extractor"] = standalone
    return kept


def _cast(model: Any, dtype: str) -> None:
    import mlx.core as mx
    from mlx.utils import tree_map_with_path

    target = getattr(mx, dtype)
    allowed = getattr(model, "cast_predicate", lambda _: True)

    def cast(path: str, value: mx.array) -> mx.array:
        if allowed(path) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(target)
        return value

    model.update(tree_map_with_path(cast, model.parameters()))


def _copy_side_files(source: Path, dest: Path) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    for pattern in SIDE_FILES:
        for path in source.glob(pattern):
            if path.name not in SKIPPED_SIDE_FILES:
                shutil.copy2(path, dest / path.name)


# ------------------------------------------------------------- Gemma text (mlx-lm layout)


def _convert_hf_text(
    source: Path, dest: Path, quantization: int | None, group_size: int, dtype: str
) -> dict[str, Any]:
    from mlx_lm.convert import convert as lm_convert

    if dest.exists():
        dest.rmdir()  # mlx-lm refuses an existing destination; it was checked to be empty
    with stage("convert with mlx-lm"):
        lm_convert(
            str(source),
            mlx_path=str(dest),
            quantize=quantization is not None,
            q_group_size=group_size,
            q_bits=quantization,
            dtype=dtype,
        )
    _copy_side_files(source, dest)
    model_type = (read_source_json(dest / "config.json") or {}).get("model_type")
    return {"source_format": "hf", "model_type": model_type}


@dataclass(frozen=True)
class GGUFSource:
    reader: Any  # gguf.GGUFReader (memory-mapped)
    config: dict[str, Any]
    tokenizer_json: str
    tokenizer_fields: dict[str, Any]


def open_gguf(path: Path) -> GGUFSource:
    """Parse a GGUF file once: GGUFReader spends ~13 s on a 262k-token vocabulary."""
    stat = Path(path).stat()
    return _open_gguf(Path(path).resolve(), stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=1)
def _open_gguf(path: Path, size: int, mtime_ns: int) -> GGUFSource:
    import gguf

    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:
        raise ConversionError(f"{path} is not a readable GGUF file: {exc}") from exc
    config = gguf_config(reader)
    tokenizer_json, tokenizer_fields = _gguf_tokenizer(path, config)
    return GGUFSource(reader, config, tokenizer_json, tokenizer_fields)


def _convert_gguf(
    source: Path, dest: Path, quantization: int | None, group_size: int, dtype: str
) -> dict[str, Any]:
    parsed = open_gguf(source)
    reader, config = parsed.reader, dict(parsed.config)
    _write_gguf_tokenizer(parsed, dest)
    quant = None
    if quantization is not None:
        quant = {"group_size": group_size, "bits": quantization, "mode": "affine"}
    model = _lm_model(config, reader, dtype, quant)
    config["torch_dtype"] = dtype
    if quant is not None:  # what mlx-lm's quantize_model writes
        config.update(quantization=quant, quantization_config=quant)
    _save_lm_model(model, config, dest)
    return {
        "source_format": "gguf",
        "model_type": config["model_type"],
        "gguf_tensor_types": gguf_tensor_types(reader),
        "gguf_file_type": _field(reader, "general.file_type"),
    }


def gguf_tensor_types(reader: Any) -> dict[str, int]:
    """How many tensors of each GGML type the file holds, e.g. {"Q4_K": 27, ...}."""
    return dict(sorted(Counter(t.tensor_type.name for t in reader.tensors).items()))


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: Any) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in GGUF_ARCHITECTURES:
        raise ConversionError(
            f"GGUF architecture {arch!r} is not supported: this converter reads Gemma 3 text "
            f"models ({', '.join(GGUF_ARCHITECTURES)})"
        )
    return arch


def gguf_config(reader: Any) -> dict[str, Any]:
    """A Hugging Face gemma3_text config.json from the GGUF metadata."""
    arch = gguf_architecture(reader)

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden, heads = int(meta("embedding_length")), int(meta("attention.head_count"))
    layers = int(meta("block_count"))
    head_dim = int(meta("attention.key_length", hidden // heads))
    pattern = _sliding_pattern(meta("attention.sliding_window_pattern"), layers)
    tokens = _field(reader, "tokenizer.ggml.tokens") or []
    config = {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "hidden_size": hidden,
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": int(meta("attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(f"{meta('attention.layer_norm_rms_epsilon', 1e-6):.6g}"),
        "rope_theta": float(meta("rope.freq_base", 1_000_000.0)),
        "rope_local_base_freq": float(meta("rope.freq_base_swa", 10_000.0)),
        "rope_scaling": _rope_scaling(meta),
        "sliding_window": int(meta("attention.sliding_window", 512)),
        "sliding_window_pattern": pattern,
        "layer_types": [
            "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
            for i in range(layers)
        ],
        "max_position_embeddings": int(meta("context_length", 32768)),
        "query_pre_attn_scalar": _query_pre_attn_scalar(meta, hidden, heads, head_dim, layers),
        "vocab_size": len(tokens) or _embedding_rows(reader),
        "hidden_activation": "gelu_pytorch_tanh",
        "final_logit_softcapping": meta("final_logit_softcapping"),
        "attn_logit_softcapping": meta("attn_logit_softcapping"),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id", 2),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id", 0),
        "eos_token_id": _eos_ids(reader, tokens),
        "tie_word_embeddings": not any(t.name == "output.weight" for t in reader.tensors),
    }
    return config


def _sliding_pattern(value: Any, layers: int) -> int:
    """llama.cpp writes nothing (Gemma 3's fixed 6), a number, or one bool per layer."""
    if value is None:
        return 6
    if isinstance(value, list):
        full = [i for i, sliding in enumerate(value) if not sliding]
        return full[0] + 1 if full else layers + 1
    return int(value)


def _rope_scaling(meta: Callable[..., Any]) -> dict[str, Any] | None:
    kind, factor = meta("rope.scaling.type"), meta("rope.scaling.factor")
    if kind in (None, "none") or not factor:
        return None
    return {"rope_type": kind, "factor": float(factor)}


def _query_pre_attn_scalar(
    meta: Callable[..., Any], hidden: int, heads: int, head_dim: int, layers: int
) -> int:
    scale = meta("attention.scale")
    if scale:
        return round(float(scale) ** -2)
    # llama.cpp scales queries by 1/sqrt(hidden/heads) for the 27B (62 layers), else head_dim.
    return hidden // heads if layers == 62 else head_dim


def _embedding_rows(reader: Any) -> int:
    embd = next(t for t in reader.tensors if t.name == "token_embd.weight")
    return int(embd.shape[-1])


def _eos_ids(reader: Any, tokens: list[str]) -> list[int]:
    ids = [int(_field(reader, "tokenizer.ggml.eos_token_id", 1))]
    if "<end_of_turn>" in tokens:
        ids.append(tokens.index("<end_of_turn>"))
    return ids


def hf_tensor_name(gguf_name: str) -> str:
    """llama.cpp's tensor name -> the Hugging Face (and mlx-lm) name."""
    match = GGUF_LAYER_PATTERN.match(gguf_name)
    if match:
        layer, part, suffix = match.groups()
        if part in GGUF_LAYER_NAMES:
            return f"model.layers.{layer}.{GGUF_LAYER_NAMES[part]}.{suffix}"
    else:
        stem, _, suffix = gguf_name.rpartition(".")
        if stem in GGUF_GLOBAL_NAMES:
            return f"{GGUF_GLOBAL_NAMES[stem]}.{suffix}"
    raise ConversionError(f"GGUF tensor {gguf_name!r} has no Gemma 3 counterpart")


def gguf_rows(tensor: Any, name: str) -> Iterator[Any]:
    """The tensor in float32 numpy blocks of rows, in its Hugging Face shape (RMSNorm weights
    back from 1+w to w): a block at a time keeps the dequantizer's temporaries small."""
    from gguf.quants import dequantize as gguf_dequantize

    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    data, kind = tensor.data, tensor.tensor_type
    step = max(1, BLOCK_ELEMENTS // shape[-1]) if len(shape) == 2 else len(data)
    for start in range(0, len(data), step):
        try:
            values = gguf_dequantize(data[start : start + step], kind)
        except NotImplementedError as exc:
            raise ConversionError(
                f"GGUF tensor {tensor.name} is {kind.name}, a type the gguf package cannot "
                f"dequantize; convert from a file with another quantization"
            ) from exc
        values = values.astype("float32", copy=False).reshape(-1, *shape[1:])
        yield values - 1.0 if name.endswith("norm.weight") else values


def _lm_model(config: dict[str, Any], reader: Any, dtype: str, quant: dict[str, Any] | None) -> Any:
    """The Gemma 3 model filled tensor by tensor, each dequantized, cast and quantized a block
    of rows at a time: memory holds the converted model and one tensor in ``dtype``."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text

    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    model.sanitize(dict.fromkeys(hf_tensor_name(t.name) for t in reader.tensors))
    expected = {name: tuple(value.shape) for name, value in tree_flatten(model.parameters())}
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=nn.Module.is_module))
    step = "dequantize, cast and quantize" if quant else "dequantize and cast"
    with progress(step, len(reader.tensors)) as bar:
        for tensor in reader.tensors:
            name = hf_tensor_name(tensor.name)
            _check_tensor(name, tensor, expected)
            _load_tensor(model, modules, name, gguf_rows(tensor, name), dtype, quant)
            del expected[name]
            bar.update()
    if expected:
        missing = ", ".join(sorted(expected)[:5])
        raise ConversionError(f"the GGUF tensors do not fit a Gemma 3 model: missing {missing}")
    return model


def _check_tensor(name: str, tensor: Any, expected: dict[str, tuple]) -> None:
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if name not in expected:
        raise ConversionError(f"the GGUF tensors do not fit a Gemma 3 model: unexpected {name}")
    if shape != expected[name]:
        raise ConversionError(
            f"the GGUF tensors do not fit a Gemma 3 model: {name} has shape {shape}, "
            f"not {expected[name]}"
        )


def _load_tensor(
    model: Any,
    modules: dict[str, Any],
    name: str,
    blocks: Iterator[Any],
    dtype: str,
    quant: dict[str, Any] | None,
) -> None:
    import mlx.core as mx
    from mlx.utils import tree_unflatten

    path, key = name.rsplit(".", 1)
    module, target = modules[path], getattr(mx, dtype)
    if quant is not None and key == "weight" and _quantizable(module, quant["group_size"]):
        # mlx-lm's quantize_model makes the same layer; its lazy initial weights are replaced
        # before they are ever computed.
        module = module.to_quantized(**quant)
        module.update(_quantize_blocks(blocks, target, quant))
        model.update_modules(tree_unflatten([(path, module)]))
        modules[path] = module
    else:
        module[key] = mx.concatenate([mx.array(rows).astype(target) for rows in blocks])
    mx.eval(module.parameters())


def _quantize_blocks(blocks: Iterator[Any], target: Any, quant: dict[str, Any]) -> dict[str, Any]:
    """Quantized weight, scales and biases, block by block (groups lie within a row)."""
    import mlx.core as mx

    parts = []
    for rows in blocks:
        parts.append(mx.quantize(mx.array(rows).astype(target), **quant))
        mx.eval(parts[-1])
    weight, scales, biases = (mx.concatenate(list(p)) for p in zip(*parts, strict=True))
    return {"weight": weight, "scales": scales, "biases": biases}


def _quantizable(module: Any, group_size: int) -> bool:
    return hasattr(module, "to_quantized") and module.weight.shape[-1] % group_size == 0


def _save_lm_model(model: Any, config: dict[str, Any], dest: Path) -> None:
    from mlx_lm.utils import save_config, save_model

    with stage("write"):
        save_model(dest, model, donate_model=True)
    save_config(config, config_path=dest / "config.json")
    write_json(dest / "generation_config.json", _generation_config(config))


def _generation_config(config: dict[str, Any]) -> dict[str, Any]:
    # Gemma's recommended sampling (temperature 1.0, top_k 64, top_p 0.95).
    return {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 64,
        "top_p": 0.95,
    }


def _gguf_tokenizer(source: Path, config: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """tokenizer.json text and the GGUF's tokenizer fields, rebuilt with transformers."""
    from tokenizers import processors
    from transformers.integrations.gguf import convert_gguf_tokenizer, get_gguf_tokenizer

    arch, tokenizer_dict, tokenizer_fields = get_gguf_tokenizer(str(source))
    if "tokens" not in tokenizer_dict:
        raise ConversionError(f"{source} carries no tokenizer (tokenizer.ggml.tokens)")
    try:
        backend, _ = convert_gguf_tokenizer(arch, tokenizer_dict)
    except ValueError as exc:
        raise ConversionError(f"cannot rebuild the tokenizer from {source}: {exc}") from exc
    bos = tokenizer_fields.get("bos_token") or "<bos>"
    if tokenizer_fields.get("add_bos_token", True):
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, config["bos_token_id"])],
        )
    return backend.to_str(), tokenizer_fields


def _write_gguf_tokenizer(parsed: GGUFSource, dest: Path) -> None:
    """tokenizer.json + tokenizer_config.json + chat_template.jinja (the GGUF has none)."""
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "tokenizer.json").write_text(parsed.tokenizer_json, encoding="utf-8")
    fields = _tokenizer_config(parsed.tokenizer_fields, parsed.config)
    write_json(dest / "tokenizer_config.json", fields)
    (dest / "chat_template.jinja").write_text(GEMMA3_CHAT_TEMPLATE, encoding="utf-8")


def _tokenizer_config(gguf_fields: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": gguf_fields.get("bos_token") or "<bos>",
        "eos_token": gguf_fields.get("eos_token") or "<eos>",
        "unk_token": gguf_fields.get("unk_token") or "<unk>",
        "pad_token": gguf_fields.get("pad_token") or "<pad>",
        "add_bos_token": bool(gguf_fields.get("add_bos_token", True)),
        "add_eos_token": bool(gguf_fields.get("add_eos_token", False)),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "padding_side": "left",
    }


# ------------------------------------------------------------------------ checks and CLI


def weight_precision(model_dir: Path) -> dict[str, str]:
    """Each top-level weight prefix of a converted model -> "q<bits>" or its float dtype."""
    import mlx.core as mx

    config = read_source_json(Path(model_dir) / "config.json") or {}
    quant = config.get("quantization") or {}
    out: dict[str, str] = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        for name, value in mx.load(str(path)).items():
            if name.endswith((".scales", ".biases")):
                continue
            module = name.rsplit(".", 1)[0]
            scaled = value.dtype == mx.uint32
            bits = (quant.get(module) or {}).get("bits", quant.get("bits"))
            out[name] = f"q{bits}" if scaled else str(value.dtype).removeprefix("mlx.core.")
    return out
