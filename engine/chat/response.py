"""The chat reply on the wire: the assistant message as it builds up, SSE streaming (with
keep-alives and llama-server's `timings`), and the OpenAI response bodies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from sanic import Request

from engine import __version__
from engine.chat.output import Delta, OutputParser
from engine.chat.request import ChatRequest
from engine.chat.types import ChatOutcome, Piece, Started
from engine.errors import ApiError
from engine.modelthread import Job

KEEPALIVE_S = 5.0
FINGERPRINT = f"mlxd-{__version__}"


class Reply:
    """The assistant message as it builds up, piece by piece."""

    def __init__(self, chat: ChatRequest, started: Started) -> None:
        self.parser = OutputParser(reasoning=started.reasoning_open, tools=chat.parse_tools)
        self.message = Delta()
        self.reasoning_tokens = 0
        self.logprobs: list[dict[str, Any]] | None = [] if chat.logprobs is not None else None
        self.unsent_logprobs: list[dict[str, Any]] = []

    def add(self, piece: Piece) -> Delta:
        was_reasoning = self.parser.mode == "reasoning"
        delta = self.parser.feed(piece.text)
        if piece.token is not None and (
            was_reasoning or self.parser.mode == "reasoning" or delta.reasoning
        ):
            self.reasoning_tokens += 1
        if piece.logprob is not None and self.logprobs is not None:
            self.logprobs.append(piece.logprob)
            self.unsent_logprobs.append(piece.logprob)
        self.message.extend(delta)
        return delta

    def finish(self) -> Delta:
        delta = self.parser.finish()
        self.message.extend(delta)
        return delta

    def take_logprobs(self) -> dict[str, Any] | None:
        if self.logprobs is None:
            return None
        out, self.unsent_logprobs = self.unsent_logprobs, []
        return {"content": out}

    def finish_reason(self, outcome: ChatOutcome) -> str:
        if self.message.tool_calls and outcome.finish_reason == "stop":
            return "tool_calls"
        return outcome.finish_reason

    def as_message(self) -> dict[str, Any]:
        calls = self.message.tool_calls
        content = self.message.content
        message: dict[str, Any] = {
            "role": "assistant",
            "content": None if calls and not content else content,
        }
        if self.message.reasoning:
            message["reasoning_content"] = self.message.reasoning
            message["reasoning"] = self.message.reasoning
        if calls:
            message["tool_calls"] = [c.as_dict() for c in calls]
        return message


# ---- streaming ---------------------------------------------------------------------------


async def stream_reply(
    request: Request, job: Job, events: Any, meta: dict, reply: Reply, include_usage: bool
) -> None:
    response = await request.respond(
        content_type="text/event-stream", headers={"cache-control": "no-cache"}
    )
    pending = None
    try:
        await response.send(_sse(chunk(meta, {"role": "assistant", "content": ""})))
        while True:
            pending = asyncio.ensure_future(anext(events, None))
            while not (await asyncio.wait({pending}, timeout=KEEPALIVE_S))[0]:
                await response.send(": keepalive\n\n")
            piece = pending.result()
            if piece is None:
                break
            await _send_delta(response, meta, reply, reply.add(piece))
        await _send_delta(response, meta, reply, reply.finish())
        await _stream_end(response, job, meta, reply, include_usage)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
        if not job.future.done():
            job.cancel()


async def _send_delta(response: Any, meta: dict, reply: Reply, delta: Delta) -> None:
    for payload in delta_payloads(delta, reply):
        await response.send(_sse(chunk(meta, payload, logprobs=reply.take_logprobs())))


def delta_payloads(delta: Delta, reply: Reply) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if delta.reasoning:
        out.append({"reasoning_content": delta.reasoning, "reasoning": delta.reasoning})
    if delta.content:
        out.append({"content": delta.content})
    first = len(reply.message.tool_calls) - len(delta.tool_calls)
    for i, call in enumerate(delta.tool_calls):
        out.append({"tool_calls": [call.as_dict(index=first + i)]})
    return out


async def _stream_end(
    response: Any, job: Job, meta: dict, reply: Reply, include_usage: bool
) -> None:
    try:
        outcome: ChatOutcome = await job.result()
    except ApiError as exc:
        await response.send(_sse(exc.body()))
        await response.eof()
        return
    last = chunk(meta, {}, reply.finish_reason(outcome), logprobs=reply.take_logprobs())
    await response.send(_sse({**last, "timings": timings(outcome)}))  # as llama-server
    if include_usage:
        envelope = _envelope(meta, "chat.completion.chunk")
        await response.send(_sse({**envelope, "choices": [], "usage": usage(outcome, reply)}))
    await response.send("data: [DONE]\n\n")
    await response.eof()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---- response bodies ---------------------------------------------------------------------


def _envelope(meta: dict, kind: str) -> dict[str, Any]:
    return {
        "id": meta["id"],
        "object": kind,
        "created": meta["created"],
        "model": meta["model"],
        "system_fingerprint": FINGERPRINT,
    }


def chunk(
    meta: dict,
    delta: dict,
    finish_reason: str | None = None,
    *,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_envelope(meta, "chat.completion.chunk"), "choices": [choice]}


def usage(outcome: ChatOutcome, reply: Reply) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": min(reply.reasoning_tokens, outcome.completion_tokens)
        },
    }


def completion_body(outcome: ChatOutcome, reply: Reply, meta: dict) -> dict[str, Any]:
    choice = {
        "index": 0,
        "message": reply.as_message(),
        "logprobs": None if reply.logprobs is None else {"content": reply.logprobs},
        "finish_reason": reply.finish_reason(outcome),
    }
    return {
        **_envelope(meta, "chat.completion"),
        "choices": [choice],
        "usage": usage(outcome, reply),
        "timings": timings(outcome),
    }


def timings(outcome: ChatOutcome) -> dict[str, float]:
    def rate(n: int, ms: float) -> float:
        return round(n / ms * 1000, 3) if ms > 0 else 0.0

    return {
        "prompt_n": outcome.prompt_tokens,
        "prompt_ms": round(outcome.prompt_ms, 3),
        "prompt_per_second": rate(outcome.prompt_tokens, outcome.prompt_ms),
        "predicted_n": outcome.completion_tokens,
        "predicted_ms": round(outcome.predicted_ms, 3),
        "predicted_per_second": rate(outcome.completion_tokens, outcome.predicted_ms),
    }
