"""OpenAI's Responses API on the chat port: `POST /v1/responses`, `GET` and `DELETE
/v1/responses/{id}`, `GET /v1/responses/{id}/input_items`.

`input` (a string or items: messages with input_text / input_image parts, function_call and
function_call_output items) and `instructions` become an OpenAI chat body and run through the
same parser, queue and output splitter as `/v1/chat/completions`. The reply becomes output
items (reasoning, message, function_call), streamed as the Responses events.

Stored responses (`store`, default true) live in this process's memory only, bounded in count
and bytes (oldest dropped first), and are lost on restart; `previous_response_id` continues a
stored one.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from sanic import HTTPResponse, Request, Sanic
from sanic.response import json as json_response

from engine.app import resolve_requested_model
from engine.chat import jobs
from engine.chat.output import Delta
from engine.chat.request import EFFORTS, parse_request
from engine.chat.response import Reply
from engine.chat.types import ChatOutcome
from engine.errors import ApiError, InvalidRequest, NotFound
from engine.validation import (
    optional_array,
    optional_bool,
    optional_number,
    optional_object,
    parse_json_body,
    wrong_type,
)

STORE_MAX_ITEMS = 1000
STORE_MAX_BYTES = 256 * 1024 * 1024
INPUT_ROLES = ("user", "assistant", "system", "developer")
TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


def new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


# ---- store ----------------------------------------------------------------------------------


@dataclass
class Stored:
    response: dict[str, Any]
    conversation: list[dict[str, Any]]  # chat messages: every input so far and this output
    input_items: list[dict[str, Any]]
    size: int = 0


@dataclass
class ResponseStore:
    """Stored responses of this process, least recently stored or used dropped first."""

    max_items: int = STORE_MAX_ITEMS
    max_bytes: int = STORE_MAX_BYTES
    items: OrderedDict[str, Stored] = field(default_factory=OrderedDict)
    size: int = 0

    def put(self, stored: Stored) -> None:
        stored.size = len(json.dumps(stored.conversation)) + len(json.dumps(stored.response))
        self.items[stored.response["id"]] = stored
        self.size += stored.size
        while self.items and (len(self.items) > self.max_items or self.size > self.max_bytes):
            _, dropped = self.items.popitem(last=False)
            self.size -= dropped.size

    def get(self, response_id: str) -> Stored | None:
        stored = self.items.get(response_id)
        if stored is not None:
            self.items.move_to_end(response_id)
        return stored

    def delete(self, response_id: str) -> bool:
        stored = self.items.pop(response_id, None)
        if stored is not None:
            self.size -= stored.size
        return stored is not None


async def attach_store(app: Sanic) -> None:
    """Listener (before the server starts): the app's response store."""
    app.ctx.response_store = ResponseStore()


def _store(request: Request) -> ResponseStore:
    return request.app.ctx.response_store


def _stored(request: Request, response_id: str, param: str | None = None) -> Stored:
    stored = _store(request).get(response_id)
    if stored is None:
        raise NotFound(
            f"Response with id {response_id!r} not found (responses are kept in this "
            "process's memory only)",
            param=param,
            code="response_not_found",
        )
    return stored


# ---- request ------------------------------------------------------------------------------


def input_messages(value: Any) -> list[dict[str, Any]]:
    """`input` as chat messages."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list):
        raise wrong_type("input", "a string or an array of input items", value)
    out: list[dict[str, Any]] = []
    for i, item in enumerate(value):
        where = f"input[{i}]"
        if not isinstance(item, dict):
            raise wrong_type(where, "an object", item)
        kind = item.get("type", "message")
        if kind == "message":
            out.append(_message(item, where))
        elif kind == "function_call":
            _function_call(item, where, out)
        elif kind == "function_call_output":
            out.append(_function_output(item, where))
        elif kind == "reasoning":
            continue  # earlier thinking: the chat template drops it from past turns anyway
        else:
            raise InvalidRequest(
                f"{where}.type {kind!r} is not supported here (message, function_call, "
                "function_call_output and reasoning are)",
                param=f"{where}.type",
            )
    return out


def _message(item: dict[str, Any], where: str) -> dict[str, Any]:
    role = item.get("role")
    if role not in INPUT_ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(INPUT_ROLES)}; got {role!r}",
            param=f"{where}.role",
        )
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise wrong_type(f"{where}.content", "a string or an array of content parts", content)
    parts = [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]
    if role != "user" and all(p["type"] == "text" for p in parts):
        return {"role": role, "content": "".join(p["text"] for p in parts)}
    return {"role": role, "content": parts}


def _part(part: Any, where: str) -> dict[str, Any]:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in TEXT_PARTS:
        text = part.get("text", part.get("refusal"))
        if not isinstance(text, str):
            raise wrong_type(f"{where}.text", "a string", text)
        return {"type": "text", "text": text}
    if kind == "input_image":
        url = part.get("image_url")
        if not isinstance(url, str):
            raise InvalidRequest(
                f"{where}: send the image as image_url (a base64 data: URL); file_id is not "
                "supported here",
                param=f"{where}.image_url",
            )
        return {"type": "image_url", "image_url": {"url": url}}
    if kind == "input_audio":
        return {"type": "input_audio", "input_audio": part.get("input_audio")}
    raise InvalidRequest(
        f"{where}.type must be input_text, output_text, input_image or input_audio; got {kind!r}",
        param=f"{where}.type",
    )


def _function_call(item: dict[str, Any], where: str, out: list[dict[str, Any]]) -> None:
    name, call_id, arguments = item.get("name"), item.get("call_id"), item.get("arguments", "")
    if not isinstance(name, str) or not isinstance(call_id, str):
        raise InvalidRequest(f"{where} needs string 'name' and 'call_id'", param=where)
    if not isinstance(arguments, str):
        raise wrong_type(f"{where}.arguments", "a JSON string", arguments)
    call = {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
    last = out[-1] if out else None
    if last is not None and last["role"] == "assistant" and not isinstance(last["content"], list):
        last.setdefault("tool_calls", []).append(call)
    else:
        out.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _function_output(item: dict[str, Any], where: str) -> dict[str, Any]:
    call_id, output = item.get("call_id"), item.get("output")
    if not isinstance(call_id, str):
        raise wrong_type(f"{where}.call_id", "a string", call_id)
    if isinstance(output, list):
        output = "".join(
            _part(p, f"{where}.output[{k}]").get("text", "") for k, p in enumerate(output)
        )
    if not isinstance(output, str):
        raise wrong_type(f"{where}.output", "a string", output)
    return {"role": "tool", "tool_call_id": call_id, "content": output}


def _tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for i, tool in enumerate(optional_array(body, "tools")):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            kind = tool.get("type") if isinstance(tool, dict) else None
            raise InvalidRequest(
                f"tools[{i}]: only function tools are available here; got {kind!r}",
                param=f"tools[{i}].type",
            )
        if not isinstance(tool.get("name"), str):
            raise InvalidRequest(f"tools[{i}].name is required", param=f"tools[{i}].name")
        function = {k: tool[k] for k in ("name", "description", "parameters") if k in tool}
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any) -> Any:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and value.get("type") == "function":
        return {"type": "function", "function": {"name": value.get("name")}}
    raise InvalidRequest(
        "tool_choice must be none, auto, required or {'type': 'function', 'name': ...}",
        param="tool_choice",
    )


def _text_format(body: dict[str, Any]) -> dict[str, Any] | None:
    fmt = optional_object(body, "text").get("format")
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        schema = fmt.get("schema")
        if not isinstance(schema, dict):
            raise wrong_type("text.format.schema", "a JSON schema object", schema)
        return {"type": "json_schema", "json_schema": {"name": fmt.get("name"), "schema": schema}}
    raise InvalidRequest(
        f"text.format.type must be text, json_object or json_schema; got {kind!r}",
        param="text.format.type",
    )


def _effort(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise wrong_type("reasoning", "an object", value)
    effort = value.get("effort")
    if effort == "xhigh":
        return "high"
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(
            f"reasoning.effort must be one of {', '.join(EFFORTS)}; got {effort!r}",
            param="reasoning.effort",
        )
    return effort


def chat_body(body: dict[str, Any], history: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat completions body with the same meaning; `history` continues a stored
    conversation (instructions are not carried over, as OpenAI does)."""
    if body.get("input") is None:
        raise InvalidRequest("'input' is required", param="input")
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise wrong_type("instructions", "a string", instructions)
    system = [{"role": "system", "content": instructions}] if instructions else []
    given = input_messages(body["input"])
    if not given:
        raise InvalidRequest("'input' has no message or function call output", param="input")
    out: dict[str, Any] = {"messages": system + history + given}
    max_tokens = optional_number(body, "max_output_tokens", minimum=1, integer=True)
    if max_tokens is not None:
        out["max_tokens"] = max_tokens
    for name in ("temperature", "top_p", "seed"):
        if body.get(name) is not None:
            out[name] = body[name]
    if tools := _tools(body):
        out["tools"] = tools
    if (choice := _tool_choice(body.get("tool_choice"))) is not None:
        out["tool_choice"] = choice
    if (fmt := _text_format(body)) is not None:
        out["response_format"] = fmt
    if (effort := _effort(body.get("reasoning"))) is not None:
        out["reasoning_effort"] = effort
    return out


# ---- output items ---------------------------------------------------------------------------


def _event(kind: str, payload: dict[str, Any]) -> dict[str, Any]:
    return {"type": kind, **payload}


class ItemWriter:
    """Output items as the reply builds up: the Responses events for each change, and the
    finished items. One item is open at a time (reasoning, message or function_call)."""

    def __init__(self) -> None:
        self.items: list[dict[str, Any]] = []
        self.open: dict[str, Any] | None = None

    def feed(self, delta: Delta) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if delta.reasoning:
            out += self._open("reasoning")
            out.append(self._text_delta("response.reasoning_text.delta", delta.reasoning))
        if delta.content:
            out += self._open("message")
            out.append(self._text_delta("response.output_text.delta", delta.content))
        for call in delta.tool_calls:
            out += self.close()
            item = {
                "type": "function_call",
                "id": new_id("fc"),
                "call_id": call.id,
                "name": call.name,
                "arguments": "",
                "status": "in_progress",
            }
            out += self._added(item)
            where = {"item_id": item["id"], "output_index": len(self.items) - 1}
            out.append(
                _event("response.function_call_arguments.delta", {**where, "delta": call.arguments})
            )
            item["arguments"] = call.arguments
            out.append(
                _event(
                    "response.function_call_arguments.done",
                    {**where, "name": call.name, "arguments": call.arguments},
                )
            )
            out += self.close()
        return out

    def close(self) -> list[dict[str, Any]]:
        item, self.open = self.open, None
        if item is None:
            return []
        where = {"item_id": item["id"], "output_index": self.items.index(item)}
        out = []
        if item["type"] in ("reasoning", "message"):
            part = item["content"][0]
            done, key = (
                ("response.reasoning_text.done", "reasoning_text")
                if item["type"] == "reasoning"
                else ("response.output_text.done", "output_text")
            )
            text_done = {**where, "content_index": 0, "text": part["text"]}
            if key == "output_text":
                text_done["logprobs"] = []
            out.append(_event(done, text_done))
            out.append(
                _event(
                    "response.content_part.done", {**where, "content_index": 0, "part": dict(part)}
                )
            )
        item["status"] = "completed"
        out.append(
            _event(
                "response.output_item.done",
                {"output_index": where["output_index"], "item": _copy(item)},
            )
        )
        return out

    def _open(self, kind: str) -> list[dict[str, Any]]:
        if self.open is not None and self.open["type"] == kind:
            return []
        out = self.close()
        if kind == "reasoning":
            item = {"type": "reasoning", "id": new_id("rs"), "summary": [], "content": []}
            part = {"type": "reasoning_text", "text": ""}
        else:
            item = {"type": "message", "id": new_id("msg"), "role": "assistant", "content": []}
            part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        item["status"] = "in_progress"
        out += self._added(item)
        item["content"].append(part)
        where = {"item_id": item["id"], "output_index": len(self.items) - 1, "content_index": 0}
        out.append(_event("response.content_part.added", {**where, "part": dict(part)}))
        self.open = item
        return out

    def _added(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        self.items.append(item)
        self.open = item
        return [
            _event(
                "response.output_item.added",
                {"output_index": len(self.items) - 1, "item": _copy(item)},
            )
        ]

    def _text_delta(self, kind: str, text: str) -> dict[str, Any]:
        item = self.open
        assert item is not None
        item["content"][0]["text"] += text
        where = {"item_id": item["id"], "output_index": self.items.index(item), "content_index": 0}
        payload = {**where, "delta": text}
        if kind == "response.output_text.delta":
            payload["logprobs"] = []
        return _event(kind, payload)


def _copy(item: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(item))


def output_message(message: Delta) -> dict[str, Any]:
    """This reply as a chat message, to continue the conversation from."""
    out: dict[str, Any] = {"role": "assistant", "content": message.content or None}
    if message.tool_calls:
        out["tool_calls"] = [call.as_dict() for call in message.tool_calls]
    return out


# ---- the response object ------------------------------------------------------------------


def response_object(
    meta: dict[str, Any],
    body: dict[str, Any],
    status: str,
    items: list[dict[str, Any]],
    usage: dict[str, Any] | None = None,
) -> dict[str, Any]:
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": meta["id"],
        "object": "response",
        "created_at": meta["created"],
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": body.get("instructions"),
        "max_output_tokens": body.get("max_output_tokens"),
        "model": meta["model"],
        "output": items,
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "previous_response_id": body.get("previous_response_id"),
        "reasoning": {"effort": (body.get("reasoning") or {}).get("effort"), "summary": None},
        "store": body.get("store", True),
        "temperature": body.get("temperature"),
        "text": body.get("text") or {"format": {"type": "text"}},
        "tool_choice": body.get("tool_choice", "auto"),
        "tools": body.get("tools") or [],
        "top_p": body.get("top_p"),
        "truncation": "disabled",
        "usage": usage,
        "user": body.get("user"),
        "metadata": body.get("metadata") or {},
    }


def usage(outcome: ChatOutcome, reply: Reply) -> dict[str, Any]:
    return {
        "input_tokens": outcome.prompt_tokens,
        "input_tokens_details": {"cached_tokens": outcome.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": outcome.completion_tokens,
        "output_tokens_details": {
            "reasoning_tokens": min(reply.reasoning_tokens, outcome.completion_tokens)
        },
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
    }


def _status(outcome: ChatOutcome) -> str:
    return "incomplete" if outcome.finish_reasons[0] == "length" else "completed"


# ---- routes -----------------------------------------------------------------------------------


async def create(request: Request) -> HTTPResponse | None:
    body = parse_json_body(request)
    model = resolve_requested_model(request, body.get("model"))
    stream, store = optional_bool(body, "stream"), optional_bool(body, "store", default=True)
    history: list[dict[str, Any]] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        if not isinstance(previous, str):
            raise wrong_type("previous_response_id", "a string", previous)
        history = _stored(request, previous, "previous_response_id").conversation
    if body.get("metadata") is not None and not isinstance(body["metadata"], dict):
        raise wrong_type("metadata", "an object", body["metadata"])
    translated = chat_body(body, history)
    chat = await parse_request(request, translated)
    running = await jobs.start(request, chat)
    meta = {"id": new_id("resp"), "created": int(time.time()), "model": model}
    finish = _Finish(request, body, meta, translated["messages"], store)
    if stream:
        await _stream(request, running, finish)
        return None
    outcome = await jobs.gather(running)
    reply = running.replies[0]
    writer = ItemWriter()
    writer.feed(reply.message)
    writer.close()
    return json_response(finish(outcome, reply, writer.items))


@dataclass
class _Finish:
    """The finished response object (stored when asked to)."""

    request: Request
    body: dict[str, Any]
    meta: dict[str, Any]
    messages: list[dict[str, Any]]
    store: bool

    def __call__(
        self, outcome: ChatOutcome, reply: Reply, items: list[dict[str, Any]]
    ) -> dict[str, Any]:
        response = response_object(
            self.meta, self.body, _status(outcome), items, usage(outcome, reply)
        )
        if self.store:
            skip = 1 if self.body.get("instructions") else 0  # not carried over
            conversation = [*self.messages[skip:], output_message(reply.message)]
            raw = self.body["input"]
            inputs = raw if isinstance(raw, list) else [{"role": "user", "content": raw}]
            _store(self.request).put(Stored(response, conversation, inputs))
        return response


async def _stream(request: Request, running: jobs.Running, finish: _Finish) -> None:
    reply = running.replies[0]
    writer = ItemWriter()
    sequence = iter(range(1 << 62))

    def frames(events: list[dict[str, Any]]) -> str:
        return "".join(
            f"event: {e['type']}\ndata: "
            f"{json.dumps({**e, 'sequence_number': next(sequence)}, ensure_ascii=False)}\n\n"
            for e in events
        )

    start = response_object(finish.meta, finish.body, "in_progress", [])
    async with jobs.EventStream(request, ": keepalive\n\n") as stream:
        await stream.send(
            frames(
                [
                    _event("response.created", {"response": start}),
                    _event("response.in_progress", {"response": start}),
                ]
            )
        )
        async for pieces in stream.batches(running):
            await stream.send(frames([e for p in pieces for e in writer.feed(reply.add(p))]))
        if stream.gone:
            return
        await stream.send(frames(writer.feed(reply.finish()) + writer.close()))
        try:
            outcome: ChatOutcome = await running.job.result()
        except ApiError as exc:
            failed = response_object(finish.meta, finish.body, "failed", writer.items)
            failed["error"] = {"code": exc.code or exc.type, "message": exc.message}
            await stream.send(frames([_event("response.failed", {"response": failed})]))
            await stream.end()
            return
        response = finish(outcome, reply, writer.items)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        await stream.send(frames([_event(kind, {"response": response})]))
        await stream.end()


async def retrieve(request: Request, response_id: str) -> HTTPResponse:
    return json_response(_stored(request, response_id).response)


async def delete(request: Request, response_id: str) -> HTTPResponse:
    if not _store(request).delete(response_id):
        _stored(request, response_id)  # the 404
    return json_response({"id": response_id, "object": "response", "deleted": True})


async def input_items(request: Request, response_id: str) -> HTTPResponse:
    items = [
        {"type": "message", **item, "id": item.get("id") or f"{response_id}_in_{i}"}
        for i, item in enumerate(_stored(request, response_id).input_items)
    ]
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise InvalidRequest("order must be asc or desc", param="order")
    if order == "desc":
        items.reverse()
    return json_response(
        {
            "object": "list",
            "data": items,
            "first_id": items[0]["id"] if items else None,
            "last_id": items[-1]["id"] if items else None,
            "has_more": False,
        }
    )
