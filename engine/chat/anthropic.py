"""Anthropic's Messages API on the chat port: `POST /v1/messages` and
`POST /v1/messages/count_tokens`.

The body is translated into an OpenAI chat body (system, text, base64 images, tool_use and
tool_result blocks, tools, tool_choice, thinking) and runs through the same parser, queue and
output splitter as `/v1/chat/completions`; the reply is shaped as a Message, or streamed as
Anthropic's events. Errors on these routes are in Anthropic's shape (engine.errors).
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sanic import HTTPResponse, Request
from sanic.response import json as json_response

from engine.app import resolve_requested_model
from engine.chat import jobs
from engine.chat.output import Delta, ToolCall
from engine.chat.request import parse_request
from engine.chat.response import Reply
from engine.chat.types import ChatOutcome
from engine.errors import ApiError, InvalidRequest
from engine.validation import (
    optional_array,
    optional_bool,
    optional_number,
    optional_object,
    parse_json_body,
    wrong_type,
)

ROUTE_PREFIX = "/v1/messages"
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
SIGNATURE = "mlxd"  # thinking blocks carry a signature; nothing checks it here
IMAGE_MEDIA = ("image/jpeg", "image/png", "image/gif", "image/webp")


# ---- request -------------------------------------------------------------------------------


def chat_body(body: dict[str, Any], *, for_count: bool = False) -> dict[str, Any]:
    """An OpenAI chat completions body with the same meaning as this Messages body."""
    out: dict[str, Any] = {"messages": _system(body.get("system")) + _messages(body)}
    if not for_count:
        max_tokens = optional_number(body, "max_tokens", minimum=1, integer=True)
        if max_tokens is None:
            raise InvalidRequest("max_tokens: Field required", param="max_tokens")
        out["max_tokens"] = max_tokens
        for name in ("temperature", "top_p", "top_k"):
            if body.get(name) is not None:
                out[name] = body[name]
        optional_number(body, "temperature", minimum=0, maximum=1)
        out["stop"] = _stop_sequences(body)
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise wrong_type("metadata", "an object", body["metadata"])
    tools = _tools(body)
    if tools:
        out["tools"] = tools
    choice = _tool_choice(body.get("tool_choice"), tools)
    if choice is not None:
        out["tool_choice"] = choice
    thinking = _thinking(body.get("thinking"))
    if thinking is not None:
        out["chat_template_kwargs"] = {"enable_thinking": thinking}
    schema = _output_schema(body)
    if schema is not None:
        out["response_format"] = {"type": "json_schema", "json_schema": {"schema": schema}}
    return out


def _output_schema(body: dict[str, Any]) -> dict[str, Any] | None:
    """Structured outputs: `output_config.format` {"type": "json_schema", "schema": ...}."""
    fmt = optional_object(body, "output_config").get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or fmt.get("type") != "json_schema":
        raise InvalidRequest(
            "output_config.format must be {'type': 'json_schema', 'schema': {...}}",
            param="output_config.format",
        )
    schema = fmt.get("schema")
    if not isinstance(schema, dict):
        raise wrong_type("output_config.format.schema", "a JSON schema object", schema)
    return schema


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    if isinstance(value, str):
        return [{"role": "system", "content": value}] if value else []
    if not isinstance(value, list):
        raise wrong_type("system", "a string or an array of text blocks", value)
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"system[{i}] must be a text block", param=f"system[{i}]")
        texts.append(_text(block, f"system[{i}]"))
    return [{"role": "system", "content": "\n\n".join(texts)}] if texts else []


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise wrong_type("messages", "an array", messages)
    if not messages:
        raise InvalidRequest("messages: at least one message is required", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise wrong_type(where, "an object", message)
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise InvalidRequest(
                f"{where}.role must be 'user' or 'assistant'; got {role!r}", param=f"{where}.role"
            )
        out.extend(_message(role, message.get("content"), where))
    return out


def _message(role: str, content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"role": role, "content": content}]
    if not isinstance(content, list):
        raise wrong_type(f"{where}.content", "a string or an array of content blocks", content)
    parts: list[dict[str, Any]] = []
    tool_results: list[dict[str, Any]] = []
    calls: list[dict[str, Any]] = []
    reasoning: list[str] = []
    for j, block in enumerate(content):
        at = f"{where}.content[{j}]"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            parts.append({"type": "text", "text": _text(block, at)})
        elif kind == "image":
            parts.append(_image(block, at))
        elif kind == "tool_use" and role == "assistant":
            calls.append(_tool_use(block, at))
        elif kind == "tool_result" and role == "user":
            tool_results.append(_tool_result(block, at))
        elif kind == "thinking" and role == "assistant":
            reasoning.append(str(block.get("thinking") or ""))
        elif kind == "redacted_thinking" and role == "assistant":
            continue
        else:
            raise InvalidRequest(
                f"{at}.type {kind!r} is not supported in a {role} message here "
                "(text, image, tool_use, tool_result and thinking are)",
                param=f"{at}.type",
            )
    out = list(tool_results)  # a tool's results answer the previous assistant turn
    if role == "assistant":
        message: dict[str, Any] = {"role": role, "content": _joined(parts) if parts else None}
        if calls:
            message["tool_calls"] = calls
        if reasoning:
            message["reasoning_content"] = "".join(reasoning)
        if parts or calls:
            out.append(message)
    elif parts or not tool_results:
        out.append({"role": role, "content": parts})
    return out


def _joined(parts: list[dict[str, Any]]) -> Any:
    if all(p["type"] == "text" for p in parts):
        return "".join(p["text"] for p in parts)
    return parts


def _text(block: dict[str, Any], where: str) -> str:
    text = block.get("text")
    if not isinstance(text, str):
        raise wrong_type(f"{where}.text", "a string", text)
    return text


def _image(block: dict[str, Any], where: str) -> dict[str, Any]:
    source = block.get("source")
    if not isinstance(source, dict):
        raise wrong_type(f"{where}.source", "an object", source)
    kind = source.get("type")
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    if kind != "base64":
        raise InvalidRequest(
            f"{where}.source.type must be 'base64' or 'url'; got {kind!r}",
            param=f"{where}.source.type",
        )
    media, data = source.get("media_type"), source.get("data")
    if media not in IMAGE_MEDIA:
        raise InvalidRequest(
            f"{where}.source.media_type must be one of {', '.join(IMAGE_MEDIA)}; got {media!r}",
            param=f"{where}.source.media_type",
        )
    if not isinstance(data, str):
        raise wrong_type(f"{where}.source.data", "a base64 string", data)
    return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}


def _tool_use(block: dict[str, Any], where: str) -> dict[str, Any]:
    name, call_id, arguments = block.get("name"), block.get("id"), block.get("input", {})
    if not isinstance(name, str) or not isinstance(call_id, str):
        raise InvalidRequest(f"{where} needs a string 'id' and 'name'", param=where)
    if not isinstance(arguments, dict):
        raise wrong_type(f"{where}.input", "an object", arguments)
    function = {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}
    return {"id": call_id, "type": "function", "function": function}


def _tool_result(block: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, content = block.get("tool_use_id"), block.get("content", "")
    if not isinstance(call_id, str):
        raise wrong_type(f"{where}.tool_use_id", "a string", call_id)
    if isinstance(content, list):
        texts = []
        for k, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                raise InvalidRequest(
                    f"{where}.content[{k}]: only text blocks are supported in a tool_result",
                    param=f"{where}.content[{k}]",
                )
            texts.append(_text(part, f"{where}.content[{k}]"))
        content = "\n".join(texts)
    elif not isinstance(content, str):
        raise wrong_type(f"{where}.content", "a string or an array of text blocks", content)
    if block.get("is_error") is True:
        content = f"Error: {content}"
    return {"role": "tool", "tool_call_id": call_id, "content": content}


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(optional_array(body, "tools")):
        if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools[{i}] needs a string 'name'", param=f"tools[{i}]")
        if tool.get("type") not in (None, "custom"):
            raise InvalidRequest(
                f"tools[{i}]: server tools ({tool['type']!r}) are not available here; "
                "declare custom tools with name, description and input_schema",
                param=f"tools[{i}].type",
            )
        schema = tool.get("input_schema", {"type": "object"})
        if not isinstance(schema, dict):
            raise wrong_type(f"tools[{i}].input_schema", "a JSON schema object", schema)
        function = {"name": tool["name"], "parameters": schema}
        if isinstance(tool.get("description"), str):
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any, tools: list[dict[str, Any]]) -> Any:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in TOOL_CHOICES:
        return TOOL_CHOICES[kind] if tools or kind == "none" else "none"
    if kind == "tool" and isinstance(value.get("name"), str):
        return {"type": "function", "function": {"name": value["name"]}}
    raise InvalidRequest(
        "tool_choice must be {'type': 'auto' | 'any' | 'none'} or {'type': 'tool', 'name': ...}",
        param="tool_choice",
    )


def _thinking(value: Any) -> bool | None:
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind in ("enabled", "adaptive"):
        budget = value.get("budget_tokens")
        if budget is not None and (not isinstance(budget, int) or budget < 1):
            raise wrong_type("thinking.budget_tokens", "a positive integer", budget)
        return True
    if kind == "disabled":
        return False
    raise InvalidRequest(
        "thinking must be {'type': 'enabled', 'budget_tokens': N} or {'type': 'disabled'}",
        param="thinking",
    )


def _stop_sequences(body: dict[str, Any]) -> list[str]:
    value = optional_array(body, "stop_sequences")
    if not all(isinstance(s, str) for s in value):
        raise wrong_type("stop_sequences", "an array of strings", value)
    return value


# ---- reply ----------------------------------------------------------------------------------


def stop_reason(reply: Reply, outcome: ChatOutcome) -> tuple[str, str | None]:
    reason = outcome.finish_reasons[reply.index]
    if reason == "length":
        return "max_tokens", None
    if reply.message.tool_calls:
        return "tool_use", None
    hit = outcome.stop_sequences.get(reply.index)
    return ("stop_sequence", hit) if hit is not None else ("end_turn", None)


def usage(outcome: ChatOutcome) -> dict[str, int]:
    """Anthropic counts cache reads apart: input_tokens are the prompt tokens read anew."""
    return {
        "input_tokens": outcome.prompt_tokens - outcome.cached_tokens,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": outcome.cached_tokens,
        "output_tokens": outcome.completion_tokens,
    }


def tool_input(call: ToolCall) -> dict[str, Any]:
    try:
        value = json.loads(call.arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def content_blocks(message: Delta) -> list[dict[str, Any]]:
    blocks: list[dict[str, Any]] = []
    if message.reasoning:
        blocks.append({"type": "thinking", "thinking": message.reasoning, "signature": SIGNATURE})
    if message.content:
        blocks.append({"type": "text", "text": message.content})
    for call in message.tool_calls:
        blocks.append({"type": "tool_use", "id": tool_id(call), "name": call.name})
        blocks[-1]["input"] = tool_input(call)
    return blocks


def tool_id(call: ToolCall) -> str:
    return "toolu_" + call.id.removeprefix("call_")


def message_body(meta: dict[str, Any], reply: Reply, outcome: ChatOutcome) -> dict[str, Any]:
    reason, sequence = stop_reason(reply, outcome)
    return {
        **_envelope(meta),
        "content": content_blocks(reply.message),
        "stop_reason": reason,
        "stop_sequence": sequence,
        "usage": usage(outcome),
    }


def _envelope(meta: dict[str, Any]) -> dict[str, Any]:
    return {"id": meta["id"], "type": "message", "role": "assistant", "model": meta["model"]}


# ---- streaming ------------------------------------------------------------------------------


def event(kind: str, payload: dict[str, Any]) -> str:
    return f"event: {kind}\ndata: {json.dumps({'type': kind, **payload}, ensure_ascii=False)}\n\n"


PING = event("ping", {})


class BlockWriter:
    """Content blocks as Anthropic streams them: one block open at a time, in the order the
    reply produced thinking, text and tool calls."""

    def __init__(self) -> None:
        self.index = -1
        self.open: str | None = None

    def frames(self, delta: Delta) -> str:
        out = []
        if delta.reasoning:
            out.append(self._switch("thinking", {"thinking": ""}))
            out.append(self._delta({"type": "thinking_delta", "thinking": delta.reasoning}))
        if delta.content:
            out.append(self._switch("text", {"text": ""}))
            out.append(self._delta({"type": "text_delta", "text": delta.content}))
        for call in delta.tool_calls:
            start = {"id": tool_id(call), "name": call.name, "input": {}}
            out.append(self._switch("tool_use", start, force=True))
            partial = json.dumps(tool_input(call), ensure_ascii=False)
            out.append(self._delta({"type": "input_json_delta", "partial_json": partial}))
        return "".join(out)

    def close(self) -> str:
        if self.open is None:
            return ""
        out = ""
        if self.open == "thinking":
            out = self._delta({"type": "signature_delta", "signature": SIGNATURE})
        self.open = None
        return out + event("content_block_stop", {"index": self.index})

    def _switch(self, kind: str, block: dict[str, Any], force: bool = False) -> str:
        if self.open == kind and not force:
            return ""
        out = self.close()
        self.index += 1
        self.open = kind
        start = {"index": self.index, "content_block": {"type": kind, **block}}
        return out + event("content_block_start", start)

    def _delta(self, delta: dict[str, Any]) -> str:
        return event("content_block_delta", {"index": self.index, "delta": delta})


async def stream_message(request: Request, running: jobs.Running, meta: dict[str, Any]) -> None:
    reply = running.replies[0]
    start_usage = {"input_tokens": running.started.prompt_tokens, "output_tokens": 0}
    message = {**_envelope(meta), "content": [], "stop_reason": None, "stop_sequence": None}
    async with jobs.EventStream(request, PING) as stream:
        await stream.send(event("message_start", {"message": {**message, "usage": start_usage}}))
        await stream.send(PING)
        blocks = BlockWriter()
        async for pieces in stream.batches(running):
            await stream.send("".join(blocks.frames(reply.add(piece)) for piece in pieces))
        if stream.gone:
            return
        await stream.send(blocks.frames(reply.finish()))
        try:
            outcome: ChatOutcome = await running.job.result()
        except ApiError as exc:
            await stream.send(event("error", {"error": exc.anthropic_body()["error"]}))
            await stream.end()
            return
        reason, sequence = stop_reason(reply, outcome)
        delta = {"stop_reason": reason, "stop_sequence": sequence}
        await stream.send(blocks.close())
        await stream.send(event("message_delta", {"delta": delta, "usage": usage(outcome)}))
        await stream.send(event("message_stop", {}))
        await stream.end()


# ---- routes ---------------------------------------------------------------------------------


async def messages(request: Request) -> HTTPResponse | None:
    body = parse_json_body(request)
    model = _model(request, body)
    stream = optional_bool(body, "stream")
    chat = await parse_request(request, chat_body(body))
    running = await jobs.start(request, chat)
    meta = {"id": f"msg_{uuid.uuid4().hex[:24]}", "model": model, "created": int(time.time())}
    if stream:
        await stream_message(request, running, meta)
        return None
    outcome = await jobs.gather(running)
    return json_response(message_body(meta, running.replies[0], outcome))


async def count_tokens(request: Request) -> HTTPResponse:
    body = parse_json_body(request)
    _model(request, body)
    chat = await parse_request(request, chat_body(body, for_count=True))
    return json_response({"input_tokens": await jobs.count_tokens(request, chat)})


def _model(request: Request, body: dict[str, Any]) -> str:
    if body.get("model") is None:
        raise InvalidRequest("model: Field required", param="model")
    return resolve_requested_model(request, body["model"])


def error_response(error: ApiError) -> HTTPResponse:
    return error.anthropic_response()
