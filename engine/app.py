"""The app factory: one Sanic app per service, with the shared middleware and error handling.

Handlers parse, validate, queue and format; the model thread (engine.modelthread) runs the model.
Nothing heavy happens at import time: the model loads on the model thread after the port is up.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.exceptions import SanicException
from sanic.handlers import ErrorHandler
from sanic.response import empty, raw
from sanic.response import json as json_response

from engine import __version__
from engine.accesslog import LoggedSanic, write_unhandled
from engine.config import LOOPBACK_HOSTS, Config
from engine.errors import (
    ApiError,
    AuthenticationError,
    ClientClosed,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    ServerError,
    status_error,
)
from engine.lifecycle import health_body
from engine.lifecycle import install as install_lifecycle
from engine.memory import apply_limits, check_fits
from engine.metrics import CONTENT_TYPE, Metrics, ServiceMetrics
from engine.modelthread import ModelState, ModelThread, Policy
from engine.openapi import OPENAPI_PATH, Paths, document
from engine.protocol import HttpOnlyProtocol
from engine.shutdown import drain, health_problem
from engine.store import ModelInfo, Store
from engine.store.catalog import DEFAULT_IDS, Service
from engine.validation import install_body_parser

log = logging.getLogger("mlxd.server")

PUBLIC_PATHS = frozenset({"/health", "/v1/health"})


@dataclass(frozen=True)
class ServiceSpec:
    """What a service package contributes: routes, how to load its runner (model thread) and
    the scheduling policy its model thread runs."""

    name: Service
    blueprint: Blueprint
    load: Callable[[ModelInfo, Config], Any]
    policy: Callable[[Config], Policy]
    metrics: ServiceMetrics | None = None  # the service's own counters on /metrics
    # Routes that answer errors in another API's shape: (path prefix, ApiError -> response).
    error_shapes: tuple[tuple[str, Callable[[ApiError], HTTPResponse]], ...] = ()
    openapi: Callable[[], Paths] = dict  # the service's routes in its /openapi.json


class ServiceApp(LoggedSanic):
    """A service's Sanic app: served with `HttpOnlyProtocol` unless told otherwise."""

    def prepare(self, *args: Any, protocol: Any = None, **kwargs: Any) -> None:
        super().prepare(*args, protocol=protocol or HttpOnlyProtocol, **kwargs)

    async def create_server(self, *args: Any, protocol: Any = None, **kwargs: Any) -> Any:
        return await super().create_server(*args, protocol=protocol or HttpOnlyProtocol, **kwargs)


def served_model_id(ref: str) -> str:
    """The id a port answers with: the store id, or the directory name of a model path."""
    return Path(ref.rstrip("/")).name if "/" in ref else ref


class OpenAIErrorHandler(ErrorHandler):
    """Every error, the framework's own included, in the OpenAI error shape."""

    def default(self, request: Request, exception: Exception) -> HTTPResponse:
        return error_response(request, exception)


def error_response(request: Request | None, exception: Exception) -> HTTPResponse:
    error = _api_error(request, exception)
    if isinstance(error, ServerError):
        _log_internal(request, error, exception)
    return _shaped(request, error)


def _log_internal(request: Request | None, error: ServerError, exception: Exception) -> None:
    """An internal error's line names the request (its id is on its access line and in the
    client's x-request-id); an exception no code turned into an API error has its traceback."""
    where = f"{request.method} {request.path}" if request is not None else "-"
    rid = getattr(request.ctx, "request_id", None) if request is not None else None
    unhandled = not isinstance(exception, ApiError)
    log.error(
        "%s in %s id=%s: %s",
        "unhandled error" if unhandled else "internal error",
        where,
        rid or "-",
        error.message,
        exc_info=exception if unhandled else None,
    )


def _api_error(request: Request | None, exception: Exception) -> ApiError:
    if isinstance(exception, ApiError):
        return exception
    if isinstance(exception, asyncio.CancelledError):  # the client went away mid-request
        return ClientClosed("Client closed the request", code="client_closed")
    if isinstance(exception, SanicException):
        return _framework_error(request, exception)
    return ServerError(f"Internal server error: {type(exception).__name__}")


def _shaped(request: Request | None, error: ApiError) -> HTTPResponse:
    """The error in the shape of the API the request's route speaks (OpenAI's by default)."""
    shapes = getattr(request.app.ctx, "error_shapes", ()) if request is not None else ()
    for prefix, shape in shapes:
        if request.path.startswith(prefix):
            return shape(error)
    return error.response()


def _framework_error(request: Request | None, exc: SanicException) -> ApiError:
    status = exc.status_code
    method, path = (request.method, request.path) if request is not None else ("", "")
    if status == 404:
        return NotFound(f"Not found: {method} {path}", code="not_found")
    if status == 405:
        return status_error(405, f"Method {method} is not allowed for {path}", "method_not_allowed")
    if status == 413 and "header" in str(exc).lower():
        message = "Request header fields too large (the request line and headers)"
        return status_error(431, message, "request_header_fields_too_large")
    if status == 413:
        limit = request.app.config.REQUEST_MAX_SIZE if request is not None else 0
        message = f"Request body too large: the limit is {limit // (1024 * 1024)} MiB"
        return status_error(413, message, "request_too_large")
    if status == 408:
        return status_error(408, "Request timed out while reading the body", "request_timeout")
    return status_error(status, str(exc) or "Bad request", None)


def create_app(spec: ServiceSpec, config: Config) -> Sanic:
    """The app for one service."""
    service = spec.name
    app = ServiceApp(f"mlxd_{service}", error_handler=OpenAIErrorHandler(), configure_logging=False)
    app.config.REQUEST_MAX_SIZE = config.max_body_bytes(service)
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = config.shutdown_timeout
    app.config.KEEP_ALIVE_TIMEOUT = 30
    app.config.REQUEST_TIMEOUT = 300
    app.config.RESPONSE_TIMEOUT = 24 * 3600
    app.config.NOISY_EXCEPTIONS = False
    app.config.FALLBACK_ERROR_FORMAT = "json"
    app.ctx.config = config
    app.ctx.service = service
    app.ctx.model_ref = config.model(service)
    app.ctx.model_id = served_model_id(config.model(service))
    app.ctx.aliases = _aliases(service, app.ctx.model_id)
    app.ctx.metrics = Metrics(
        service, app.ctx.model_id, lambda: getattr(app.ctx, "worker", None), spec.metrics
    )
    app.ctx.error_shapes = spec.error_shapes
    app.ctx.openapi = document(service, __version__, spec.openapi(), api_key=bool(config.api_key))
    app.blueprint(common_routes())
    app.blueprint(spec.blueprint)
    install_lifecycle(app)
    install_body_parser(app)
    _install_middleware(app, config)
    _install_listeners(app, spec, config)
    return app


def _aliases(service: Service, model_id: str) -> tuple[str, ...]:
    default = DEFAULT_IDS[service]
    return () if default == model_id else (default,)


def _install_listeners(app: Sanic, spec: ServiceSpec, config: Config) -> None:
    @app.before_server_start
    async def start_model_thread(app: Sanic) -> None:
        store = Store(config.home)

        def load() -> Any:
            model = store.resolve(app.ctx.model_ref, spec.name)
            limits = apply_limits(config.mlx_memory_limit, config.mlx_cache_limit)
            app.ctx.memory_limits = limits
            check_fits(model.id, model.size_bytes, limits)
            return spec.load(model, config)

        app.ctx.worker = ModelThread(
            spec.name,
            load,
            spec.policy(config),
            queue_size=config.queue_size,
            observer=app.ctx.metrics,
            keep_alive=config.keep_alive_s(spec.name),
        )
        app.ctx.worker.start()

    @app.before_server_stop
    async def stop_model_thread(app: Sanic) -> None:
        await drain(app, spec.name, config.shutdown_timeout, config.stall_seconds)


def _install_middleware(app: Sanic, config: Config) -> None:
    allowed_hosts = {h.lower() for h in (*LOOPBACK_HOSTS, *config.allowed_hosts, config.host)}
    if config.host not in LOOPBACK_HOSTS and not config.allowed_hosts:
        allowed_hosts.add("*")  # a non-loopback bind requires an API key, which guards instead

    @app.on_request(priority=100)
    async def start(request: Request) -> HTTPResponse | None:
        request.ctx.started = getattr(request.ctx, "started", None) or time.monotonic()
        request.ctx.request_id = request.headers.get("x-request-id") or uuid.uuid4().hex[:16]
        _check_host(request, allowed_hosts)
        _check_origin(request, config)
        if request.method == "OPTIONS" and _cors_origin(request, config):
            return empty(status=204)
        if config.api_key and request.path not in PUBLIC_PATHS:
            _check_api_key(request, config.api_key)
        return None

    @app.on_response(priority=100)
    async def finish(request: Request, response: HTTPResponse) -> None:
        rid = getattr(request.ctx, "request_id", None) or uuid.uuid4().hex[:16]
        request.ctx.request_id = rid
        response.headers["x-request-id"] = rid
        if origin := _cors_origin(request, config):
            response.headers["access-control-allow-origin"] = origin
            response.headers["access-control-allow-headers"] = (
                "authorization, content-type, x-api-key, anthropic-version, anthropic-beta"
            )
            response.headers["access-control-allow-methods"] = "GET, POST, DELETE, OPTIONS"
            response.headers["vary"] = "Origin"
        started = getattr(request.ctx, "started", None)
        ms = (time.monotonic() - started) * 1000 if started else 0.0
        route = request.uri_template if request.route is not None else "unmatched"
        app.ctx.metrics.observe_request(route, request.method, response.status, ms / 1000)
        write_unhandled(request, response.status)


_HOST = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9._-]+)(:[0-9]{1,5})?")
# Origins a local tool's page or app may send without --cors-origins (as Ollama allows).
_LOCAL_ORIGIN = re.compile(
    r"(https?://(localhost|127\.0\.0\.1|\[::1\])(:[0-9]{1,5})?"
    r"|(app|file|tauri|vscode-webview)://.*)"
)


def _host_name(header: str) -> str | None:
    """The name in a Host header (`name`, `name:port`, `[v6]`, `[v6]:port`); None if malformed."""
    match = _HOST.fullmatch(header.strip().lower())
    return match.group(1) if match else None


def _check_host(request: Request, allowed: set[str]) -> None:
    headers = request.headers.getall("host", [])
    if not headers:
        return  # HTTP/1.0, or a request the framework refused before reading its headers
    host = _host_name(headers[0]) if len(headers) == 1 else None
    if host is None:
        raise InvalidRequest("A request needs exactly one well-formed Host header", code="bad_host")
    if host not in allowed and "*" not in allowed:
        raise PermissionDenied(
            f"Host {host!r} is not allowed: mlxd answers loopback names only "
            "(add it with --allowed-hosts)",
            code="host_not_allowed",
        )


def _check_origin(request: Request, config: Config) -> None:
    """A browser's cross-origin request from a page not allowed by --cors-origins is refused,
    so that a web page cannot make the user's browser run work here ("simple" POSTs need no
    preflight). Clients that are not browsers send no Origin."""
    origin = request.headers.get("origin")
    if origin is None or _cors_origin(request, config) or _LOCAL_ORIGIN.fullmatch(origin):
        return
    raise PermissionDenied(
        f"Cross-origin request from {origin!r} refused: allow the origin with --cors-origins",
        code="origin_not_allowed",
    )


def _cors_origin(request: Request, config: Config) -> str | None:
    origin = request.headers.get("origin")
    if not origin or not config.cors_origins:
        return None
    if "*" in config.cors_origins:
        return "*"
    return origin if origin in config.cors_origins else None


def _check_api_key(request: Request, api_key: str) -> None:
    """`Authorization: Bearer KEY` (OpenAI) or `x-api-key: KEY` (Anthropic)."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    bearer = token.strip() if scheme.lower() == "bearer" else ""
    given = bearer or request.headers.get("x-api-key", "").strip()
    if not hmac.compare_digest(given.encode(), api_key.encode()):
        raise AuthenticationError(
            "Missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
            code="invalid_api_key",
        )


def common_routes() -> Blueprint:
    bp = Blueprint("common")

    @bp.route("/health", methods=["GET", "HEAD"])
    @bp.route("/v1/health", methods=["GET", "HEAD"], name="health_v1")
    async def health(request: Request) -> HTTPResponse:
        worker: ModelThread = request.app.ctx.worker
        if problem := health_problem(worker, request.app.ctx.config.stall_seconds):
            return json_response(problem, status=503)
        if worker.state is ModelState.READY:
            return json_response({"status": "ok"})
        if body := health_body(worker):  # idle-unloaded: the next request reloads it
            return json_response(body)
        if worker.state is ModelState.LOADING:
            return json_response({"status": "loading model"}, status=503)
        return json_response({"status": "error", "message": worker.message}, status=503)

    @bp.get("/metrics")
    async def metrics(request: Request) -> HTTPResponse:
        return raw(request.app.ctx.metrics.render(), content_type=CONTENT_TYPE)

    @bp.get(OPENAPI_PATH)
    async def openapi(request: Request) -> HTTPResponse:
        return json_response(request.app.ctx.openapi)

    @bp.get("/v1/models")
    @bp.get("/models", name="models_bare")  # llama-server serves both
    async def models(request: Request) -> HTTPResponse:
        return json_response({"object": "list", "data": _model_cards(request.app)})

    @bp.get("/v1/models/<model_id:path>")
    async def model(request: Request, model_id: str) -> HTTPResponse:
        for card in _model_cards(request.app):
            if card["id"] == model_id:
                return json_response(card)
        raise NotFound(f"The model {model_id!r} does not exist", code="model_not_found")

    return bp


def _model_cards(app: Sanic) -> list[dict[str, Any]]:
    cards = []
    for name in (app.ctx.model_id, *app.ctx.aliases):
        cards.append(
            {
                "id": name,
                "object": "model",
                "created": 0,
                "owned_by": "mlxd",
                "root": app.ctx.model_id,
                "status": app.ctx.worker.state.value,
            }
        )
    return cards


def resolve_requested_model(request: Request, requested: Any) -> str:
    """The served model id; with --strict-model an unknown name is a 404."""
    app = request.app
    if requested is not None and not isinstance(requested, str):
        from engine.validation import wrong_type

        raise wrong_type("model", "a string", requested)
    if app.ctx.config.strict_model and requested not in (None, app.ctx.model_id, *app.ctx.aliases):
        raise NotFound(
            f"The model {requested!r} does not exist: this port serves {app.ctx.model_id!r}",
            param="model",
            code="model_not_found",
        )
    return app.ctx.model_id
