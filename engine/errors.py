"""Errors in the OpenAI shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

from sanic import HTTPResponse
from sanic.response import json as json_response


class ApiError(Exception):
    """An error the client sees as an HTTP status and an OpenAI-shaped body."""

    status = 400
    type = "invalid_request_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        status: int | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        if status is not None:
            self.status = status
        self.headers = headers or {}
        self.extra = extra or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        error.update(self.extra)
        return {"error": error}

    def response(self) -> HTTPResponse:
        return json_response(self.body(), status=self.status, headers=self.headers)

    def anthropic_body(self) -> dict:
        """Anthropic's shape: {"type": "error", "error": {"type", "message"}}."""
        kind = ANTHROPIC_TYPES.get(self.status, "api_error" if self.status >= 500 else self.type)
        return {"type": "error", "error": {"type": kind, "message": self.message}}

    def anthropic_response(self) -> HTTPResponse:
        return json_response(self.anthropic_body(), status=self.status, headers=self.headers)


ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
}


class InvalidRequest(ApiError):
    status = 400
    type = "invalid_request_error"


class AuthenticationError(ApiError):
    status = 401
    type = "authentication_error"


class PermissionDenied(ApiError):
    status = 403
    type = "permission_error"


class NotFound(ApiError):
    status = 404
    type = "not_found_error"


class Unavailable(ApiError):
    status = 503
    type = "unavailable_error"


class ServerError(ApiError):
    status = 500
    type = "server_error"


class ClientClosed(ApiError):
    """The client went away; nobody reads this response (499, nginx's convention)."""

    status = 499
    type = "client_closed_request"


def status_error(status: int, message: str, code: str | None = None) -> ApiError:
    """Map a bare HTTP status (from the framework) to the matching ApiError."""
    kinds: dict[int, type[ApiError]] = {
        401: AuthenticationError,
        403: PermissionDenied,
        404: NotFound,
        503: Unavailable,
    }
    if status in kinds:
        return kinds[status](message, code=code)
    if status >= 500:
        return ServerError(message, code=code, status=status)
    return InvalidRequest(message, code=code, status=status)
