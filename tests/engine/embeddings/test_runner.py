"""EmbeddingsRunner on a tiny random bge-shaped BERT (no downloads)."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from engine.embeddings.runner import EmbeddingsRunner, read_pooling
from tests.tiny.bert import build_bge_hf, build_bge_mlx

TEXTS = [
    "今天天气很好，我们去公园散步吧。",
    "hello",
    "Embeddings map sentences to vectors for semantic search, 北京 and 上海 too.",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_bge_hf(tmp_path_factory.mktemp("bge") / "hf")


@pytest.fixture(scope="module")
def runner(hf_dir: Path) -> EmbeddingsRunner:
    return EmbeddingsRunner.load(hf_dir, "bge-base-zh")


def _hidden(runner: EmbeddingsRunner, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    out = runner.model(mx.array([ids]))
    return np.array(out.last_hidden_state[0]), np.array(out.text_embeds[0])


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_shape_dtype_and_unit_norm(runner: EmbeddingsRunner) -> None:
    emb = runner.embed(runner.tokenize(TEXTS))
    assert emb.shape == (3, 32) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-6)
    assert runner.hidden_size == 32 and runner.max_tokens == 512
    assert runner.pooling == "cls" and runner.model_id == "bge-base-zh"


def test_cls_pooling_is_used_not_text_embeds(runner: EmbeddingsRunner) -> None:
    ids = runner.tokenize(TEXTS[:1])[0]
    hidden, text_embeds = _hidden(runner, ids)
    got = runner.embed([ids])[0]
    np.testing.assert_allclose(got, _unit(hidden[0]), atol=1e-6)
    # mlx-embeddings' text_embeds is mean-pooled: it must differ, or this test proves nothing.
    assert np.abs(got - text_embeds).max() > 1e-2


def test_tokenize_adds_cls_sep_and_never_truncates(hf_dir: Path, runner: EmbeddingsRunner) -> None:
    tok = runner.tokenizer
    ids = runner.tokenize(["hello world"])[0]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id
    long_ids = runner.tokenize(["北京 " * 600])[0]
    assert len(long_ids) == 2 + 1200  # every Hanzi is a token
    with pytest.raises(ValueError, match="512"):
        runner.embed([long_ids])
    config = json.loads((hf_dir / "config.json").read_text())
    assert runner.vocab_size() == config["vocab_size"]


def test_padded_batch_equals_single(runner: EmbeddingsRunner) -> None:
    token_lists = runner.tokenize(TEXTS)
    assert len({len(t) for t in token_lists}) == 3  # really padded
    batch = runner.embed(token_lists)
    for row, ids in enumerate(token_lists):
        np.testing.assert_allclose(batch[row], runner.embed([ids])[0], atol=1e-5)


def test_token_id_validation(runner: EmbeddingsRunner) -> None:
    with pytest.raises(ValueError):
        runner.embed([[]])
    with pytest.raises(ValueError):
        runner.embed([[2, runner.vocab_size(), 3]])


def test_matches_transformers_bert_cls(hf_dir: Path, runner: EmbeddingsRunner) -> None:
    """Ground truth from Hugging Face's own BertModel (torch) on the same checkpoint."""
    torch = pytest.importorskip("torch")
    from transformers import BertModel

    model = BertModel.from_pretrained(hf_dir, local_files_only=True).eval()
    token_lists = runner.tokenize(TEXTS)
    for ids, got in zip(token_lists, runner.embed(token_lists), strict=True):
        with torch.no_grad():
            ref = model(torch.tensor([ids])).last_hidden_state[0, 0].numpy()
        np.testing.assert_allclose(got, _unit(ref), atol=1e-4)


def _variant(src: Path, dest: Path, *, config: dict | None = None, pooling_dir: bool) -> Path:
    shutil.copytree(src, dest)
    if not pooling_dir:
        shutil.rmtree(dest / "1_Pooling")
    if config:
        cfg = json.loads((dest / "config.json").read_text())
        (dest / "config.json").write_text(json.dumps({**cfg, **config}))
    return dest


def test_mean_pooling_from_sentence_transformers_config(tmp_path: Path) -> None:
    src = build_bge_hf(tmp_path / "mean", pooling="mean")
    runner = EmbeddingsRunner.load(src, "mean-model")
    assert runner.pooling == "mean"
    token_lists = runner.tokenize(TEXTS)
    batch = runner.embed(token_lists)
    for row, ids in enumerate(token_lists):
        hidden, text_embeds = _hidden(runner, ids)
        np.testing.assert_allclose(batch[row], _unit(hidden.mean(axis=0)), atol=1e-5)
        np.testing.assert_allclose(batch[row], text_embeds, atol=1e-5)


def test_pooling_sources(hf_dir: Path, tmp_path: Path) -> None:
    assert read_pooling(hf_dir) == ("cls", True)
    bare = _variant(hf_dir, tmp_path / "bare", pooling_dir=False)
    assert read_pooling(bare) == ("cls", True)
    recorded = {"mlxd_pooling": "last", "mlxd_normalize": True}
    last = _variant(hf_dir, tmp_path / "last", config=recorded, pooling_dir=True)
    assert read_pooling(last) == ("last", True)
    runner = EmbeddingsRunner.load(last, "last-model")
    ids = runner.tokenize(TEXTS[:1])[0]
    hidden, _ = _hidden(runner, ids)
    np.testing.assert_allclose(runner.embed([ids])[0], _unit(hidden[-1]), atol=1e-6)
    short = runner.tokenize(TEXTS[1:2])[0]
    both = runner.embed([ids, short])  # the short row is padded: its last real token counts
    np.testing.assert_allclose(both[1], _unit(_hidden(runner, short)[0][-1]), atol=1e-5)
    bad = _variant(hf_dir, tmp_path / "bad", config={"mlxd_pooling": "max"}, pooling_dir=False)
    with pytest.raises(ValueError, match="max"):
        read_pooling(bad)


def test_mlx_converted_layout_gives_same_vectors(tmp_path: Path, runner: EmbeddingsRunner) -> None:
    mlx_dir = build_bge_mlx(tmp_path / "mlx")
    converted = EmbeddingsRunner.load(mlx_dir, "bge-mlx")
    assert converted.pooling == "cls"
    token_lists = runner.tokenize(TEXTS)
    assert converted.tokenize(TEXTS) == token_lists
    np.testing.assert_allclose(converted.embed(token_lists), runner.embed(token_lists), atol=1e-6)


def test_missing_dir_is_clear(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="config.json"):
        EmbeddingsRunner.load(tmp_path / "nothing-here", "x")
