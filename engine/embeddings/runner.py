"""Text embeddings with a BERT-family encoder (bge-base-zh by default).

Runs only on the worker's single model thread (MLX is not thread-safe).

Pooling is done here from `last_hidden_state`, never from mlx-embeddings' `text_embeds`
(which is mean-pooled: silently wrong for CLS-pooled models like bge). The pooling mode comes
from, in order: `mlxd_pooling` in the model's config.json (written by our converter),
sentence-transformers' `1_Pooling/config.json`, else CLS (bge's).
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx
import numpy as np

from engine.config import Config
from engine.jsonfile import read_json

POOLINGS = ("cls", "mean", "last")
_ST_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls",
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_lasttoken": "last",
}


def read_pooling(model_dir: Path) -> tuple[str, bool]:
    """(pooling, normalize) recorded for the model; ("cls", True) when nothing says otherwise."""
    config = read_json(model_dir / "config.json") or {}
    if "mlxd_pooling" in config:
        pooling = str(config["mlxd_pooling"])
        if pooling not in POOLINGS:
            raise ValueError(f"unsupported mlxd_pooling {pooling!r} in {model_dir}/config.json")
        return pooling, bool(config.get("mlxd_normalize", True))
    st = read_json(model_dir / "1_Pooling" / "config.json")
    if st:
        modes = [mode for key, mode in _ST_POOLING_KEYS.items() if st.get(key)]
        if len(modes) != 1:
            raise ValueError(f"unsupported sentence-transformers pooling in {model_dir}: {st}")
        return modes[0], True
    return "cls", True


class EmbeddingsRunner:
    """A loaded encoder + tokenizer; `embed` returns pooled, L2-normalised float32 vectors."""

    def __init__(
        self,
        model: object,
        tokenizer: object,
        config: dict,
        *,
        model_id: str,
        pooling: str,
        normalize: bool = True,
        batch_tokens: int = Config.embeddings_batch_tokens,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.model_id = model_id
        self.pooling = pooling
        self.normalize = normalize
        self.batch_tokens = batch_tokens  # padded tokens per forward pass: bounds memory
        self.hidden_size = int(config["hidden_size"])
        self._vocab_size = int(config["vocab_size"])
        self.max_tokens = _max_tokens(config, tokenizer)
        self.pad_id = int(getattr(tokenizer, "pad_token_id", None) or 0)

    @classmethod
    def load(
        cls, model_dir: Path, model_id: str, *, batch_tokens: int = Config.embeddings_batch_tokens
    ) -> EmbeddingsRunner:
        """Load weights and tokenizer from an existing local directory (never the hub)."""
        from mlx_embeddings.utils import load_config, load_model
        from transformers import AutoTokenizer

        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no embeddings model at {model_dir} (config.json missing)")
        pooling, normalize = read_pooling(model_dir)
        model = load_model(model_dir, path_to_repo=str(model_dir))
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        runner = cls(
            model,
            tokenizer,
            load_config(model_dir),
            model_id=model_id,
            pooling=pooling,
            normalize=normalize,
            batch_tokens=batch_tokens,
        )
        runner.embed(runner.tokenize(["warm up"]))
        return runner

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Token ids with the model's special tokens ([CLS] ... [SEP]); never truncated."""
        encoded = self.tokenizer(list(texts), add_special_tokens=True, truncation=False)
        return [list(ids) for ids in encoded["input_ids"]]

    def vocab_size(self) -> int:
        return self._vocab_size

    def embed(self, token_lists: list[list[int]]) -> np.ndarray:
        """float32 [n, hidden]: pooled (and normalised) embeddings, in input order."""
        self._check(token_lists)
        out = np.empty((len(token_lists), self.hidden_size), dtype=np.float32)
        for idx in _length_batches(token_lists, self.batch_tokens):
            out[idx] = self._embed_batch([token_lists[i] for i in idx])
        return out

    def _check(self, token_lists: list[list[int]]) -> None:
        for ids in token_lists:
            if not ids:
                raise ValueError("cannot embed an empty token list")
            if len(ids) > self.max_tokens:
                raise ValueError(f"{len(ids)} tokens exceed the model's limit of {self.max_tokens}")
            if min(ids) < 0 or max(ids) >= self._vocab_size:
                raise ValueError(f"token ids must be in [0, {self._vocab_size})")

    def _embed_batch(self, batch: list[list[int]]) -> np.ndarray:
        lengths = [len(ids) for ids in batch]
        width = max(lengths)
        ids = np.full((len(batch), width), self.pad_id, dtype=np.int32)
        mask = np.zeros((len(batch), width), dtype=np.float32)
        for row, seq in enumerate(batch):
            ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1.0
        mask_mx = mx.array(mask)
        out = self.model(mx.array(ids), attention_mask=mask_mx)
        hidden = out.last_hidden_state.astype(mx.float32)
        pooled = self._pool(hidden, mask_mx, lengths)
        if self.normalize:
            pooled = pooled / mx.maximum(mx.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        mx.eval(pooled)
        return np.array(pooled, dtype=np.float32)

    def _pool(self, hidden: mx.array, mask: mx.array, lengths: list[int]) -> mx.array:
        if self.pooling == "cls":
            return hidden[:, 0]
        if self.pooling == "mean":
            summed = (hidden * mask[:, :, None]).sum(axis=1)
            return summed / mx.maximum(mask.sum(axis=1, keepdims=True), 1.0)
        last = mx.array(np.asarray(lengths, dtype=np.int32) - 1)
        return hidden[mx.arange(hidden.shape[0]), last]


def _max_tokens(config: dict, tokenizer: object) -> int:
    limit = int(config.get("max_position_embeddings", 512))
    tok_limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_limit, int) and 0 < tok_limit < 1_000_000:
        limit = min(limit, tok_limit)
    return limit


def _length_batches(token_lists: list[list[int]], max_tokens: int) -> list[list[int]]:
    """Indices grouped longest-first so each padded batch stays under `max_tokens`."""
    order = sorted(range(len(token_lists)), key=lambda i: -len(token_lists[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = len(token_lists[current[0]]) if current else len(token_lists[i])
        if current and (len(current) + 1) * width > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def smoke_test(model_dir: Path) -> None:
    """Load as the service does and embed one short text (`mlxd convert` runs this)."""
    runner = EmbeddingsRunner.load(Path(model_dir), Path(model_dir).name)
    vectors = runner.embed(runner.tokenize(["mlxd smoke test: 你好, world"]))
    if vectors.shape != (1, runner.hidden_size):
        raise ValueError(f"smoke test: embedding shape {vectors.shape} is wrong")
    if not np.all(np.isfinite(vectors)):
        raise ValueError("smoke test: the embedding has non-finite values")
    if runner.normalize and abs(float(np.linalg.norm(vectors[0])) - 1.0) > 1e-3:
        raise ValueError("smoke test: the embedding is not unit length")
