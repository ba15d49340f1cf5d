"""Chat service (port 8080): OpenAI `POST /v1/chat/completions`."""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from sanic import Blueprint, HTTPResponse, Request
from sanic.response import json as json_response

from conversions.store import ModelInfo
from engine import __version__
from engine.config import Config
from engine.errors import ApiError, InvalidRequest
from engine.scheduler import Job
from engine.server import ServiceSpec, resolve_requested_model
from engine.validation import (
    optional_bool,
    optional_number,
    optional_object,
    parse_json_body,
    required,
    wrong_type,
)

bp = Blueprint("chat")
log = logging.getLogger("mlxd.chat")

ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_TYPES = ("JPEG", "PNG", "WEBP", "GIF")
MAX_IMAGE_PIXELS = 40_000_000
MAX_STOP = 16
KEEPALIVE_S = 5.0
FINGERPRINT = f"mlxd-{__version__}"


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    images: list[Any]
    sampling: dict[str, Any]  # only what the client set; the model thread adds the defaults
    max_tokens: int | None
    stop: tuple[str, ...]
    enable_thinking: bool | None
    tools: list[dict[str, Any]] | None


@dataclass(frozen=True)
class Started:
    prompt_tokens: int


@dataclass
class ChatOutcome:
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


# ---- parsing -----------------------------------------------------------------------------


def parse_messages(value: Any) -> tuple[list[dict[str, Any]], list[str]]:
    """Validated messages, and the image URLs in order of appearance."""
    if not isinstance(value, list):
        raise wrong_type("messages", "an array", value)
    if not value:
        raise InvalidRequest("'messages' must not be empty", param="messages")
    urls: list[str] = []
    return [_message(m, i, urls) for i, m in enumerate(value)], urls


def _message(message: Any, index: int, urls: list[str]) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise wrong_type(where, "an object", message)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role"
        )
    content = message.get("content")
    if content is None and role != "assistant":
        raise InvalidRequest(f"{where}.content is required", param=f"{where}.content")
    if isinstance(content, list):
        content = [_part(part, f"{where}.content[{i}]", urls) for i, part in enumerate(content)]
    elif content is not None and not isinstance(content, str):
        raise wrong_type(f"{where}.content", "a string or an array of parts", content)
    out = {**message, "role": "system" if role == "developer" else role, "content": content}
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise wrong_type(f"{where}.reasoning_content", "a string", reasoning)
    return out


def _part(part: Any, where: str, urls: list[str]) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise wrong_type(where, "an object", part)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise wrong_type(f"{where}.text", "a string", part.get("text"))
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "input_image"):
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise wrong_type(f"{where}.image_url.url", "a string", url)
        urls.append(url)
        return {"type": "image"}
    raise InvalidRequest(
        f"{where}.type must be 'text' or 'image_url'; got {kind!r}", param=f"{where}.type"
    )


def decode_image(url: str, index: int) -> Any:
    """A data: URL to an RGB PIL image; everything else is a clear 400."""
    from PIL import Image, UnidentifiedImageError

    param = f"image[{index}]"
    if url.startswith(("http://", "https://")):
        raise InvalidRequest(
            "Image URLs are not fetched (no network access at serve time): "
            "send the image inline as a base64 data: URL",
            param=param,
            code="image_url_not_allowed",
        )
    header, _, data = url.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise InvalidRequest(
            "Images must be base64 data: URLs (data:image/png;base64,...)", param=param
        )
    try:
        raw = base64.b64decode(data, validate=False)
        with Image.open(io.BytesIO(raw)) as probe:
            kind, (width, height) = probe.format, probe.size
        if kind not in IMAGE_TYPES:
            raise InvalidRequest(
                f"Unsupported image type {kind}: send JPEG, PNG, WebP or GIF", param=param
            )
        if width * height > MAX_IMAGE_PIXELS:
            raise InvalidRequest(
                f"Image is {width}x{height}, over the limit of {MAX_IMAGE_PIXELS} pixels",
                param=param,
            )
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (binascii.Error, UnidentifiedImageError, OSError, ValueError) as exc:
        if isinstance(exc, ApiError):
            raise
        raise InvalidRequest(f"Image could not be decoded: {exc}", param=param) from None


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise wrong_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP:
        raise InvalidRequest(f"'stop' has {len(items)} entries; the limit is {MAX_STOP}")
    return tuple(s for s in items if s)


def parse_sampling(body: dict[str, Any]) -> dict[str, Any]:
    values = {
        "temperature": optional_number(body, "temperature", minimum=0, maximum=2),
        "top_p": optional_number(body, "top_p", minimum=0, maximum=1, exclusive_minimum=True),
        "top_k": optional_number(body, "top_k", minimum=0, integer=True),
        "min_p": optional_number(body, "min_p", minimum=0, maximum=1),
        "seed": optional_number(body, "seed", integer=True),
        "presence_penalty": optional_number(body, "presence_penalty", minimum=-2, maximum=2),
        "frequency_penalty": optional_number(body, "frequency_penalty", minimum=-2, maximum=2),
        "repetition_penalty": optional_number(
            body, "repetition_penalty", minimum=0, exclusive_minimum=True, maximum=10
        ),
    }
    return {k: v for k, v in values.items() if v is not None}


def _max_tokens(body: dict[str, Any]) -> int | None:
    a = optional_number(body, "max_completion_tokens", minimum=1, integer=True)
    b = optional_number(body, "max_tokens", minimum=1, integer=True)
    return a if a is not None else b


def _thinking(body: dict[str, Any]) -> bool | None:
    kwargs = optional_object(body, "chat_template_kwargs")
    if "enable_thinking" in kwargs:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise wrong_type(
                "chat_template_kwargs.enable_thinking", "a boolean", kwargs["enable_thinking"]
            )
        return kwargs["enable_thinking"]
    effort = body.get("reasoning_effort")
    if effort is None:
        return None
    if effort not in ("none", "minimal", "low", "medium", "high"):
        raise InvalidRequest(
            "'reasoning_effort' must be none, minimal, low, medium or high",
            param="reasoning_effort",
        )
    return effort != "none"


def _check_unsupported(body: dict[str, Any]) -> None:
    n = optional_number(body, "n", minimum=1, integer=True)
    if n not in (None, 1):
        raise InvalidRequest("Only n=1 is supported", param="n", code="unsupported_value")
    if optional_bool(body, "logprobs"):
        raise InvalidRequest("logprobs are not supported yet", param="logprobs")
    fmt = optional_object(body, "response_format")
    if fmt and fmt.get("type") not in (None, "text"):
        raise InvalidRequest(
            f"response_format type {fmt.get('type')!r} is not supported yet",
            param="response_format",
        )


def _tools(body: dict[str, Any]) -> list[dict[str, Any]] | None:
    tools = body.get("tools")
    if tools is None:
        return None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise wrong_type("tools", "an array of objects", tools)
    return tools or None


async def parse_request(request: Request, body: dict[str, Any]) -> ChatRequest:
    messages, urls = parse_messages(required(body, "messages"))
    _check_unsupported(body)
    loop = asyncio.get_running_loop()
    images = [await loop.run_in_executor(None, decode_image, u, i) for i, u in enumerate(urls)]
    return ChatRequest(
        messages=messages,
        images=images,
        sampling=parse_sampling(body),
        max_tokens=_max_tokens(body),
        stop=parse_stop(body.get("stop")),
        enable_thinking=_thinking(body),
        tools=_tools(body),
    )


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
    await _first_event(job, events)  # errors found before generation are plain JSON
    if stream:
        await _stream(request, job, events, meta, include_usage)
        return None
    async for _ in events:
        pass
    return json_response(completion_body(await job.result(), meta))


async def _first_event(job: Job, events: Any) -> Any:
    try:
        return await anext(events)
    except StopAsyncIteration:
        await job.result()  # raises the job's error
        raise InvalidRequest("The request ended before generation started") from None


async def _stream(request: Request, job: Job, events: Any, meta: dict, include_usage: bool) -> None:
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
            step = pending.result()
            if step is None:
                break
            if step.text:
                await response.send(_sse(chunk(meta, {"content": step.text})))
        await _stream_end(response, job, meta, include_usage)
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
        if not job.future.done():
            job.cancel()


async def _stream_end(response: Any, job: Job, meta: dict, include_usage: bool) -> None:
    try:
        outcome: ChatOutcome = await job.result()
    except ApiError as exc:
        await response.send(_sse(exc.body()))
        await response.eof()
        return
    await response.send(_sse(chunk(meta, {}, outcome.finish_reason)))
    if include_usage:
        envelope = _envelope(meta, "chat.completion.chunk")
        await response.send(_sse({**envelope, "choices": [], "usage": usage(outcome)}))
    await response.send("data: [DONE]\n\n")
    await response.eof()


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _envelope(meta: dict, kind: str) -> dict[str, Any]:
    return {
        "id": meta["id"],
        "object": kind,
        "created": meta["created"],
        "model": meta["model"],
        "system_fingerprint": FINGERPRINT,
    }


def chunk(meta: dict, delta: dict, finish_reason: str | None = None) -> dict[str, Any]:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
    return {**_envelope(meta, "chat.completion.chunk"), "choices": [choice]}


def usage(outcome: ChatOutcome) -> dict[str, Any]:
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def completion_body(outcome: ChatOutcome, meta: dict) -> dict[str, Any]:
    message = {"role": "assistant", "content": outcome.text}
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": outcome.finish_reason,
    }
    return {
        **_envelope(meta, "chat.completion"),
        "choices": [choice],
        "usage": usage(outcome),
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


def chat_job(runner: Any, job: Job) -> ChatOutcome:
    from engine.runners.chat import ChatParams, PromptTooLongError

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
    room = context - prompt.n_tokens
    sampling = {**runner.generation_defaults(), **request.sampling}
    params = ChatParams(
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
    )
    job.emit(Started(prompt.n_tokens))
    return _decode(runner, job, prompt, params)


def _decode(runner: Any, job: Job, prompt: Any, params: Any) -> ChatOutcome:
    outcome = ChatOutcome(prompt_tokens=prompt.n_tokens)
    started = time.perf_counter()
    first_token_at = None
    parts: list[str] = []
    for step in runner.generate(prompt, params, lambda: job.cancelled):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        if step.token is not None:
            outcome.completion_tokens += 1
        if step.text:
            parts.append(step.text)
            job.emit(step)
        if step.finish_reason is not None:
            outcome.finish_reason = step.finish_reason
    if job.cancelled:
        log.info("chat: generation cancelled after %d tokens", outcome.completion_tokens)
        job.check()
    finished = time.perf_counter()
    first_token_at = first_token_at or finished
    outcome.text = "".join(parts)
    outcome.prompt_ms = (first_token_at - started) * 1000
    outcome.predicted_ms = (finished - first_token_at) * 1000
    return outcome


def load(model: ModelInfo, config: Config) -> Any:
    from engine.runners.chat import ChatRunner

    return ChatRunner.load(model.path, model.id)


SPEC = ServiceSpec(name="chat", blueprint=bp, load=load, handlers={"chat": chat_job})
