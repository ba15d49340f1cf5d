"""Chat service (port 8080): OpenAI `POST /v1/chat/completions`.

The handler validates the body (engine.routes.chat_request), queues one job and reads its
events: `Started` once the prompt is rendered and fits, then one `Piece` per decoded token;
the model thread interleaves the decode steps of up to `chat_parallel` replies (`interleave`).
Both the streamed and the non-streamed reply run those pieces through the same OutputParser
(engine.routes.chat_output), which splits thinking, content and tool calls.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

from conversions.store import ModelInfo
from engine import __version__
from engine.config import Config
from engine.errors import ApiError, InvalidRequest
from engine.routes.chat_output import THINK_CLOSE, THINK_OPEN, Delta, OutputParser, ToolCall
from engine.routes.chat_request import (
    ChatRequest,
    build_constraint,
    check_n,
    decode_image,
    parse_logprobs,
    parse_max_tokens,
    parse_messages,
    parse_response_format,
    parse_sampling,
    parse_stop,
    parse_thinking,
    parse_tool_choice,
    parse_tools,
)
from engine.scheduler import BatchRule, Job, as_client_error
from engine.server import ServiceSpec, resolve_requested_model
from engine.validation import optional_bool, optional_object, parse_json_body, required

bp = Blueprint("chat")
log = logging.getLogger("mlxd.chat")

KEEPALIVE_S = 5.0
FINGERPRINT = f"mlxd-{__version__}"
MIN_LOGPROB = -9999.0  # what OpenAI reports for tokens a mask made impossible (JSON has no -inf)


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    reasoning_open: bool = False  # the rendered prompt ends inside a thought channel


@dataclass(frozen=True)
class Piece:
    text: str
    token: int | None
    logprob: dict[str, Any] | None = None


@dataclass
class ChatOutcome:
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0


# ---- parsing -----------------------------------------------------------------------------


async def parse_request(request: Request, body: dict[str, Any]) -> ChatRequest:
    messages, refs = parse_messages(required(body, "messages"))
    check_n(body)
    tools = parse_tools(body)
    choice = parse_tool_choice(body, tools)
    thinking = parse_thinking(body)
    constraint = build_constraint(parse_response_format(body), tools, choice, thinking)
    chat = ChatRequest(
        messages=messages,
        images=[],
        sampling=parse_sampling(body),
        max_tokens=parse_max_tokens(body),
        stop=parse_stop(body.get("stop")),
        enable_thinking=thinking,
        tools=tools if tools and choice != "none" else None,
        parse_tools=bool(tools) and choice != "none",
        constraint=constraint,
        logprobs=parse_logprobs(body),
        image_refs=refs,
    )
    allow = request.app.ctx.config.chat_allow_image_urls
    loop = asyncio.get_running_loop()
    for ref in refs:
        chat.images.append(await loop.run_in_executor(None, decode_image, ref, allow))
    return chat


# ---- handlers ----------------------------------------------------------------------------


@bp.post("/v1/chat/completions")
@bp.post("/chat/completions", name="chat_completions_short")
async def chat_completions(request: Request) -> HTTPResponse | None:
    body = parse_json_body(request)
    model = resolve_requested_model(request, body.get("model"))
    stream = optional_bool(body, "stream")
    include_usage = optional_bool(optional_object(body, "stream_options"), "include_usage")
    chat = await parse_request(request, body)
    job = request.app.ctx.worker.submit("chat", chat, stream=True)
    meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    events = job.stream()
    started: Started = await _first_event(job, events)  # errors before generation: plain JSON
    reply = Reply(chat, started)
    if stream:
        await _stream(request, job, events, meta, reply, include_usage)
        return None
    async for piece in events:
        reply.add(piece)
    reply.finish()
    return json_response(completion_body(await job.result(), reply, meta))


async def _first_event(job: Job, events: Any) -> Any:
    try:
        return await anext(events)
    except StopAsyncIteration:
        await job.result()  # raises the job's error
        raise InvalidRequest("The request ended before generation started") from None


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


async def _stream(
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


# ---- model-thread side -------------------------------------------------------------------


def _context_error(n_prompt: int, n_ctx: int) -> InvalidRequest:
    return InvalidRequest(
        f"The prompt has {n_prompt} tokens, more than the model's context of {n_ctx} tokens "
        "leaves room for",
        code="context_length_exceeded",
        extra={"n_prompt_tokens": n_prompt, "n_ctx": n_ctx},
    )


def opens_reasoning(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves a thought channel open for the model to fill."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def chat_steps(runner: Any, job: Job) -> Generator[None, None, ChatOutcome]:
    """One reply, a decode step per `next()`: render and check the prompt, then generate."""
    from engine.runners.chat_types import PromptTooLongError

    request: ChatRequest = job.payload
    try:
        prompt = runner.prepare(
            request.messages,
            request.images,
            enable_thinking=request.enable_thinking,
            tools=request.tools,
        )
    except PromptTooLongError as exc:
        raise _context_error(exc.n_prompt_tokens, exc.n_ctx) from None
    except ValueError as exc:
        raise InvalidRequest(f"The messages could not be rendered: {exc}") from None
    context = runner.context_length
    if prompt.n_tokens >= context:
        raise _context_error(prompt.n_tokens, context)
    params = _params(runner, request, context - prompt.n_tokens)
    job.emit(Started(prompt.n_tokens, opens_reasoning(prompt.text)))
    return (yield from _decode(runner, job, prompt, params))


def _params(runner: Any, request: ChatRequest, room: int) -> Any:
    from engine.runners.chat_types import ChatParams

    sampling = {**runner.generation_defaults(), **request.sampling}
    return ChatParams(
        max_tokens=min(request.max_tokens or room, room),
        temperature=sampling.get("temperature", 1.0),
        top_p=sampling.get("top_p", 1.0),
        top_k=sampling.get("top_k", 0),
        min_p=sampling.get("min_p", 0.0),
        seed=sampling.get("seed"),
        stop=request.stop,
        repetition_penalty=sampling.get("repetition_penalty"),
        presence_penalty=sampling.get("presence_penalty", 0.0),
        frequency_penalty=sampling.get("frequency_penalty", 0.0),
        logprobs=request.logprobs,
        constraint=request.constraint,
    )


def _decode(runner: Any, job: Job, prompt: Any, params: Any) -> Generator[None, None, ChatOutcome]:
    outcome = ChatOutcome(prompt_tokens=prompt.n_tokens)
    started = time.perf_counter()
    first_token_at = None
    try:
        for step in runner.generate(prompt, params, lambda: job.cancelled):
            first_token_at = first_token_at or time.perf_counter()
            _emit_step(runner, job, params, step, outcome)
            yield
    except ValueError as exc:  # e.g. a response format this tokenizer cannot enforce
        raise InvalidRequest(f"Generation failed: {exc}", param="response_format") from None
    if job.cancelled:
        log.info("chat: generation cancelled after %d tokens", outcome.completion_tokens)
    finished = time.perf_counter()
    first_token_at = first_token_at or finished
    outcome.prompt_ms = (first_token_at - started) * 1000
    outcome.predicted_ms = (finished - first_token_at) * 1000
    return outcome


def _emit_step(runner: Any, job: Job, params: Any, step: Any, outcome: ChatOutcome) -> None:
    if step.token is not None:
        outcome.completion_tokens += 1
    if step.finish_reason is not None:
        outcome.finish_reason = step.finish_reason
    entry = None
    hidden = getattr(runner, "eos_token_ids", ())
    if params.logprobs is not None and step.token is not None and step.token not in hidden:
        entry = _logprob_entry(runner, step)
    if step.text or step.token is not None:
        job.emit(Piece(step.text, step.token, entry))


def _logprob_entry(runner: Any, step: Any) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = runner.decode_token(token)
        value = max(float(logprob), MIN_LOGPROB)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    entry = item(step.token, step.logprob if step.logprob is not None else 0.0)
    entry["top_logprobs"] = [item(t, lp) for t, lp in step.top_logprobs]
    return entry


def interleave(runner: Any, jobs: list[Job], take_more: Callable[[], list[Job]]) -> None:
    """Generate several replies at once, one decode step of each in turn, admitting requests
    that arrive meanwhile into the slots that free up. A failure ends only its own reply."""
    running: dict[Job, Generator[None, None, ChatOutcome]] = {}
    while jobs or running:
        for job in jobs:
            running[job] = chat_steps(runner, job)
        for job, steps in list(running.items()):
            if _step(job, steps):
                del running[job]
        jobs = take_more()


def _step(job: Job, steps: Generator[None, None, ChatOutcome]) -> bool:
    """Advance one reply by a step; True when it has ended (and its job is finished)."""
    try:
        next(steps)
    except StopIteration as done:
        job.finish(done.value)
    except Exception as exc:  # noqa: BLE001 - reported to this reply's request only
        job.finish(error=as_client_error(exc, "chat"))
    else:
        return False
    return True


def _batch_rules(config: Config) -> dict[str, BatchRule]:
    def fits(batch: list[Job], job: Job) -> bool:
        return len(batch) < config.chat_parallel

    return {"chat": BatchRule(interleave, fits)}


def load(model: ModelInfo, config: Config) -> Any:
    from engine.runners.chat import ChatRunner

    return ChatRunner.load(model.path, model.id)


SPEC = ServiceSpec(name="chat", blueprint=bp, load=load, batch_rules=_batch_rules)


__all__ = ["SPEC", "ChatOutcome", "Piece", "Reply", "Started", "ToolCall", "chat_steps"]
