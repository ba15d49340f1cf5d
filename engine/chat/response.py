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

    def __init__(self, chat: ChatRequest, started: Started, index: int = 0) -> None:
        self.index = index
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
        reason = outcome.finish_reasons[self.index]
        return "tool_calls" if self.message.tool_calls and reason == "stop" else reason

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
    request: Request,
    job: Job,
    events: Any,
    meta: dict,
    replies: list[Reply],
    include_usage: bool,
    early: list[Piece],
) -> None:
    """SSE: a role chunk per choice, then the pieces as they come (those that arrived together
    in one chunk per choice), `: keepalive` while waiting, the finishing chunks and [DONE]."""
    response = await request.respond(
        content_type="text/event-stream", headers={"cache-control": "no-cache"}
    )
    pending = None
    try:
        for reply in replies:
            role = {"role": "assistant", "content": ""}
            await response.send(_sse(chunk(meta, role, index=reply.index)))
        await _send(response, _piece_frames(meta, replies, early))
        while True:
            pending = asyncio.ensure_future(anext(events, None))
            while not (await asyncio.wait({pending}, timeout=KEEPALIVE_S))[0]:
                await response.send(": keepalive\n\n")
            pieces = pending.result()
            if pieces is None:
                break
            if _client_gone(request):
                return  # the job is cancelled on the way out
            await _send(response, _piece_frames(meta, replies, pieces))
        tails = [_frames(meta, r, delta_payloads(r.finish(), r)) for r in replies]
        await _send(response, "".join(tails))
        await _stream_end(response, job, meta, replies, include_usage)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
        if not job.future.done():
            job.cancel()


def _client_gone(request: Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def _send(response: Any, frames: str) -> None:
    if frames:  # an empty write would end a chunked response
        await response.send(frames)


def _piece_frames(meta: dict, replies: list[Reply], pieces: list[Piece]) -> str:
    """The SSE frames for pieces that arrived together: one chunk per choice and kind."""
    payloads: dict[int, list[dict[str, Any]]] = {}
    for piece in pieces:
        reply = replies[piece.index]
        payloads.setdefault(piece.index, []).extend(delta_payloads(reply.add(piece), reply))
    return "".join(_frames(meta, replies[i], _merged(items)) for i, items in payloads.items())


def _merged(payloads: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Adjacent text payloads of the same kind joined (tool calls stay apart)."""
    out: list[dict[str, Any]] = []
    for item in payloads:
        if out and out[-1].keys() == item.keys() and "tool_calls" not in item:
            out[-1] = {key: out[-1][key] + item[key] for key in item}
        else:
            out.append(dict(item))
    return out


def _frames(meta: dict, reply: Reply, payloads: list[dict[str, Any]]) -> str:
    return "".join(
        _sse(chunk(meta, payload, logprobs=reply.take_logprobs(), index=reply.index))
        for payload in payloads
    )


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
    response: Any, job: Job, meta: dict, replies: list[Reply], include_usage: bool
) -> None:
    try:
        outcome: ChatOutcome = await job.result()
    except ApiError as exc:
        await response.send(_sse(exc.body()))
        await response.eof()
        return
    for reply in replies:
        reason = reply.finish_reason(outcome)
        last = chunk(meta, {}, reason, logprobs=reply.take_logprobs(), index=reply.index)
        if reply is replies[-1]:
            last["timings"] = timings(outcome)  # as llama-server
        await response.send(_sse(last))
    if include_usage:
        envelope = _envelope(meta, "chat.completion.chunk")
        await response.send(_sse({**envelope, "choices": [], "usage": usage(outcome, replies)}))
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
    index: int = 0,
) -> dict[str, Any]:
    choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
    return {**_envelope(meta, "chat.completion.chunk"), "choices": [choice]}


def usage(outcome: ChatOutcome, replies: list[Reply]) -> dict[str, Any]:
    reasoning = sum(reply.reasoning_tokens for reply in replies)
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
        "completion_tokens_details": {
            "reasoning_tokens": min(reasoning, outcome.completion_tokens)
        },
    }


def completion_body(outcome: ChatOutcome, replies: list[Reply], meta: dict) -> dict[str, Any]:
    choices = [
        {
            "index": reply.index,
            "message": reply.as_message(),
            "logprobs": None if reply.logprobs is None else {"content": reply.logprobs},
            "finish_reason": reply.finish_reason(outcome),
        }
        for reply in replies
    ]
    return {
        **_envelope(meta, "chat.completion"),
        "choices": choices,
        "usage": usage(outcome, replies),
        "timings": timings(outcome),
    }


def timings(outcome: ChatOutcome) -> dict[str, float]:
    def rate(n: int, ms: float) -> float:
        return round(n / ms * 1000, 3) if ms > 0 else 0.0

    read = outcome.prompt_tokens - outcome.cached_tokens
    return {
        "cache_n": outcome.cached_tokens,
        "prompt_n": read,
        "prompt_ms": round(outcome.prompt_ms, 3),
        "prompt_per_second": rate(read, outcome.prompt_ms),
        "predicted_n": outcome.completion_tokens,
        "predicted_ms": round(outcome.predicted_ms, 3),
        "predicted_per_second": rate(outcome.completion_tokens, outcome.predicted_ms),
    }
