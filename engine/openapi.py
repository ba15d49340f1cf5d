"""`GET /openapi.json`: each service's OpenAPI 3.1 document, built from small declarations.

This module holds the pieces every service shares (the error shape, the statuses the middleware
answers, the common routes); each service package declares its own routes' bodies and answers
(`engine/chat/openapi.py`, ...) and `document` puts them together. A test compares the document
with the routes the app registers, so neither can drift.
"""

from __future__ import annotations

from typing import Any

OPENAPI_PATH = "/openapi.json"
JSON = "application/json"
EVENT_STREAM = "text/event-stream"
Schema = dict[str, Any]
Operation = dict[str, Any]
Paths = dict[str, dict[str, Operation]]

ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}
ANTHROPIC_ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["type", "error"],
    "properties": {
        "type": {"const": "error"},
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {"type": {"type": "string"}, "message": {"type": "string"}},
        },
    },
}

# What any route may answer before or beside its handler (engine/app.py's middleware and error
# handler, engine/lifecycle.py's queue): status -> when.
COMMON_ERRORS = {
    "400": "A malformed request or Host header",
    "403": "A Host or a browser Origin that is not allowed",
    "408": "The body was not read in time",
    "413": "The body is over the service's limit",
    "431": "The request line and headers are too large",
    "500": "An internal error (logged with the request id)",
}
API_KEY_ERROR = {"401": "Missing or invalid API key (--api-key)"}
WORK_ERRORS = {
    "404": "An unknown model (--strict-model)",
    "415": "The body's content type is not the one this route reads",
    "503": "The model is loading, missing or failed, the queue is full (Retry-After), or the "
    "service is shutting down",
}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def json_body(schema: Schema) -> dict[str, Any]:
    """A JSON request body (one sent with no content type, or curl's form-urlencoded `-d`
    default, is read as JSON too, as llama-server does)."""
    return {"required": True, "content": {JSON: {"schema": schema}}}


def multipart_body(schema: Schema) -> dict[str, Any]:
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def operation(
    summary: str,
    ok: dict[str, Schema],
    *,
    body: dict[str, Any] | None = None,
    errors: dict[str, str] | None = None,
    parameters: list[dict[str, Any]] | None = None,
    error_schema: str = "Error",
) -> Operation:
    """One route: its 200 answers by content type and the errors it may give beyond the
    common ones (in `error_schema`'s shape)."""
    responses: dict[str, Any] = {"200": {"description": "OK", "content": _content(ok)}}
    for status, why in {**COMMON_ERRORS, **(errors or {})}.items():
        responses[status] = {"description": why, "content": {JSON: {"schema": ref(error_schema)}}}
    out: Operation = {"summary": summary, "responses": dict(sorted(responses.items()))}
    if body is not None:
        out["requestBody"] = body
    if parameters:
        out["parameters"] = parameters
    return out


def work(summary: str, ok: dict[str, Schema], body: dict[str, Any], **kwargs: Any) -> Operation:
    """A route that queues work on the model: it may also be a 404, 415 or 503."""
    errors = {**WORK_ERRORS, **kwargs.pop("errors", {})}
    return operation(summary, ok, body=body, errors=errors, **kwargs)


def path_parameter(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _content(ok: dict[str, Schema]) -> dict[str, Any]:
    return {media: {"schema": schema} for media, schema in ok.items()}


HEALTH: Schema = {
    "type": "object",
    "required": ["status"],
    "properties": {
        "status": {"enum": ["ok", "loading model", "error", "stalled"]},
        "model": {"enum": ["unloaded", "loading"]},
        "message": {"type": "string"},
    },
}
MODEL_CARD: Schema = {
    "type": "object",
    "required": ["id", "object", "created", "owned_by"],
    "properties": {
        "id": {"type": "string"},
        "object": {"const": "model"},
        "created": {"type": "integer"},
        "owned_by": {"type": "string"},
        "root": {"type": "string"},
        "status": {"type": "string"},
    },
}
MODEL_LIST: Schema = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": MODEL_CARD}},
}
PS: Schema = {
    "type": "object",
    "required": ["service", "model", "state"],
    "properties": {
        "service": {"type": "string"},
        "model": {"type": "string"},
        "state": {"enum": ["loading", "loaded", "unloaded", "missing", "failed"]},
    },
}


def common_paths() -> Paths:
    """The routes every service serves (engine/app.py, engine/lifecycle.py)."""
    health = operation("Health", {JSON: HEALTH}, errors={"503": "Loading, failed or stalled"})
    health["security"] = []
    health_both = {"get": health, "head": {**health, "summary": "Health, headers only"}}
    models = operation("The model this port serves, and its aliases", {JSON: MODEL_LIST})
    model_id = path_parameter("model_id", "A model id or alias from /v1/models")
    card = operation(
        "One model",
        {JSON: MODEL_CARD},
        errors={"404": "No such model on this port"},
        parameters=[model_id],
    )
    return {
        "/health": health_both,
        "/v1/health": health_both,
        "/metrics": {"get": operation("Prometheus metrics", {"text/plain": {"type": "string"}})},
        "/v1/models": {"get": models},
        "/models": {"get": models},
        "/v1/models/{model_id}": {"get": card},
        "/mlxd/ps": {"get": operation("The model's state and memory (mlxd ps)", {JSON: PS})},
        OPENAPI_PATH: {"get": operation("This document", {JSON: {"type": "object"}})},
    }


def document(service: str, version: str, paths: Paths, *, api_key: bool) -> dict[str, Any]:
    """The service's OpenAPI 3.1 document: the common routes and `paths`."""
    every = {**common_paths(), **paths}
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {"title": f"mlxd {service}", "version": version},
        "paths": every,
        "components": {
            "schemas": {"Error": ERROR_SCHEMA, "AnthropicError": ANTHROPIC_ERROR_SCHEMA}
        },
    }
    if api_key:
        _require_key(doc)
    return doc


def _require_key(doc: dict[str, Any]) -> None:
    doc["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "x-api-key"},
    }
    doc["security"] = [{"bearer": []}, {"apiKey": []}]
    for methods in doc["paths"].values():
        for op in methods.values():
            if op.get("security") != []:
                status = next(iter(API_KEY_ERROR))
                op["responses"][status] = {
                    "description": API_KEY_ERROR[status],
                    "content": {
                        JSON: {"schema": op["responses"]["400"]["content"][JSON]["schema"]}
                    },
                }
