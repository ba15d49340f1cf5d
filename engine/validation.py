"""Request parsing helpers: every client mistake becomes an InvalidRequest naming the field."""

from __future__ import annotations

import asyncio
import json
import math
import re
from typing import Any

from sanic import Request, Sanic

from engine.errors import InvalidRequest
from engine.keepalive import SERVICE_KEEP_ALIVE, parse_keep_alive

JSON_TYPES = ("application/json",)
_MISSING = object()
INT64 = (-(2**63), 2**63 - 1)  # integers a client may send: beyond, a 400 (not C++'s bad_cast)
# A \uD800-\uDFFF escape that may be half a surrogate pair: checked exactly only on a match.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _media_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


LARGE_BODY_BYTES = 1 << 20  # JSON bodies past this are parsed in a thread, off the event loop


def install_body_parser(app: Sanic) -> None:
    """Parse a large JSON body in a thread before the handler runs (after the Host, Origin and
    API-key checks); `parse_json_body` then hands out that result or its error."""

    @app.on_request
    async def parse_large_json(request: Request) -> None:
        if len(request.body or b"") <= LARGE_BODY_BYTES or _media_type(request).startswith(
            "multipart/"
        ):
            return
        loop = asyncio.get_running_loop()
        request.ctx.parsed_json = await loop.run_in_executor(None, _parse_outcome, request)


def _parse_outcome(request: Request) -> dict[str, Any] | InvalidRequest:
    try:
        return _parse_json_body(request)
    except InvalidRequest as exc:
        return exc


def parse_json_body(request: Request) -> dict[str, Any]:
    """The request body as a JSON object.

    `application/json` (and `+json`) is the contract. A body sent with no content type, or with
    curl's `-d` default (form-urlencoded) that is really JSON, is accepted too: llama-server takes
    those and scripts written for it send them.
    """
    parsed = getattr(request.ctx, "parsed_json", None)
    if isinstance(parsed, InvalidRequest):
        raise parsed
    return parsed if parsed is not None else _parse_json_body(request)


def _parse_json_body(request: Request) -> dict[str, Any]:
    media = _media_type(request)
    lenient = media in ("", "application/x-www-form-urlencoded")
    if media not in JSON_TYPES and not media.endswith("+json") and not lenient:
        raise InvalidRequest(
            f"Unsupported content type {media!r}: send the body as application/json",
            code="unsupported_media_type",
            status=415,
        )
    raw = request.body or b""
    if not raw.strip():
        raise InvalidRequest("The request body is empty: send a JSON object", code="invalid_json")
    try:
        body = json.loads(raw)
    except RecursionError:
        raise InvalidRequest("The body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:
        if not isinstance(exc, json.JSONDecodeError | UnicodeDecodeError):  # e.g. huge integers
            message = f"The body is not valid JSON: {exc}"
            raise InvalidRequest(message, code="invalid_json") from None
        if lenient and media:
            raise InvalidRequest(
                f"Unsupported content type {media!r}: send the body as application/json",
                code="unsupported_media_type",
                status=415,
            ) from exc
        raise InvalidRequest(f"The body is not valid JSON: {exc}", code="invalid_json") from exc
    if not isinstance(body, dict):
        raise InvalidRequest("The body must be a JSON object", code="invalid_json")
    if _SURROGATE_ESCAPE.search(raw) and not _encodable(body):
        raise InvalidRequest(
            "The body has a lone UTF-16 surrogate (\\ud800-\\udfff escape): send valid Unicode",
            code="invalid_json",
        )
    request.ctx.json_body = body  # for fields read beside the handler's: keep_alive
    return body


def _encodable(value: Any) -> bool:
    """No string in the parsed body holds a lone surrogate (which UTF-8 cannot encode)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return True


def _type_name(value: Any) -> str:
    names = {bool: "boolean", int: "integer", float: "number", str: "string"}
    names.update({list: "array", dict: "object", type(None): "null"})
    return names.get(type(value), type(value).__name__)


def wrong_type(name: str, expected: str, value: Any) -> InvalidRequest:
    return InvalidRequest(
        f"'{name}' must be {expected}, got {_type_name(value)}", param=name, code="invalid_type"
    )


def required(body: dict[str, Any], name: str) -> Any:
    if name not in body or body[name] is None:
        raise InvalidRequest(f"Missing required field '{name}'", param=name, code="missing_field")
    return body[name]


def optional_number(
    body: dict[str, Any],
    name: str,
    *,
    minimum: float | None = None,
    maximum: float | None = None,
    integer: bool = False,
    exclusive_minimum: bool = False,
) -> float | int | None:
    value = body.get(name)
    if value is None:
        return None
    ok = isinstance(value, int) if integer else isinstance(value, int | float)
    if isinstance(value, bool) or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise wrong_type(name, "an integer" if integer else "a number", value)
    if integer:
        minimum = INT64[0] if minimum is None else minimum
        maximum = INT64[1] if maximum is None else maximum
    low_fail = minimum is not None and (value <= minimum if exclusive_minimum else value < minimum)
    if low_fail or (maximum is not None and value > maximum):
        low = "(" if exclusive_minimum else "["
        bounds = f"{low}{minimum if minimum is not None else '-inf'}, "
        bounds += f"{maximum if maximum is not None else 'inf'}]"
        raise InvalidRequest(
            f"'{name}' is {value}, outside the allowed range {bounds}",
            param=name,
            code="out_of_range",
        )
    return value


def optional_bool(body: dict[str, Any], name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise wrong_type(name, "a boolean", value)
    return value


def optional_string(
    body: dict[str, Any], name: str, choices: tuple[str, ...] | None = None
) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise wrong_type(name, "a string", value)
    if choices is not None and value not in choices:
        raise InvalidRequest(
            f"'{name}' must be one of {', '.join(choices)}; got {value!r}",
            param=name,
            code="invalid_value",
        )
    return value


def optional_object(body: dict[str, Any], name: str) -> dict[str, Any]:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise wrong_type(name, "an object", value)
    return value


def optional_array(body: dict[str, Any], name: str) -> list[Any]:
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise wrong_type(name, "an array", value)
    return value


def request_keep_alive(request: Request) -> object:
    """The request's `keep_alive` (JSON body or form field, as Ollama's): seconds the model
    stays loaded after it, None for forever, or SERVICE_KEEP_ALIVE when the request names none."""
    body = getattr(request.ctx, "json_body", None)
    if body is not None:
        value = body.get("keep_alive")
    else:
        value = request.form.get("keep_alive") if request.form else None
    if value is None:
        return SERVICE_KEEP_ALIVE
    try:
        return parse_keep_alive(value)
    except ValueError as exc:
        raise InvalidRequest(
            f"'keep_alive': {exc}", param="keep_alive", code="invalid_value"
        ) from None
