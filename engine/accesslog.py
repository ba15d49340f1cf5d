"""The access log: one line per request, written when the request is over.

A streamed reply's line is written when its stream ends, not when its headers go out: it
carries the whole duration and the outcome (`stream=completed`, `stream=client_gone`,
`stream=failed:CODE` when the stream ended with an error event).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sanic import Request, Sanic

from engine.config import PROBE_AGENT
from engine.errors import ApiError
from engine.modelthread import Cancelled, Job

access_log = logging.getLogger("mlxd.access")

CLIENT_CLOSED = 499
EVENT_STREAM = "text/event-stream"


class LoggedSanic(Sanic):
    """Sanic with the access line written once the request is over (streams included)."""

    async def handle_request(self, request: Request) -> None:  # type: ignore[override]
        request.ctx.logged_here = True
        request.ctx.started = time.monotonic()
        gone = False
        try:
            await super().handle_request(request)
        except asyncio.CancelledError:
            gone = True
            raise
        finally:
            write(request, gone)


def write(request: Request, gone: bool) -> None:
    response = request.stream.response if request.stream is not None else None
    status = CLIENT_CLOSED if gone or response is None else response.status
    line = f"{request.method} {request.path} {status} {elapsed_ms(request):.1f}ms id={rid(request)}"
    if response is not None and (response.content_type or "").startswith(EVENT_STREAM):
        line += f" stream={stream_outcome(request, gone)}"
    level = logging.DEBUG if request.headers.get("user-agent") == PROBE_AGENT else logging.INFO
    access_log.log(level, line)


def write_unhandled(request: Request, status: int) -> None:
    """The line of a request the framework answered before any handler ran (431, 400)."""
    if not getattr(request.ctx, "logged_here", False):
        line = f"{request.method} {request.path} {status} {elapsed_ms(request):.1f}ms"
        access_log.info(f"{line} id={rid(request)}")


def elapsed_ms(request: Request) -> float:
    started = getattr(request.ctx, "started", None)
    return (time.monotonic() - started) * 1000 if started else 0.0


def rid(request: Request) -> str:
    return getattr(request.ctx, "request_id", None) or "-"


def stream_outcome(request: Request, gone: bool) -> str:
    job: Job | None = getattr(request.ctx, "job", None)
    if job is None:
        return "client_gone" if gone or _transport_closed(request) else "completed"
    if job.future.done() and not job.future.cancelled():
        error = job.future.exception()
        if isinstance(error, ApiError):
            return f"failed:{error.code or error.status}"
        if error is not None:
            return "client_gone" if isinstance(error, Cancelled) else "failed"
    return "client_gone" if gone or job.cancelled else "completed"


def _transport_closed(request: Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()
