"""A service's model over its life, from the event loop: admitting a request (its queue slot,
taken before expensive preparation such as decoding audio or images), queueing it with its
`keep_alive`, waiting for its result while watching for the client to leave, the
`X-Mlxd-Load-Ms` header of a request that waited for a reload, and `GET /mlxd/ps`, the state
`mlxd ps` shows. Nothing here touches MLX: the model thread publishes its MLX counters
(`ModelThread.memory`)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.response import json as json_response

from engine.errors import ClientClosed, Unavailable
from engine.memory import rss_bytes
from engine.modelthread import Job, ModelState, ModelThread
from engine.validation import request_keep_alive

STATUS_PATH = "/mlxd/ps"
# What `mlxd ps` calls each state.
STATE_NAMES = {
    ModelState.LOADING: "loading",
    ModelState.RELOADING: "loading",
    ModelState.READY: "loaded",
    ModelState.UNLOADED: "unloaded",
    ModelState.MISSING: "missing",
    ModelState.FAILED: "failed",
}


DISCONNECT_POLL_S = 0.25


def submit(request: Request, payload: Any, *, stream: bool = False) -> Job:
    """Queue the request's job on the service's model thread, with the request's keep_alive,
    in the slot `admit` took for it if it did."""
    worker: ModelThread = request.app.ctx.worker
    if getattr(request.ctx, "slot", False):
        release(request)
    else:
        _check_room(request.app, worker)
    job = worker.submit(payload, stream=stream, keep_alive=request_keep_alive(request))
    request.ctx.job = job
    return job


def admit(request: Request) -> None:
    """Take the request's queue slot now, before its expensive preparation: a full queue is a
    503 with Retry-After before any audio or image is decoded, not after. `submit` fills the
    slot; `release` (also run when the response goes out) gives back one left unused."""
    if getattr(request.ctx, "slot", False):
        return
    worker: ModelThread = request.app.ctx.worker
    worker.ensure_ready()
    _check_room(request.app, worker)
    request.app.ctx.slots = getattr(request.app.ctx, "slots", 0) + 1
    request.ctx.slot = True


def release(request: Request) -> None:
    if getattr(request.ctx, "slot", False):
        request.ctx.slot = False
        request.app.ctx.slots -= 1


@contextmanager
def admitted(request: Request) -> Iterator[None]:
    """`admit`, giving the slot back if the preparation fails."""
    admit(request)
    try:
        yield
    except BaseException:
        release(request)
        raise


def _check_room(app: Sanic, worker: ModelThread) -> None:
    """The queue counts the slots admitted requests hold while they prepare."""
    if worker.pending + getattr(app.ctx, "slots", 0) >= worker.queue_size:
        raise Unavailable(
            f"Server busy: {worker.queue_size} requests are already queued; retry shortly",
            code="queue_full",
            headers={"Retry-After": "1"},
        )


async def result(request: Request, job: Job, what: str = "request") -> Any:
    """The job's result. A client that goes away cancels it: the model thread drops it at its
    next step and the request ends as a 499 (logged; nobody reads it)."""
    try:
        while not (await asyncio.wait({job.future}, timeout=DISCONNECT_POLL_S))[0]:
            if peer_gone(request):
                break
        else:
            return job.future.result()
    except asyncio.CancelledError:
        pass
    job.cancel()
    raise ClientClosed(f"Client closed the request; its {what} was dropped", code="client_closed")


def peer_gone(request: Request) -> bool:
    """Has the client closed its connection? Sanic stops reading after a large body, so the
    closed socket goes unnoticed: peek at it (non-blocking; EOF reads as b"")."""
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with socket.socket(fileno=os.dup(sock.fileno())) as probe:
            return probe.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def install(app: Sanic) -> None:
    app.blueprint(_routes())

    @app.on_response
    async def load_time(request: Request, response: HTTPResponse) -> None:
        release(request)
        job: Job | None = getattr(request.ctx, "job", None)
        if job is not None and job.load_ms is not None:
            response.headers["x-mlxd-load-ms"] = f"{job.load_ms:.0f}"


def health_body(worker: ModelThread) -> dict[str, str] | None:
    """/health of a model that is not loaded but will be on the next request (200, not a
    failure); None otherwise."""
    if worker.state is ModelState.UNLOADED:
        return {"status": "ok", "model": "unloaded"}
    if worker.state is ModelState.RELOADING:
        return {"status": "ok", "model": "loading"}
    return None


def status(app: Sanic) -> dict[str, Any]:
    worker: ModelThread = app.ctx.worker
    idle_since = worker.idle_since
    limits = getattr(app.ctx, "memory_limits", None)
    return {
        "service": app.ctx.service,
        "model": app.ctx.model_id,
        "state": STATE_NAMES[worker.state],
        "message": worker.message,
        "pid": os.getpid(),
        "rss_bytes": rss_bytes(),
        "mlx_active_bytes": worker.memory.active,
        "mlx_peak_bytes": worker.memory.peak,
        "mlx_cache_bytes": worker.memory.cache,
        "mlx_memory_limit_bytes": limits.memory if limits else None,
        "requests_served": worker.served,
        "requests_pending": worker.pending,
        "idle_s": None if idle_since is None else time.monotonic() - idle_since,
        "keep_alive_s": worker.idle_after,
        "unload_in_s": worker.unload_in(),
        "loads": worker.loads,
        "load_ms": worker.load_ms,
    }


def _routes() -> Blueprint:
    bp = Blueprint("lifecycle")

    @bp.get(STATUS_PATH)
    async def ps(request: Request) -> HTTPResponse:
        return json_response(status(request.app))

    return bp
