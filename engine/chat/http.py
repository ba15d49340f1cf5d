"""Chat service (port 8080): OpenAI `POST /v1/chat/completions`; the other APIs on this port
live in `anthropic` (Messages), `responses` (Responses) and `completions` (legacy completions).

The handler validates the body (`request`), queues one job and reads its events: `Started` once
the prompt is rendered and fits, then one `Piece` per decoded token (`decode`, on the model
thread). Streamed and non-streamed replies run those pieces through the same OutputParser
(`output`), which splits thinking, content and tool calls, and are shaped by `response`.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

from engine.app import ServiceSpec, resolve_requested_model
from engine.chat import anthropic, completions, decode, jobs, metrics, openapi, responses
from engine.chat.request import parse_request
from engine.chat.response import completion_body, stream_reply
from engine.config import Config
from engine.store import ModelInfo
from engine.validation import optional_bool, optional_object, parse_json_body

bp = Blueprint("chat")


@bp.post("/v1/chat/completions")
@bp.post("/chat/completions", name="chat_completions_short")
async def chat_completions(request: Request) -> HTTPResponse | None:
    body = parse_json_body(request)
    model = resolve_requested_model(request, body.get("model"))
    stream = optional_bool(body, "stream")
    include_usage = optional_bool(optional_object(body, "stream_options"), "include_usage")
    chat = await parse_request(request, body)
    running = await jobs.start(request, chat)  # errors before generation: plain JSON
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    if stream:
        await stream_reply(
            request,
            running.job,
            running.events,
            meta,
            running.replies,
            include_usage,
            running.early,
        )
        return None
    outcome = await jobs.gather(running)
    return json_response(completion_body(outcome, running.replies, meta))


ROUTES = (
    (anthropic.messages, "/v1/messages", "POST", "messages"),
    (anthropic.count_tokens, "/v1/messages/count_tokens", "POST", "count_tokens"),
    (responses.create, "/v1/responses", "POST", "responses_create"),
    (responses.retrieve, "/v1/responses/<response_id>", "GET", "responses_get"),
    (responses.delete, "/v1/responses/<response_id>", "DELETE", "responses_delete"),
    (responses.input_items, "/v1/responses/<response_id>/input_items", "GET", "input_items"),
    (completions.create, "/v1/completions", "POST", "completions"),
    (completions.create, "/completions", "POST", "completions_short"),
)
for handler, uri, method, name in ROUTES:
    bp.add_route(handler, uri, methods=[method], name=name)
bp.before_server_start(responses.attach_store)


def load(model: ModelInfo, config: Config) -> Any:
    from engine.chat.runner import ChatRunner

    return ChatRunner.load(model.path, model.id)


SERVICE = ServiceSpec(
    name="chat",
    blueprint=bp,
    load=load,
    policy=decode.policy,
    metrics=metrics.observer,
    error_shapes=((anthropic.ROUTE_PREFIX, anthropic.error_response),),
    openapi=openapi.paths,
)
