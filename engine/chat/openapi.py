"""The chat port's routes in its OpenAPI document (`GET /openapi.json`): what `request`,
`anthropic`, `responses` and `completions` read, and the shapes they answer."""

from __future__ import annotations

from engine.chat.completions import MAX_LOGPROBS, MAX_PROMPTS
from engine.chat.request import EFFORTS, MAX_STOP, MAX_TOP_LOGPROBS, ROLES
from engine.openapi import (
    EVENT_STREAM,
    JSON,
    Operation,
    Paths,
    Schema,
    json_body,
    operation,
    path_parameter,
    work,
)

INT64 = {"type": "integer", "minimum": -(2**63), "maximum": 2**63 - 1}
POSITIVE = {"type": "integer", "minimum": 1, "maximum": 2**63 - 1}
STRING_OR_NULL = {"type": ["string", "null"]}


def _number(low: float, high: float | None = None, *, exclusive_low: bool = False) -> Schema:
    out: Schema = {"type": "number", "exclusiveMinimum" if exclusive_low else "minimum": low}
    if high is not None:
        out["maximum"] = high
    return out


SAMPLING: dict[str, Schema] = {
    "temperature": _number(0, 2),
    "top_p": _number(0, 1, exclusive_low=True),
    "top_k": {**INT64, "minimum": 0},
    "min_p": _number(0, 1),
    "seed": INT64,
    "presence_penalty": _number(-2, 2),
    "frequency_penalty": _number(-2, 2),
    "repetition_penalty": _number(0, 10, exclusive_low=True),
    "max_tokens": POSITIVE,
    "max_completion_tokens": POSITIVE,
    "n": {**POSITIVE, "description": "Choices; at most --chat-batch"},
    "stop": {
        "oneOf": [
            {"type": "string"},
            {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        ]
    },
    "stream": {"type": "boolean"},
    "keep_alive": {
        "description": "How long the model stays loaded after this request (Ollama's)",
        "type": ["string", "number", "null"],
    },
    "model": {"type": "string"},
}
TEXT_PART: Schema = {
    "type": "object",
    "required": ["type", "text"],
    "properties": {"type": {"const": "text"}, "text": {"type": "string"}},
}
IMAGE_PART: Schema = {
    "type": "object",
    "required": ["type", "image_url"],
    "properties": {
        "type": {"enum": ["image_url", "input_image"]},
        "image_url": {
            "description": "A base64 data: URL (http(s) with --allow-image-urls)",
            "oneOf": [
                {"type": "string"},
                {"type": "object", "required": ["url"], "properties": {"url": {"type": "string"}}},
            ],
        },
    },
}
AUDIO_PART: Schema = {
    "type": "object",
    "required": ["type", "input_audio"],
    "properties": {
        "type": {"const": "input_audio"},
        "input_audio": {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"type": "string"}, "format": {"type": "string"}},
        },
    },
}
MESSAGE: Schema = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {"enum": list(ROLES)},
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "null"},
                {"type": "array", "items": {"oneOf": [TEXT_PART, IMAGE_PART, AUDIO_PART]}},
            ]
        },
        "tool_calls": {"type": "array", "items": {"type": "object"}},
        "tool_call_id": {"type": "string"},
        "reasoning_content": {"type": "string"},
    },
}
TOOL: Schema = {
    "type": "object",
    "required": ["function"],
    "properties": {
        "type": {"const": "function"},
        "function": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string"},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
            },
        },
    },
}
CHAT_REQUEST: Schema = {
    "type": "object",
    "required": ["messages"],
    "properties": {
        **SAMPLING,
        "messages": {"type": "array", "minItems": 1, "items": MESSAGE},
        "stream_options": {
            "type": "object",
            "properties": {"include_usage": {"type": "boolean"}},
        },
        "logprobs": {"type": "boolean"},
        "top_logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_TOP_LOGPROBS},
        "tools": {"type": "array", "items": TOOL},
        "tool_choice": {
            "oneOf": [
                {"enum": ["none", "auto", "required"]},
                {
                    "type": "object",
                    "required": ["function"],
                    "properties": {"function": {"type": "object", "required": ["name"]}},
                },
            ]
        },
        "response_format": {
            "type": "object",
            "properties": {
                "type": {"enum": ["text", "json_object", "json_schema"]},
                "schema": {"type": "object"},
                "json_schema": {"type": "object"},
            },
        },
        "reasoning_effort": {"enum": list(EFFORTS)},
        "chat_template_kwargs": {
            "type": "object",
            "properties": {"enable_thinking": {"type": "boolean"}},
        },
    },
}
CHAT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "object": {"const": "chat.completion"},
        "choices": {
            "type": "array",
            "items": {"type": "object", "required": ["index", "message", "finish_reason"]},
        },
        "usage": {"type": "object"},
    },
}
COMPLETIONS_REQUEST: Schema = {
    "type": "object",
    "required": ["prompt"],
    "properties": {
        **SAMPLING,
        "prompt": {
            "oneOf": [
                {"type": "string"},
                {
                    "type": "array",
                    "items": {"type": "string"},
                    "minItems": 1,
                    "maxItems": MAX_PROMPTS,
                },
            ]
        },
        "echo": {"type": "boolean"},
        "logprobs": {"type": "integer", "minimum": 0, "maximum": MAX_LOGPROBS},
        "best_of": {**POSITIVE, "description": "Only equal to n"},
        "suffix": {"const": ""},
    },
}
TEXT_COMPLETION: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {"object": {"const": "text_completion"}, "choices": {"type": "array"}},
}
BLOCK: Schema = {
    "type": "object",
    "required": ["type"],
    "properties": {"type": {"enum": ["text", "image", "tool_use", "tool_result", "thinking"]}},
}
ANTHROPIC_MESSAGE: Schema = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"enum": ["user", "assistant"]},
        "content": {"oneOf": [{"type": "string"}, {"type": "array", "items": BLOCK}]},
    },
}
ANTHROPIC_TOOL: Schema = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string"},
        "description": {"type": "string"},
        "input_schema": {"type": "object"},
    },
}
MESSAGES_FIELDS: dict[str, Schema] = {
    "model": {"type": "string"},
    "messages": {"type": "array", "minItems": 1, "items": ANTHROPIC_MESSAGE},
    "system": {"oneOf": [{"type": "string"}, {"type": "array", "items": TEXT_PART}]},
    "tools": {"type": "array", "items": ANTHROPIC_TOOL},
    "tool_choice": {"type": "object"},
    "thinking": {"type": "object"},
    "metadata": {"type": "object"},
    "output_config": {"type": "object"},
}
MESSAGES_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "messages", "max_tokens"],
    "properties": {
        **MESSAGES_FIELDS,
        "max_tokens": POSITIVE,
        "temperature": _number(0, 1),
        "top_p": _number(0, 1, exclusive_low=True),
        "top_k": {**INT64, "minimum": 0},
        "stop_sequences": {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP},
        "stream": {"type": "boolean"},
    },
}
COUNT_REQUEST: Schema = {
    "type": "object",
    "required": ["model", "messages"],
    "properties": MESSAGES_FIELDS,
}
ANTHROPIC_REPLY: Schema = {
    "type": "object",
    "required": ["id", "type", "role", "content", "stop_reason", "usage"],
    "properties": {"type": {"const": "message"}, "role": {"const": "assistant"}},
}
RESPONSES_REQUEST: Schema = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "model": {"type": "string"},
        "input": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": {"type": "object"}},
            ]
        },
        "instructions": {"type": "string"},
        "previous_response_id": {"type": "string"},
        "max_output_tokens": POSITIVE,
        "temperature": _number(0, 2),
        "top_p": _number(0, 1, exclusive_low=True),
        "seed": INT64,
        "tools": {"type": "array", "items": {"type": "object"}},
        "tool_choice": {"oneOf": [{"type": "string"}, {"type": "object"}]},
        "text": {"type": "object"},
        "reasoning": {"type": "object"},
        "metadata": {"type": "object"},
        "store": {"type": "boolean"},
        "stream": {"type": "boolean"},
    },
}
RESPONSE_OBJECT: Schema = {
    "type": "object",
    "required": ["id", "object", "status", "output"],
    "properties": {"object": {"const": "response"}, "output": {"type": "array"}},
}
DELETED: Schema = {
    "type": "object",
    "required": ["id", "object", "deleted"],
    "properties": {"deleted": {"const": True}},
}
ITEM_LIST: Schema = {
    "type": "object",
    "required": ["object", "data", "has_more"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
}
# One server-sent event (`stream: true`), as its fields.
SSE: Schema = {
    "type": "object",
    "required": ["data"],
    "properties": {"event": {"type": "string"}, "data": {"type": "string"}},
}


def _anthropic(summary: str, ok: dict[str, Schema], request: Schema) -> Operation:
    return work(summary, ok, json_body(request), error_schema="AnthropicError")


def _stored(summary: str, ok: Schema, query: tuple[dict, ...] = ()) -> Operation:
    parameter = path_parameter("response_id", "A stored response's id (resp_...)")
    return operation(
        summary,
        {JSON: ok},
        errors={"404": "No stored response with that id"},
        parameters=[parameter, *query],
    )


def paths() -> Paths:
    chat = work(
        "OpenAI chat completions",
        {JSON: CHAT_COMPLETION, EVENT_STREAM: SSE},
        json_body(CHAT_REQUEST),
    )
    legacy = work(
        "OpenAI legacy completions (raw text, no chat template)",
        {JSON: TEXT_COMPLETION, EVENT_STREAM: SSE},
        json_body(COMPLETIONS_REQUEST),
    )
    order = {
        "name": "order",
        "in": "query",
        "required": False,
        "schema": {"enum": ["asc", "desc"]},
    }
    return {
        "/v1/chat/completions": {"post": chat},
        "/chat/completions": {"post": chat},
        "/v1/completions": {"post": legacy},
        "/completions": {"post": legacy},
        "/v1/messages": {
            "post": _anthropic(
                "Anthropic Messages", {JSON: ANTHROPIC_REPLY, EVENT_STREAM: SSE}, MESSAGES_REQUEST
            )
        },
        "/v1/messages/count_tokens": {
            "post": _anthropic(
                "Anthropic token count",
                {
                    JSON: {
                        "type": "object",
                        "required": ["input_tokens"],
                        "properties": {"input_tokens": {"type": "integer"}},
                    }
                },
                COUNT_REQUEST,
            )
        },
        "/v1/responses": {
            "post": work(
                "OpenAI Responses (stored in memory unless store is false)",
                {JSON: RESPONSE_OBJECT, EVENT_STREAM: SSE},
                json_body(RESPONSES_REQUEST),
            )
        },
        "/v1/responses/{response_id}": {
            "get": _stored("A stored response", RESPONSE_OBJECT),
            "delete": _stored("Forget a stored response", DELETED),
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _stored("A stored response's input items", ITEM_LIST, (order,))
        },
    }
