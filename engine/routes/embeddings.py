"""Embeddings service (port 8081): OpenAI `POST /v1/embeddings`."""

from __future__ import annotations

import base64
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

from conversions.store import ModelInfo
from engine.config import Config
from engine.errors import InvalidRequest
from engine.scheduler import BatchRule, Cancelled, Job
from engine.server import ServiceSpec, resolve_requested_model
from engine.validation import (
    optional_bool,
    optional_number,
    optional_string,
    parse_json_body,
    required,
)

bp = Blueprint("embeddings")


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str] | None  # either texts or token id lists
    token_lists: list[list[int]] | None
    truncate: bool

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_lists or [])


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray
    token_counts: list[int]
    truncated: list[int]


def parse_input(value: Any, limit: int) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRequest(
            "'input' must be a string, an array of strings, an array of token ids or an array "
            "of token-id arrays",
            param="input",
            code="invalid_type",
        )
    if not value:
        raise InvalidRequest("'input' must not be empty", param="input", code="empty_input")
    if len(value) > limit:
        raise InvalidRequest(f"'input' has {len(value)} items; the limit is {limit}", param="input")
    if all(_is_token(item) for item in value):
        return None, [value]
    if all(isinstance(item, list) for item in value):
        return None, [_token_list(item, i) for i, item in enumerate(value)]
    return [_text(item, i) for i, item in enumerate(value)], None


def _is_token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _token_list(item: list, index: int) -> list[int]:
    if not item:
        raise InvalidRequest(f"input[{index}] is an empty token list", param=f"input[{index}]")
    if not all(_is_token(t) for t in item):
        raise InvalidRequest(
            f"input[{index}] must contain only integer token ids", param=f"input[{index}]"
        )
    return item


def _text(item: Any, index: int) -> str:
    if not isinstance(item, str):
        raise InvalidRequest(
            f"input[{index}] must be a string (or every item a token id / token-id array)",
            param=f"input[{index}]",
            code="invalid_type",
        )
    if not item:
        raise InvalidRequest(f"input[{index}] is an empty string", param=f"input[{index}]")
    return item


@bp.post("/v1/embeddings")
@bp.post("/embeddings", name="create_embeddings_short")
async def create_embeddings(request: Request) -> HTTPResponse:
    body = parse_json_body(request)
    model = resolve_requested_model(request, body.get("model"))
    config: Config = request.app.ctx.config
    texts, token_lists = parse_input(required(body, "input"), config.embeddings_max_inputs)
    encoding = optional_string(body, "encoding_format", ("float", "base64")) or "float"
    dimensions = optional_number(body, "dimensions", minimum=1, integer=True)
    truncate = optional_bool(body, "truncate", default=config.embeddings_truncate)
    job = request.app.ctx.worker.submit("embed", EmbedRequest(texts, token_lists, truncate))
    result: EmbedResult = await job.result()
    vectors = _resize(result.vectors, dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
        for i, vector in enumerate(vectors)
    ]
    tokens = sum(result.token_counts)
    headers = {"x-mlxd-truncated": ",".join(map(str, result.truncated))} if result.truncated else {}
    payload: dict[str, Any] = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    if truncate:
        payload["truncated"] = result.truncated
    return json_response(payload, headers=headers)


def _resize(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    if dimensions is None:
        return vectors
    if dimensions > vectors.shape[1]:
        raise InvalidRequest(
            f"'dimensions' is {dimensions}, larger than the model's {vectors.shape[1]}",
            param="dimensions",
            code="out_of_range",
        )
    cut = vectors[:, :dimensions]
    norms = np.linalg.norm(cut, axis=1, keepdims=True)
    return cut / np.maximum(norms, 1e-12)


def _encode(vector: np.ndarray, encoding: str) -> list[float] | str:
    if encoding == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
    return vector.astype(np.float32).tolist()


# ---- model-thread side -------------------------------------------------------------------


def _checked(
    runner: Any, request: EmbedRequest, lists: list[list[int]]
) -> tuple[list[list[int]], list[int]]:
    """One request's token lists, checked against the vocabulary and the model's limit."""
    vocab, limit = runner.vocab_size(), runner.max_tokens
    truncated = []
    for index, tokens in enumerate(lists):
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(
                f"input[{index}] has token id {bad[0]} outside the vocabulary (0..{vocab - 1})",
                param=f"input[{index}]",
            )
        if len(tokens) > limit:
            if not request.truncate:
                raise InvalidRequest(
                    f"input[{index}] has {len(tokens)} tokens, over the model's limit of {limit}; "
                    'shorten it or send "truncate": true',
                    param=f"input[{index}]",
                    code="context_length_exceeded",
                )
            truncated.append(index)
    if truncated:
        lists = [_truncate(t, limit, keep_last=request.texts is not None) for t in lists]
    return lists, truncated


def _truncate(tokens: list[int], limit: int, keep_last: bool) -> list[int]:
    if len(tokens) <= limit:
        return tokens
    return tokens[: limit - 1] + tokens[-1:] if keep_last else tokens[:limit]


@dataclass
class _Work:
    """One request being embedded: its sequences, and the vectors done so far."""

    job: Job
    sequences: list[list[int]]
    truncated: list[int]
    vectors: np.ndarray
    next: int = 0

    @property
    def remaining_tokens(self) -> int:
        return sum(len(s) for s in self.sequences[self.next :])


def _start(runner: Any, jobs: list[Job]) -> list[_Work]:
    """Tokenize the texts of all `jobs` in one call, then check each request on its own."""
    texts = [text for job in jobs for text in job.payload.texts or []]
    tokenized = iter(runner.tokenize(texts) if texts else [])
    work = []
    for job in jobs:
        request: EmbedRequest = job.payload
        if request.texts is not None:
            lists = [next(tokenized) for _ in request.texts]
        else:
            lists = request.token_lists or []
        try:
            sequences, truncated = _checked(runner, request, lists)
        except InvalidRequest as exc:
            job.finish(error=exc)
            continue
        vectors = np.empty((len(sequences), runner.hidden_size), dtype=np.float32)
        work.append(_Work(job, sequences, truncated, vectors))
    return work


def _next_round(work: list[_Work], budget: int) -> list[tuple[_Work, int]]:
    """Sequences for one forward pass: the oldest request's next one (so nothing starves), then
    the requests with the least left first, until the token budget is spent."""
    picked = [(work[0], work[0].next)]
    spent = len(work[0].sequences[work[0].next])
    cursor = {id(work[0]): work[0].next + 1}
    for item in sorted(work, key=lambda w: w.remaining_tokens):
        index = cursor.get(id(item), item.next)
        while index < len(item.sequences) and spent + len(item.sequences[index]) <= budget:
            picked.append((item, index))
            spent += len(item.sequences[index])
            index += 1
        cursor[id(item)] = index
    return picked


def embed_batch(
    runner: Any, jobs: list[Job], take_more: Callable[[], list[Job]], budget: int
) -> None:
    """Embed requests together, round by round; finish each as soon as its vectors are done and
    admit requests that arrive meanwhile, so a large request cannot starve small ones."""
    work = _start(runner, jobs)
    while work:
        picked = _next_round(work, budget)
        vectors = runner.embed([item.sequences[index] for item, index in picked])
        for (item, index), vector in zip(picked, vectors, strict=True):
            item.vectors[index] = vector
            item.next = max(item.next, index + 1)
        work = _settle(work) + _start(runner, take_more())


def _settle(work: list[_Work]) -> list[_Work]:
    left = []
    for item in work:
        if item.job.cancelled:
            item.job.finish(error=Cancelled())
        elif item.next == len(item.sequences):
            lengths = [len(s) for s in item.sequences]
            item.job.finish(EmbedResult(item.vectors, lengths, item.truncated))
        else:
            left.append(item)
    return left


def _batch_rules(config: Config) -> dict[str, BatchRule]:
    limit = config.embeddings_max_inputs

    def fits(batch: list[Job], job: Job) -> bool:
        if not config.embeddings_batching:
            return False
        return sum(j.payload.count for j in batch) + job.payload.count <= limit

    def handler(runner: Any, jobs: list[Job], take_more: Callable[[], list[Job]]) -> None:
        more = take_more if config.embeddings_batching else list
        embed_batch(runner, jobs, more, config.embeddings_batch_tokens)

    return {"embed": BatchRule(handler, fits)}


def load(model: ModelInfo, config: Config) -> Any:
    from engine.runners.embeddings import EmbeddingsRunner

    return EmbeddingsRunner.load(model.path, model.id)


SPEC = ServiceSpec(name="embeddings", blueprint=bp, load=load, batch_rules=_batch_rules)
