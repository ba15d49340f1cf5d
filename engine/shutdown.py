"""A service process's end and its health: draining on SIGTERM, and the stall watch.

On SIGTERM Sanic runs `drain` before it closes the listening socket. New requests are refused
(503 `shutting_down` with `Retry-After`), queued ones are answered the same at once, and running
ones may finish until the shutdown timeout's last part; what is still running then is answered
with the 503 (a stream that has started ends with an error event instead of its finish). The
last part of the timeout is left for writing those answers and closing the connections, so the
process exits within `--shutdown-timeout`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from sanic import Sanic

from engine.modelthread import ModelThread

log = logging.getLogger("mlxd.shutdown")

POLL_S = 0.05
REPLY_SHARE = 0.3  # of the shutdown timeout, kept for writing the last answers and exiting
REPLY_MAX_S = 3.0


def reply_reserve(timeout: float) -> float:
    """Seconds of the shutdown timeout kept after the drain for answers and exit."""
    return min(REPLY_MAX_S, timeout * REPLY_SHARE)


async def drain(app: Sanic, name: str, timeout: float, stall_seconds: float) -> None:
    """Let running work finish within the shutdown timeout, answer the rest with 503s."""
    worker: ModelThread = app.ctx.worker
    reserve = reply_reserve(timeout)
    deadline = time.monotonic() + timeout - reserve
    worker.begin_drain()
    log.info("%s: shutting down; %d requests running", name, worker.pending)
    while worker.pending and time.monotonic() < deadline and not stalled(worker, stall_seconds):
        await asyncio.sleep(POLL_S)
    if left := worker.pending:
        log.warning("%s: %d requests did not finish before shutdown: answered 503", name, left)
    worker.abort()
    # Sanic then waits this long for the connections to finish writing their answers.
    app.config.GRACEFUL_SHUTDOWN_TIMEOUT = max(POLL_S, reserve / 2)


def stalled(worker: ModelThread, stall_seconds: float) -> bool:
    return stall_seconds > 0 and worker.stalled_for() >= stall_seconds


def health_problem(worker: ModelThread, stall_seconds: float) -> dict[str, Any] | None:
    """/health's 503 body when the service is stalled or stopping; None otherwise."""
    if stalled(worker, stall_seconds):
        return {
            "status": "stalled",
            "message": f"the model thread has made no progress on a job for "
            f"{worker.stalled_for():.0f} s (--stall-seconds {stall_seconds:g})",
        }
    if worker.draining:
        return {"status": "shutting down"}
    return None
