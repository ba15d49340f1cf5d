"""A service's model over its life, from the event loop: queueing a request with its
`keep_alive`, the `X-Mlxd-Load-Ms` header of a request that waited for a reload, and
`GET /mlxd/ps`, the state `mlxd ps` shows. Nothing here touches MLX: the model thread publishes
its MLX counters (`ModelThread.memory`)."""

from __future__ import annotations

import os
import time
from typing import Any

from sanic import Blueprint, HTTPResponse, Request, Sanic
from sanic.response import json as json_response

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


def submit(request: Request, payload: Any, *, stream: bool = False) -> Job:
    """Queue the request's job on the service's model thread, with the request's keep_alive."""
    worker: ModelThread = request.app.ctx.worker
    job = worker.submit(payload, stream=stream, keep_alive=request_keep_alive(request))
    request.ctx.job = job
    return job


def install(app: Sanic) -> None:
    app.blueprint(_routes())

    @app.on_response
    async def load_time(request: Request, response: HTTPResponse) -> None:
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
