"""Chat service (port 8080): OpenAI `POST /v1/chat/completions`.

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
from engine.chat import decode, metrics
from engine.chat.request import parse_request
from engine.chat.response import Reply, completion_body, stream_reply
from engine.config import Config
from engine.errors import InvalidRequest
from engine.lifecycle import submit
from engine.modelthread import Job
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
    job = submit(request, chat, stream=True)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    events = job.batches()
    started, *early = await _first_batch(job, events)  # errors before generation: plain JSON
    replies = [Reply(chat, started, index) for index in range(chat.n)]
    if stream:
        await stream_reply(request, job, events, meta, replies, include_usage, early)
        return None
    for piece in early:
        replies[piece.index].add(piece)
    async for batch in events:
        for piece in batch:
            replies[piece.index].add(piece)
    for reply in replies:
        reply.finish()
    return json_response(completion_body(await job.result(), replies, meta))


async def _first_batch(job: Job, events: Any) -> list[Any]:
    """The first events: `Started`, then any pieces that came with it."""
    try:
        return await anext(events)
    except StopAsyncIteration:
        await job.result()  # raises the job's error
        raise InvalidRequest("The request ended before generation started") from None


def load(model: ModelInfo, config: Config) -> Any:
    from engine.chat.runner import ChatRunner

    return ChatRunner.load(model.path, model.id)


SERVICE = ServiceSpec(
    name="chat", blueprint=bp, load=load, policy=decode.policy, metrics=metrics.observer
)
