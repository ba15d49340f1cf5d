"""Embeddings service (port 8081): OpenAI `POST /v1/embeddings`.

A client that leaves drops its request from the queue and the running batch (a 499); a large
response is built off the event loop."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import numpy as np
from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response
from sanic.response import raw

from engine.app import ServiceSpec, resolve_requested_model
from engine.config import Config
from engine.embeddings import decode, metrics, openapi
from engine.embeddings.request import EmbedRequest, EmbedResult, parse_input
from engine.errors import InvalidRequest
from engine.lifecycle import result as job_result
from engine.lifecycle import submit
from engine.store import ModelInfo
from engine.validation import (
    optional_bool,
    optional_number,
    optional_string,
    parse_json_body,
    required,
)

bp = Blueprint("embeddings")
LARGE_RESPONSE_FLOATS = 1 << 15  # vectors x dimensions past which the body is built in a thread


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
    job = submit(request, EmbedRequest(texts, token_lists, truncate))
    result: EmbedResult = await job_result(request, job, "embeddings")
    headers = {"x-mlxd-truncated": ",".join(map(str, result.truncated))} if result.truncated else {}
    build = (model, result, encoding, dimensions, truncate)
    if result.vectors.size <= LARGE_RESPONSE_FLOATS:
        return json_response(_payload(*build), headers=headers)
    loop = asyncio.get_running_loop()
    body = await loop.run_in_executor(None, lambda: json.dumps(_payload(*build)).encode())
    return raw(body, content_type="application/json", headers=headers)


def _payload(
    model: str, result: EmbedResult, encoding: str, dimensions: int | None, truncate: bool
) -> dict[str, Any]:
    vectors = _resize(result.vectors, dimensions)
    data = [
        {"object": "embedding", "index": i, "embedding": _encode(vector, encoding)}
        for i, vector in enumerate(vectors)
    ]
    tokens = sum(result.token_counts)
    payload: dict[str, Any] = {
        "object": "list",
        "data": data,
        "model": model,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    if truncate:
        payload["truncated"] = result.truncated
    return payload


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


def load(model: ModelInfo, config: Config) -> Any:
    from engine.embeddings.runner import EmbeddingsRunner

    return EmbeddingsRunner.load(model.path, model.id, batch_tokens=config.embeddings_batch_tokens)


SERVICE = ServiceSpec(
    name="embeddings",
    blueprint=bp,
    load=load,
    policy=decode.policy,
    metrics=metrics.observer,
    openapi=openapi.paths,
)
