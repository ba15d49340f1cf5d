"""The embeddings port's route in its OpenAPI document (`GET /openapi.json`)."""

from __future__ import annotations

from engine.openapi import JSON, Paths, Schema, json_body, work

TOKENS: Schema = {"type": "array", "minItems": 1, "items": {"type": "integer"}}
TEXT: Schema = {"type": "string", "minLength": 1}
EMBEDDINGS_REQUEST: Schema = {
    "type": "object",
    "required": ["input"],
    "properties": {
        "input": {
            "description": "At most --embeddings-max-inputs items",
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": TEXT},
                TOKENS,
                {"type": "array", "minItems": 1, "items": TOKENS},
            ],
        },
        "model": {"type": "string"},
        "encoding_format": {"enum": ["float", "base64"]},
        "dimensions": {"type": "integer", "minimum": 1, "maximum": 2**63 - 1},
        "truncate": {"type": "boolean"},
        "keep_alive": {"type": ["string", "number", "null"]},
    },
}
EMBEDDINGS: Schema = {
    "type": "object",
    "required": ["object", "data", "model", "usage"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["object", "index", "embedding"],
                "properties": {
                    "object": {"const": "embedding"},
                    "index": {"type": "integer"},
                    "embedding": {
                        "oneOf": [
                            {"type": "array", "items": {"type": "number"}},
                            {"type": "string"},
                        ]
                    },
                },
            },
        },
        "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"]},
        "truncated": {"type": "array", "items": {"type": "integer"}},
    },
}


def paths() -> Paths:
    embeddings = work("OpenAI embeddings", {JSON: EMBEDDINGS}, json_body(EMBEDDINGS_REQUEST))
    return {"/v1/embeddings": {"post": embeddings}, "/embeddings": {"post": embeddings}}
