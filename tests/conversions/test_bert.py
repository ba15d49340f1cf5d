"""conversions.bert: tiny random bge (against torch) and real all-MiniLM-L6-v2 weights."""

from __future__ import annotations

import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from conversions import bert
from conversions.common import ConversionError
from engine.embeddings.runner import EmbeddingsRunner
from tests.real_weights import (
    MINILM_SENTENCES,
    minilm_cls_embeddings,
    minilm_dir,
    minilm_sentence_embeddings,
)
from tests.tiny.bert import CORPUS, HIDDEN, build_bge_hf

# name -> convert() options; the tiny model is 32 wide, so quantize it in groups of 32.
TINY_PRECISIONS = {
    "fp32": {"dtype": "float32"},
    "fp16": {"dtype": "float16"},
    "q8": {"quantization": 8, "group_size": 32},
}
MINILM_PRECISIONS = {
    "fp32": {"dtype": "float32"},
    "fp16": {"dtype": "float16"},
    "q8": {"quantization": 8},
    # Reported, not shipped: float32 scales only because MLX's CPU quantized matmul is ~3x
    # faster with them here; the quantized values are the same as with float16 scales.
    "q4": {"quantization": 4, "dtype": "float32"},
}
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "tokenizer_config.json",
    "special_tokens_map.json",
)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sum(_unit(a) * _unit(b), axis=-1)


def _embed(runner: EmbeddingsRunner, texts: list[str]) -> np.ndarray:
    return runner.embed(runner.tokenize(texts))


def _convert_all(src: Path, root: Path, precisions: dict[str, dict]) -> dict[str, Path]:
    out = {}
    for name, options in precisions.items():
        out[name] = root / name
        bert.convert(src, out[name], **options)
    return out


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# ================================================================== tiny random bge (offline)


@pytest.fixture(scope="module", autouse=True)
def no_network() -> Iterator[None]:
    """Conversions and references run offline: any connection attempt fails the test.
    (HF_HUB_OFFLINE is not set here: huggingface_hub reads it once, at import, and it would
    leak into later tests that serve a fake hub.)"""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def tiny_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bge_hf(tmp_path_factory.mktemp("bert-src") / "bge-hf")


@pytest.fixture(scope="module")
def tiny_out(tiny_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _convert_all(tiny_src, tmp_path_factory.mktemp("bert-out"), TINY_PRECISIONS)


@pytest.fixture(scope="module")
def tiny_runners(tiny_out: dict[str, Path]) -> dict[str, EmbeddingsRunner]:
    return {name: EmbeddingsRunner.load(path, "bge-base-zh") for name, path in tiny_out.items()}


@pytest.fixture(scope="module")
def torch_hidden(tiny_src: Path) -> tuple[np.ndarray, np.ndarray]:
    """transformers' BertModel on the source directory: (last_hidden_state, attention mask)."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_src, local_files_only=True)
    model = BertModel.from_pretrained(
        tiny_src, attn_implementation="eager", local_files_only=True
    ).eval()
    enc = tokenizer(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state.numpy()
    return hidden, enc["attention_mask"].numpy().astype(np.float32)


@pytest.fixture(scope="module")
def torch_cls(torch_hidden: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    return _unit(torch_hidden[0][:, 0])


def test_fp32_equals_torch_reference(
    tiny_runners: dict[str, EmbeddingsRunner], torch_cls: np.ndarray
) -> None:
    runner = tiny_runners["fp32"]
    batched = _embed(runner, CORPUS)
    single = np.stack([_embed(runner, [text])[0] for text in CORPUS])
    np.testing.assert_allclose(batched, torch_cls, atol=1e-5, rtol=0)
    np.testing.assert_allclose(single, torch_cls, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("name", "atol", "min_cos"), [("fp16", 2e-3, 0.9999), ("q8", 2e-2, 0.999)])
def test_reduced_precisions_are_close(
    tiny_runners: dict[str, EmbeddingsRunner],
    torch_cls: np.ndarray,
    name: str,
    atol: float,
    min_cos: float,
) -> None:
    vectors = _embed(tiny_runners[name], CORPUS)
    assert np.all(np.isfinite(vectors))
    np.testing.assert_allclose(vectors, torch_cls, atol=atol, rtol=0)
    assert _cosines(vectors, torch_cls).min() >= min_cos


def test_weights_have_the_requested_dtype(tiny_out: dict[str, Path]) -> None:
    for name, dtype in (("fp32", mx.float32), ("fp16", mx.float16)):
        weights = mx.load(str(tiny_out[name] / "model.safetensors"))
        assert {w.dtype for w in weights.values()} == {dtype}, name
        assert not any(k.endswith((".scales", "position_ids")) for k in weights)


def test_q8_is_quantized_as_mlx_embeddings_expects(tiny_out: dict[str, Path]) -> None:
    config = json.loads((tiny_out["q8"] / "config.json").read_text())
    assert config["quantization"] == {"group_size": 32, "bits": 8}
    weights = mx.load(str(tiny_out["q8"] / "model.safetensors"))
    query = "encoder.layer.0.attention.self.query"
    assert weights[f"{query}.weight"].dtype == mx.uint32
    assert weights[f"{query}.scales"].dtype == mx.float16
    assert f"{query}.biases" in weights
    assert "embeddings.position_embeddings.scales" not in weights
    assert "encoder.layer.0.output.LayerNorm.scales" not in weights


def test_config_records_cls_pooling_and_keeps_tokenizer(tiny_out: dict[str, Path]) -> None:
    out = tiny_out["fp32"]
    config = json.loads((out / "config.json").read_text())
    assert config["mlxd_pooling"] == "cls" and config["mlxd_normalize"] is True
    assert config["model_type"] == "bert" and config["torch_dtype"] == "float32"
    assert "quantization" not in config
    assert (out / "1_Pooling" / "config.json").is_file()
    for name in TOKENIZER_FILES:
        assert (out / name).is_file(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["model_max_length"] == 512


def test_manifest_fields(tiny_src: Path, tmp_path: Path) -> None:
    fields = bert.convert(tiny_src, tmp_path / "out", quantization=4, group_size=32)
    assert fields == {
        "source_format": "hf",
        "dtype": "float16",
        "quantization": {"bits": 4, "group_size": 32},
        "pooling": "cls",
        "normalize": True,
        "hidden_size": HIDDEN,
        "max_tokens": 512,
    }


def test_mean_pooled_source_is_recorded_and_pooled(
    tmp_path: Path, torch_hidden: tuple[np.ndarray, np.ndarray]
) -> None:
    src = build_bge_hf(tmp_path / "src", pooling="mean")
    assert bert.convert(src, tmp_path / "out", dtype="float32")["pooling"] == "mean"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mlxd_pooling"] == "mean"
    hidden, mask = torch_hidden
    expected = _unit((hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True))
    runner = EmbeddingsRunner.load(tmp_path / "out", "tiny-mean")
    np.testing.assert_allclose(_embed(runner, CORPUS), expected, atol=1e-5, rtol=0)


def test_no_sentence_transformers_config_means_cls(tiny_src: Path, tmp_path: Path) -> None:
    src = _copy(tiny_src, tmp_path / "src")
    shutil.rmtree(src / "1_Pooling")
    (src / "modules.json").unlink()
    assert bert.convert(src, tmp_path / "out")["pooling"] == "cls"
    assert not (tmp_path / "out" / "1_Pooling").exists()


def test_unsupported_pooling_is_refused_unless_overridden(tiny_src: Path, tmp_path: Path) -> None:
    src = _copy(tiny_src, tmp_path / "src")
    pooling = json.loads((src / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_cls_token=False, pooling_mode_max_tokens=True)
    (src / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(ConversionError, match="unsupported sentence-transformers pooling"):
        bert.convert(src, tmp_path / "out")
    assert bert.convert(src, tmp_path / "out", pooling="mean")["pooling"] == "mean"


def test_pytorch_bin_with_task_head_prefix(
    tiny_src: Path, tiny_out: dict[str, Path], tmp_path: Path
) -> None:
    import torch

    src = _copy(tiny_src, tmp_path / "src")
    weights = mx.load(str(src / "model.safetensors"))
    state = {f"bert.{k}": torch.from_numpy(np.array(v)) for k, v in weights.items()}
    state["cls.predictions.bias"] = torch.zeros(4)
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    bert.convert(src, tmp_path / "out", dtype="float32")
    got = mx.load(str(tmp_path / "out" / "model.safetensors"))
    want = mx.load(str(tiny_out["fp32"] / "model.safetensors"))
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        np.testing.assert_array_equal(np.array(got[key]), np.array(value), err_msg=key)


def test_xlm_roberta_equals_torch_reference(tiny_src: Path, tmp_path: Path) -> None:
    """XLM-RoBERTa (mlx-embeddings' xlm_roberta; positions start after the pad id)."""
    import torch
    from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

    src = _copy(tiny_src, tmp_path / "src")
    (src / "model.safetensors").unlink()
    vocab_size = json.loads((src / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    config = XLMRobertaConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=514,
        pad_token_id=0,
        type_vocab_size=1,
    )
    model = XLMRobertaModel(config).eval()
    model.save_pretrained(src)
    fields = bert.convert(src, tmp_path / "out", dtype="float32")
    assert fields["max_tokens"] == 512
    tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=True)
    enc = tokenizer(CORPUS, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = _unit(model(**enc).last_hidden_state[:, 0].numpy())
    runner = EmbeddingsRunner.load(tmp_path / "out", "tiny-xlmr")
    np.testing.assert_allclose(_embed(runner, CORPUS), expected, atol=1e-5, rtol=0)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _drop_weights(src: Path) -> None:
    (src / "model.safetensors").unlink()


def _not_bert(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))


def _no_config(src: Path) -> None:
    (src / "config.json").unlink()


def _no_tokenizer(src: Path) -> None:
    (src / "tokenizer.json").unlink()
    (src / "vocab.txt").unlink()


def _corrupt_weights(src: Path) -> None:
    (src / "model.safetensors").write_bytes(b"not a safetensors file")


def _wrong_shape(src: Path) -> None:
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "intermediate_size": 48}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (_drop_weights, "no weights in .*model.safetensors.*pytorch_model.bin"),
        (_not_bert, "unsupported architecture.*'llama'"),
        (_no_config, "no config.json"),
        (_no_tokenizer, "no tokenizer in .*tokenizer.json or vocab.txt"),
        (_corrupt_weights, "cannot read weights from .*model.safetensors"),
        (_wrong_shape, "do not match its config.json.*intermediate.dense.weight has shape"),
    ],
)
def test_bad_sources_are_clear_errors(
    tiny_src: Path, tmp_path: Path, damage: Callable[[Path], None], message: str
) -> None:
    src = _copy(tiny_src, tmp_path / "src")
    damage(src)
    with pytest.raises(ConversionError, match=message):
        bert.convert(src, tmp_path / "out")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"dtype": "int8"}, "dtype must be"),
        ({"quantization": 3}, "quantization must be"),
        ({"quantization": 8, "group_size": 48}, "group size must be"),
        ({"pooling": "max"}, "unsupported pooling"),
    ],
)
def test_bad_options_are_clear_errors(
    tiny_src: Path, tmp_path: Path, options: dict, message: str
) -> None:
    with pytest.raises(ConversionError, match=message):
        bert.convert(tiny_src, tmp_path / "out", **options)


def test_refuses_a_non_empty_destination(tiny_src: Path, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "stale.safetensors").write_bytes(b"")
    with pytest.raises(ConversionError, match="not an empty directory"):
        bert.convert(tiny_src, tmp_path / "out")


def test_smoke_test(tiny_out: dict[str, Path], tmp_path: Path) -> None:
    from conversions.install import _smoke
    from engine.embeddings.runner import smoke_test

    smoke_test(tiny_out["q8"])
    broken = _copy(tiny_out["fp32"], tmp_path / "broken")
    (broken / "model.safetensors").unlink()
    with pytest.raises(ConversionError, match="does not load"):
        _smoke(smoke_test, broken)


# ================================================================== real all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm_src() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def minilm_out(minilm_src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _convert_all(minilm_src, tmp_path_factory.mktemp("minilm"), MINILM_PRECISIONS)


@pytest.fixture(scope="module")
def minilm_runners(minilm_out: dict[str, Path]) -> dict[str, EmbeddingsRunner]:
    return {name: EmbeddingsRunner.load(path, "minilm") for name, path in minilm_out.items()}


@pytest.fixture(scope="module")
def minilm_reference(minilm_src: Path) -> np.ndarray:
    return minilm_sentence_embeddings(minilm_src, MINILM_SENTENCES)


@pytest.fixture(scope="module")
def minilm_vectors(minilm_runners: dict[str, EmbeddingsRunner]) -> dict[str, np.ndarray]:
    """MINILM_SENTENCES embedded as one padded batch, per precision (quantized matmuls are
    slow on this CPU, so each precision embeds them once)."""
    return {name: _embed(runner, MINILM_SENTENCES) for name, runner in minilm_runners.items()}


@pytest.mark.parametrize(("name", "min_cos"), [("fp32", 0.9999), ("fp16", 0.9999), ("q8", 0.999)])
def test_minilm_matches_sentence_transformers(
    minilm_runners: dict[str, EmbeddingsRunner],
    minilm_vectors: dict[str, np.ndarray],
    minilm_reference: np.ndarray,
    name: str,
    min_cos: float,
) -> None:
    assert minilm_runners[name].pooling == "mean" and minilm_runners[name].normalize
    vectors = minilm_vectors[name]
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cosines = _cosines(vectors, minilm_reference)
    assert cosines.min() >= min_cos, f"{name}: min cosine {cosines.min():.6f}"


def test_minilm_q4_is_usable(
    minilm_vectors: dict[str, np.ndarray], minilm_reference: np.ndarray
) -> None:
    """4-bit hurts this 384-wide model visibly (measured: min cosine 0.941, median 0.960)."""
    cosines = _cosines(minilm_vectors["q4"], minilm_reference)
    assert cosines.min() >= 0.92 and np.median(cosines) >= 0.94


def test_minilm_cls_pooling_matches_bert_model(
    minilm_src: Path, minilm_out: dict[str, Path], tmp_path: Path
) -> None:
    cls_dir = tmp_path / "minilm-cls"
    cls_dir.mkdir()
    for path in minilm_out["fp32"].iterdir():
        if path.name != "config.json":
            os.symlink(path, cls_dir / path.name)
    config = json.loads((minilm_out["fp32"] / "config.json").read_text())
    (cls_dir / "config.json").write_text(json.dumps({**config, "mlxd_pooling": "cls"}))
    runner = EmbeddingsRunner.load(cls_dir, "minilm-cls")
    assert runner.pooling == "cls"
    expected = minilm_cls_embeddings(minilm_src, MINILM_SENTENCES)
    assert _cosines(_embed(runner, MINILM_SENTENCES), expected).min() >= 0.9999


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_minilm_padded_batch_equals_each_text_alone(
    minilm_runners: dict[str, EmbeddingsRunner], minilm_vectors: dict[str, np.ndarray], name: str
) -> None:
    alone = np.stack([_embed(minilm_runners[name], [text])[0] for text in MINILM_SENTENCES])
    assert _cosines(minilm_vectors[name], alone).min() >= 0.99999


def test_minilm_related_sentences_score_higher(
    minilm_runners: dict[str, EmbeddingsRunner],
) -> None:
    texts = [
        "A man is playing a guitar.",
        "Someone strums an acoustic guitar on stage.",
        "The stock market crashed today.",
        "I like drinking green tea in the morning.",
        "Tea is my favourite drink when I wake up.",
    ]
    for name in ("fp32", "fp16"):
        sims = _embed(minilm_runners[name], texts) @ _embed(minilm_runners[name], texts).T
        assert sims[0, 1] > max(sims[0, 2], sims[0, 3]) + 0.3, name
        assert sims[3, 4] > max(sims[3, 0], sims[3, 2]) + 0.3, name


def test_minilm_manifest_and_sizes(
    minilm_out: dict[str, Path], minilm_runners: dict[str, EmbeddingsRunner]
) -> None:
    config = json.loads((minilm_out["fp16"] / "config.json").read_text())
    assert config["mlxd_pooling"] == "mean" and config["mlxd_normalize"] is True
    tok = json.loads((minilm_out["q8"] / "tokenizer_config.json").read_text())
    assert tok["model_max_length"] == 512
    assert minilm_runners["q8"].max_tokens == 512 and minilm_runners["q8"].hidden_size == 384
    sizes = {name: _size(path) for name, path in minilm_out.items()}
    assert sizes["fp16"] < 0.55 * sizes["fp32"]
    assert sizes["q8"] < 0.6 * sizes["fp16"]
    assert sizes["q4"] < 0.7 * sizes["q8"]  # even with float32 scales and norms
