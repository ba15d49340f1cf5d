# ruff: noqa: E501  (the embedded Jinja chat template keeps its long lines)
"""Tiny random Gemma 4 (vision, optionally audio) checkpoints built on the fly, no download.

``build_gemma4_hf`` writes a Hugging Face layout directory (config.json,
model.safetensors with the HF tensor names, tokenizer files, chat template,
processor and generation configs) of a Gemma 4 vision-language model with the
real architecture but tiny sizes and deterministic random weights; with
``audio=True`` it also has an audio tower (a one-block Conformer) and the audio
feature-extractor config in processor_config.json.
``build_gemma4_mlx`` converts that directory with mlx-vlm's own converter.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from engine.chat.gemma_tokens import GEMMA4_SPECIALS

# Gemma 4 ids 0..4 are <pad> <eos> <bos> <unk> <mask>; the control tokens follow.
BASE_SPECIALS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
CONTROL_TOKENS = GEMMA4_SPECIALS
SPECIAL_TOKENS = BASE_SPECIALS + CONTROL_TOKENS

EXTRA_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}

SEED = 1234
BPE_VOCAB_SIZE = 640  # includes the specials and the 256 byte tokens

TRAINING_TEXT = (
    "Hello, how are you today? I am fine, thank you.",
    "The quick brown fox jumps over the lazy dog.",
    "What is in this image? A red square and a blue circle.",
    "Describe the picture in one sentence, please.",
    "The weather is sunny and warm; let us go for a walk.",
    "def add(a, b):\n    return a + b\n",
    'call:get_weather{city:"Paris"} {"location": "Tokyo", "unit": "celsius"}',
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "这是一张红色的图片。请用中文回答。",
    "こんにちは、元気ですか？",
    "Emoji time 😀 🎉 👍 🚀 ❤️ done.",
    "Thinking step by step: first, then, finally the answer is yes.",
)

CHAT_TEMPLATE = r"""{%- macro format_argument(argument, escape_keys=True) -%}
    {%- if argument is none -%}
        {{- 'null' -}}
    {%- elif argument is string -%}
        {{- '<|"|>' + argument + '<|"|>' -}}
    {%- elif argument is boolean -%}
        {{- 'true' if argument else 'false' -}}
    {%- elif argument is mapping -%}
        {{- '{' -}}
        {%- for key, value in argument | dictsort -%}
            {%- if escape_keys -%}{{- '<|"|>' + key + '<|"|>' -}}{%- else -%}{{- key -}}{%- endif -%}
            :{{- format_argument(value, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- '}' -}}
    {%- elif argument is sequence -%}
        {{- '[' -}}
        {%- for item in argument -%}
            {{- format_argument(item, escape_keys=escape_keys) -}}
            {%- if not loop.last %},{% endif -%}
        {%- endfor -%}
        {{- ']' -}}
    {%- else -%}
        {{- argument -}}
    {%- endif -%}
{%- endmacro -%}
{%- macro format_parameters(properties) -%}
    {%- for key, value in properties | dictsort -%}
        {{- key }}:{
        {%- if value['description'] -%}description:<|"|>{{ value['description'] }}<|"|>,{%- endif -%}
        {%- if value['enum'] -%}enum:{{ format_argument(value['enum']) }},{%- endif -%}
        {%- if value['properties'] is defined and value['properties'] is mapping -%}
            properties:{ {{- format_parameters(value['properties']) -}} },
        {%- endif -%}
        type:<|"|>{{ value['type'] | default('string') | upper }}<|"|>}
        {%- if not loop.last %},{% endif -%}
    {%- endfor -%}
{%- endmacro -%}
{%- macro format_function_declaration(tool) -%}
    {%- set fn = tool['function'] if tool['function'] is defined else tool -%}
    declaration:{{- fn['name'] -}}{description:<|"|>{{- fn['description'] | default('') -}}<|"|>
    {%- set params = fn['parameters'] -%}
    {%- if params -%}
        ,parameters:{
        {%- if params['properties'] -%}properties:{ {{- format_parameters(params['properties']) -}} },{%- endif -%}
        {%- if params['required'] -%}
            required:[
            {%- for item in params['required'] -%}<|"|>{{- item -}}<|"|>{{- ',' if not loop.last -}}{%- endfor -%}
            ],
        {%- endif -%}
        type:<|"|>{{- params['type'] | default('object') | upper -}}<|"|>}
    {%- endif -%}
    }
{%- endmacro -%}
{%- macro strip_thinking(text) -%}
    {%- set ns = namespace(result='') -%}
    {%- for part in text.split('<channel|>') -%}
        {%- if '<|channel>' in part -%}
            {%- set ns.result = ns.result + part.split('<|channel>')[0] -%}
        {%- else -%}
            {%- set ns.result = ns.result + part -%}
        {%- endif -%}
    {%- endfor -%}
    {{- ns.result | trim -}}
{%- endmacro -%}
{%- macro render_content(content, role) -%}
    {%- if content is string -%}
        {{- strip_thinking(content) if role == 'model' else content | trim -}}
    {%- elif content is sequence -%}
        {%- for item in content -%}
            {%- if item['type'] == 'text' -%}
                {{- strip_thinking(item['text']) if role == 'model' else item['text'] | trim -}}
            {%- elif item['type'] in ['image', 'image_url'] -%}
                {{- '<|image|>' -}}
            {%- elif item['type'] in ['audio', 'input_audio'] -%}
                {{- '<|audio|>' -}}
            {%- elif item['type'] == 'video' -%}
                {{- '<|video|>' -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
{%- endmacro -%}
{%- set ns = namespace(prev_message_type=None, last_calls=[]) -%}
{%- set loop_messages = messages -%}
{{- bos_token -}}
{%- if (enable_thinking is defined and enable_thinking) or tools or messages[0]['role'] in ['system', 'developer'] -%}
    {{- '<|turn>system\n' -}}
    {%- if enable_thinking is defined and enable_thinking -%}
        {{- '<|think|>' -}}
    {%- endif -%}
    {%- if messages[0]['role'] in ['system', 'developer'] -%}
        {{- render_content(messages[0]['content'], 'system') -}}
        {%- set loop_messages = messages[1:] -%}
    {%- endif -%}
    {%- if tools -%}
        {%- for tool in tools -%}
            {{- '<|tool>' -}}{{- format_function_declaration(tool) | trim -}}{{- '<tool|>' -}}
        {%- endfor -%}
    {%- endif -%}
    {{- '<turn|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message['role'] in ['system', 'developer'] -%}
        {{- raise_exception('A system message is only supported as the first message.') -}}
    {%- endif -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {%- if role == 'tool' -%}
        {%- if ns.prev_message_type not in ['tool_call', 'tool_response'] -%}
            {{- raise_exception('A tool message must follow an assistant message with tool_calls.') -}}
        {%- endif -%}
        {%- set tname = namespace(name=message['name'] | default('unknown')) -%}
        {%- for tc in ns.last_calls -%}
            {%- if tc['id'] is defined and tc['id'] == message['tool_call_id'] -%}{%- set tname.name = tc['function']['name'] -%}{%- endif -%}
        {%- endfor -%}
        {%- set body = message['content'] -%}
        {%- if body is not string -%}
            {%- set parts = namespace(text='') -%}
            {%- for item in body -%}{%- if item['type'] == 'text' -%}{%- set parts.text = parts.text + item['text'] -%}{%- endif -%}{%- endfor -%}
            {%- set body = parts.text -%}
        {%- endif -%}
        {{- '<|tool_response>response:' + tname.name + '{value:' + format_argument(body, escape_keys=False) + '}<tool_response|>' -}}
        {%- set ns.prev_message_type = 'tool_response' -%}
    {%- else -%}
        {%- set continuing = role == 'model' and ns.prev_message_type in ['tool_call', 'tool_response'] -%}
        {%- if ns.prev_message_type in ['tool_call', 'tool_response'] and not continuing -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
        {%- set ns.prev_message_type = None -%}
        {%- if not continuing -%}{{- '<|turn>' + role + '\n' -}}{%- endif -%}
        {%- if message['tool_calls'] -%}
            {%- for tool_call in message['tool_calls'] -%}
                {%- set function = tool_call['function'] -%}
                {{- '<|tool_call>call:' + function['name'] + '{' -}}
                {%- if function['arguments'] is mapping -%}
                    {%- for key, value in function['arguments'] | dictsort -%}
                        {{- key -}}:{{- format_argument(value, escape_keys=False) -}}
                        {%- if not loop.last %},{% endif -%}
                    {%- endfor -%}
                {%- elif function['arguments'] is string -%}
                    {{- function['arguments'] -}}
                {%- endif -%}
                {{- '}<tool_call|>' -}}
            {%- endfor -%}
            {%- set ns.last_calls = message['tool_calls'] -%}
            {%- set ns.prev_message_type = 'tool_call' -%}
        {%- endif -%}
        {%- if message['content'] is not none -%}
            {{- render_content(message['content'], role) -}}
        {%- endif -%}
        {%- if ns.prev_message_type != 'tool_call' -%}
            {{- '<turn|>\n' -}}
        {%- endif -%}
    {%- endif -%}
{%- endfor -%}
{%- if ns.prev_message_type in ['tool_call', 'tool_response'] -%}
    {%- if not add_generation_prompt -%}{{- '<turn|>\n' -}}{%- endif -%}
{%- elif add_generation_prompt -%}
    {{- '<|turn>model\n' -}}
{%- endif -%}
"""


def _text_config(vocab_size: int) -> dict:
    return {
        "model_type": "gemma4_text",
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 4,
        "layer_types": [
            "sliding_attention",
            "full_attention",
            "sliding_attention",
            "full_attention",
        ],
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "global_head_dim": 32,
        "num_kv_shared_layers": 2,
        "use_double_wide_mlp": True,
        "hidden_size_per_layer_input": 8,
        "vocab_size": vocab_size,
        "vocab_size_per_layer_input": vocab_size,
        "sliding_window": 32,
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 30.0,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "attention_bias": False,
        "attention_k_eq_v": False,
        "enable_moe_block": False,
        "tie_word_embeddings": True,
        "pad_token_id": 0,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "rope_parameters": {
            "full_attention": {
                "partial_rotary_factor": 0.25,
                "rope_theta": 1000000.0,
                "rope_type": "proportional",
            },
            "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
        },
    }


def _vision_config() -> dict:
    return {
        "model_type": "gemma4_vision",
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "global_head_dim": 16,
        "patch_size": 16,
        "pooling_kernel_size": 3,
        "position_embedding_size": 64,
        "default_output_length": 16,
        "rms_norm_eps": 1e-6,
        "hidden_activation": "gelu_pytorch_tanh",
        "use_clipped_linears": False,
        "standardize": False,
        "rope_parameters": {"rope_theta": 100.0, "rope_type": "default"},
    }


def _audio_config() -> dict:
    return {
        "model_type": "gemma4_audio",
        "hidden_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "hidden_act": "silu",
        "subsampling_conv_channels": [8, 4],
        "conv_kernel_size": 5,
        "residual_weight": 0.5,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "use_clipped_linears": True,
        "rms_norm_eps": 1e-6,
        "output_proj_dims": 32,
    }


# Gemma 4's audio front end (USM log-mel) as its processor_config.json spells it; the mel
# floor is not the extractor's default, so a conversion that drops this block shows.
FEATURE_EXTRACTOR = {
    "feature_extractor_type": "Gemma4AudioFeatureExtractor",
    "feature_size": 128,
    "sampling_rate": 16000,
    "padding_value": 0.0,
    "return_attention_mask": True,
    "frame_length_ms": 20.0,
    "hop_length_ms": 10.0,
    "min_frequency": 0.0,
    "max_frequency": 8000.0,
    "preemphasis": 0.0,
    "preemphasis_htk_flavor": True,
    "fft_overdrive": False,
    "dither": 0.0,
    "input_scale_factor": 1.0,
    "mel_floor": 1e-5,
    "per_bin_mean": None,
    "per_bin_stddev": None,
}


def _model_config(ids: dict[str, int], vocab_size: int, audio: bool = False) -> dict:
    return {
        "architectures": ["Gemma4ForConditionalGeneration"],
        "model_type": "gemma4",
        "text_config": _text_config(vocab_size),
        "vision_config": _vision_config(),
        "audio_config": _audio_config() if audio else None,
        "image_token_id": ids["<|image|>"],
        "boi_token_id": ids["<|image>"],
        "eoi_token_id": ids["<image|>"],
        "audio_token_id": ids["<|audio|>"],
        "boa_token_id": ids["<|audio>"],
        "eoa_token_id": ids["<audio|>"],
        "video_token_id": ids["<|video|>"],
        "vision_soft_tokens_per_image": 16,
        "eos_token_id": [ids["<eos>"], ids["<turn|>"]],
        "pad_token_id": ids["<pad>"],
        "tie_word_embeddings": True,
        "initializer_range": 0.02,
        "dtype": "bfloat16",
    }


def _train_tokenizer():
    """A small BPE with byte fallback, SentencePiece-style (Gemma) pipeline."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer

    scratch = Tokenizer(BPE(unk_token="<unk>"))
    scratch.normalizer = normalizers.Replace(" ", "\u2581")
    n_fixed = len(SPECIAL_TOKENS) + 256
    trainer = BpeTrainer(vocab_size=BPE_VOCAB_SIZE - n_fixed, show_progress=False)
    scratch.train_from_iterator(list(TRAINING_TEXT) * 4, trainer=trainer)
    trained = json.loads(scratch.to_str())["model"]

    vocab: dict[str, int] = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for tok, _ in sorted(trained["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in trained["merges"]]

    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True)
    )
    tok.normalizer = normalizers.Replace(" ", "\u2581")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    return tok


def _tokenizer_config() -> dict:
    return {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "left",
        "model_max_length": 4096,
        "clean_up_tokenization_spaces": False,
        "spaces_between_special_tokens": False,
        "extra_special_tokens": dict(EXTRA_SPECIAL_TOKENS),
    }


def _processor_config(audio: bool = False) -> dict:
    extractor = {
        "audio_seq_length": 750,
        "audio_ms_per_token": 40,
        "feature_extractor": dict(FEATURE_EXTRACTOR),
    }
    return {
        **(extractor if audio else {}),
        "processor_class": "Gemma4Processor",
        "image_seq_length": 16,
        "image_processor": {
            "image_processor_type": "Gemma4ImageProcessor",
            "do_convert_rgb": True,
            "do_resize": True,
            "do_rescale": True,
            "rescale_factor": 1 / 255,
            "do_normalize": False,
            "image_mean": [0.0, 0.0, 0.0],
            "image_std": [1.0, 1.0, 1.0],
            "patch_size": 16,
            "pooling_kernel_size": 3,
            "max_soft_tokens": 16,
            "resample": 3,
        },
    }


def _generation_config(ids: dict[str, int]) -> dict:
    return {
        "bos_token_id": ids["<bos>"],
        "eos_token_id": [ids["<eos>"], ids["<turn|>"]],
        "pad_token_id": ids["<pad>"],
        "do_sample": True,
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 64,
    }


def _hf_name(mlx_name: str) -> str:
    """Inverse of mlx_vlm.models.gemma4.Model.sanitize for the tensors we write."""
    if mlx_name.startswith("language_model.model."):
        return "model.language_model." + mlx_name[len("language_model.model.") :]
    return "model." + mlx_name


def _random_weights(config: dict) -> dict:
    """Instantiate mlx-vlm's Gemma 4 with ``config`` and randomise it (seeded)."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_vlm.models import gemma4

    model_config = gemma4.ModelConfig.from_dict(config)
    model_config.text_config = gemma4.TextConfig.from_dict(config["text_config"])
    model_config.vision_config = gemma4.VisionConfig.from_dict(config["vision_config"])
    if config.get("audio_config"):
        model_config.audio_config = gemma4.AudioConfig.from_dict(config["audio_config"])
    model = gemma4.Model(model_config)
    rng = np.random.default_rng(SEED)
    weights = {}
    for name, value in sorted(tree_flatten(model.parameters())):
        if _kept_as_built(name):
            weights[name] = value.astype(mx.bfloat16)
            continue
        std = 0.03 if "embed_tokens" in name else 0.1
        weights[name] = mx.array(rng.normal(0.0, std, value.shape).astype(np.float32)).astype(
            mx.bfloat16
        )
    return {_hf_name(k): v for k, v in weights.items()}


def _kept_as_built(name: str) -> bool:
    """Norm scales, layer scalars and the audio tower's clip bounds (+-inf) stay as built."""
    leaf = name.rsplit(".", 2)[-2:]
    if leaf[-1] in ("input_min", "input_max", "output_min", "output_max"):
        return True
    return name.endswith("norm.weight") or "layer_scalar" in name or "norm" in leaf[0]


def build_gemma4_hf(dest: Path, *, audio: bool = False) -> Path:
    """Write a tiny random Gemma 4 vision-language model (with an audio tower if ``audio``)
    in Hugging Face layout."""
    import mlx.core as mx

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = _train_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    config = _model_config(ids, tok.get_vocab_size(), audio)

    tok.save(str(dest / "tokenizer.json"))
    _write_json(dest / "config.json", config)
    _write_json(dest / "tokenizer_config.json", _tokenizer_config())
    _write_json(dest / "special_tokens_map.json", _special_tokens_map())
    _write_json(dest / "processor_config.json", _processor_config(audio))
    _write_json(dest / "generation_config.json", _generation_config(ids))
    (dest / "chat_template.jinja").write_text(CHAT_TEMPLATE, encoding="utf-8")
    mx.save_safetensors(
        str(dest / "model.safetensors"), _random_weights(config), metadata={"format": "pt"}
    )
    return dest


def _special_tokens_map() -> dict:
    return {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "mask_token": "<mask>",
    }


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def build_gemma4_mlx(dest: Path, *, quantize: bool = False, audio: bool = False) -> Path:
    """Build the HF checkpoint and convert it with mlx-vlm's own converter.

    Weights are float32 unless ``quantize`` (4-bit, group size 32); quantized
    matmuls are slow on the Linux CPU backend, so tests should prefer float32.
    """
    from mlx_vlm.convert import convert

    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gemma4-hf-", dir=dest.parent) as tmp:
        hf_dir = build_gemma4_hf(Path(tmp) / "hf", audio=audio)
        convert(
            str(hf_dir),
            mlx_path=str(dest),
            quantize=quantize,
            q_group_size=32,
            q_bits=4,
            dtype="float32",
        )
    return dest


def swap_token_ids(model_dir: Path, dest: Path, swaps: dict[int, str]) -> Path:
    """Copy ``model_dir`` with token ids re-assigned in its tokenizer: id -> ``swaps[id]``.

    The id of each named token and the given id trade strings. The model's weights and every
    prompt that contains neither string tokenize exactly as before, so the model generates the
    same ids; they now decode as the named tokens (e.g. Gemma 4's thinking markers), which lets
    a random model "write" control tokens at chosen places.
    """
    dest = Path(dest)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(model_dir, dest)
    data = json.loads((dest / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = data["model"]["vocab"]
    by_id = {i: tok for tok, i in vocab.items()}
    for token_id, name in swaps.items():
        other_id, old_name = vocab[name], by_id[token_id]
        vocab[name], vocab[old_name] = token_id, other_id
        by_id[token_id], by_id[other_id] = name, old_name
        for added in data["added_tokens"]:
            if added["content"] == name:
                added["id"] = token_id
            elif added["id"] == token_id:
                added["id"] = other_id
    (dest / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    return dest
