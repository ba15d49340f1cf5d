"""The model thread: the one thread of a service process that touches MLX.

The event loop submits jobs; the model thread loads the model, then runs jobs in order. Batch
handlers take every queued job of their kind that fits one batch. Results and stream events go
back to the loop with `call_soon_threadsafe`. Cancellation is a flag checked between steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from engine.errors import ApiError, ServerError, Unavailable

log = logging.getLogger("mlxd.scheduler")

_END = object()


class ModelState(Enum):
    LOADING = "loading model"
    READY = "ok"
    MISSING = "model missing"
    FAILED = "model failed to load"


class Cancelled(Exception):
    """Raised inside a handler when its job was cancelled (client gone or shutdown)."""


@dataclass(eq=False)
class Job:
    kind: str
    payload: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    started_at: float | None = None  # set on the model thread when the handler starts
    run_others: Callable[[], float] | None = None  # set by the worker; see yield_to_queue
    finished: bool = False  # set on the model thread by `finish`

    def yield_to_queue(self) -> float:
        """Model thread, between steps of a long job: run the jobs queued now (not batch kinds)
        to completion, then return the seconds they took. A no-op inside such a nested job."""
        return self.run_others() if self.run_others is not None else 0.0

    @property
    def cancelled(self) -> bool:
        return self.cancel_event.is_set()

    def cancel(self) -> None:
        self.cancel_event.set()

    def check(self) -> None:
        if self.cancelled:
            raise Cancelled()

    def emit(self, item: Any) -> None:
        """Send a stream event to the waiting handler (model thread side)."""
        if self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self.finished = True
        self.loop.call_soon_threadsafe(self._settle, result, error)

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.events is not None:
            self.events.put_nowait(_END)
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    async def result(self) -> Any:
        """Wait for the result; if the waiting request is cancelled, cancel the job too."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def stream(self):
        """Yield stream events until the job ends; then `result()` gives the outcome."""
        assert self.events is not None
        try:
            while (item := await self.events.get()) is not _END:
                yield item
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            raise


Handler = Callable[[Any, Job], Any]
# A batch handler gets the jobs to start with and a callable that hands it the jobs of the same
# kind queued since, so that it can admit them between steps of a long batch.
BatchHandler = Callable[[Any, list[Job], Callable[[], list[Job]]], None]


@dataclass
class BatchRule:
    """How a batch handler groups jobs: it takes jobs while `fits(batch, next_job)` holds."""

    handler: BatchHandler
    fits: Callable[[list[Job], Job], bool]


class ModelWorker:
    """Owns the model thread of one service process."""

    def __init__(
        self,
        name: str,
        load: Callable[[], Any],
        handlers: dict[str, Handler],
        *,
        queue_size: int,
        batch_rules: dict[str, BatchRule] | None = None,
    ) -> None:
        self.name = name
        self._load = load
        self._handlers = handlers
        self._batch_rules = batch_rules or {}
        self.queue_size = queue_size
        self.state = ModelState.LOADING
        self.message = "Loading model"
        self.runner: Any = None
        self._queue: deque[Job] = deque()
        self._active: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self._nested = False
        self._thread = threading.Thread(target=self._main, name=f"mlxd-model-{name}", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending()

    def _pending(self) -> int:
        return len(self._queue) + sum(not job.finished for job in self._active)

    def ensure_ready(self) -> None:
        if self.state is ModelState.LOADING:
            raise Unavailable("Loading model", code="model_loading", headers={"Retry-After": "5"})
        if self.state is not ModelState.READY:
            raise Unavailable(self.message, code="model_unavailable")

    def submit(self, kind: str, payload: Any, *, stream: bool = False) -> Job:
        self.ensure_ready()
        loop = asyncio.get_running_loop()
        job = Job(kind, payload, loop, loop.create_future(), asyncio.Queue() if stream else None)
        with self._cond:
            if self._stopping:
                raise Unavailable("Server is shutting down", code="shutting_down")
            if self._pending() >= self.queue_size:
                raise Unavailable(
                    f"Server busy: {self.queue_size} requests are already queued; retry shortly",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            self._queue.append(job)
            self._cond.notify()
        return job

    def stop(self, timeout: float) -> None:
        """Cancel queued and running work and wait (bounded) for the model thread to finish."""
        with self._cond:
            self._stopping = True
            for job in [*self._queue, *self._active]:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- model-thread side -----------------------------------------------------------------

    def _main(self) -> None:
        if not self._load_model():
            return
        while (batch := self._next_batch()) is not None:
            self._run(batch)

    def _load_model(self) -> bool:
        from conversions.store import ModelMissing

        started = time.monotonic()
        try:
            self.runner = self._load()
        except ModelMissing as exc:
            self.state, self.message = ModelState.MISSING, str(exc)
        except Exception as exc:  # any load failure must leave the service up and explaining
            log.exception("%s: model failed to load", self.name)
            self.state, self.message = ModelState.FAILED, f"Model failed to load: {exc}"
        else:
            self.state, self.message = ModelState.READY, "ok"
            log.info("%s: model ready in %.1f s", self.name, time.monotonic() - started)
            return True
        log.error("%s: %s", self.name, self.message)
        return False

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while not self._queue and not self._stopping:
                self._cond.wait()
            if self._stopping:
                for job in self._queue:
                    job.finish(error=Unavailable("Server is shutting down", code="shutting_down"))
                self._queue.clear()
                return None
            batch = [self._queue.popleft()]
            rule = self._batch_rules.get(batch[0].kind)
            if rule is not None:
                self._take_matching(batch, rule)
            self._active = batch
            return batch

    def _take_matching(self, batch: list[Job], rule: BatchRule) -> None:
        kind = batch[0].kind
        for job in list(self._queue):
            if job.kind == kind and rule.fits(batch, job):
                self._queue.remove(job)
                batch.append(job)

    def _take_more(self, kind: str) -> list[Job]:
        """Queued jobs of `kind`, moved into the running batch (model thread); the batch's
        finished jobs leave it, so a batch that keeps admitting work does not fill up."""
        rule = self._batch_rules[kind]
        with self._cond:
            running = [job for job in self._active if not job.finished]
            if self._stopping:
                self._active = running
                return []
            taken: list[Job] = []
            for job in list(self._queue):
                if job.kind == kind and rule.fits(running + taken, job):
                    self._queue.remove(job)
                    taken.append(job)
            self._active = running + taken
            return taken

    def _run(self, batch: list[Job]) -> None:
        live = [job for job in batch if not job.cancelled]
        for job in batch:
            if job.cancelled:
                job.finish(error=Cancelled())
        try:
            if live:
                self._dispatch(live)
        finally:
            with self._cond:
                self._active = []

    def _dispatch(self, jobs: list[Job]) -> None:
        rule = self._batch_rules.get(jobs[0].kind)
        try:
            if rule is not None:
                rule.handler(self.runner, jobs, lambda: self._take_more(jobs[0].kind))
                return
            (job,) = jobs
            job.started_at, job.run_others = time.monotonic(), self._run_queued
            job.finish(self._handlers[job.kind](self.runner, job))
        except BaseException as exc:  # noqa: BLE001 - reported to the waiting request(s)
            error = as_client_error(exc, self.name)
            with self._cond:
                running = list(self._active)
            for job in running:
                if not job.finished:
                    job.finish(error=error)

    def _run_queued(self) -> float:
        """Run, one by one, the single-job kinds queued when called; nested runs don't recurse."""
        if self._nested:
            return 0.0
        started = time.monotonic()
        self._nested = True
        try:
            with self._cond:
                waiting = len(self._queue)
            for _ in range(waiting):
                if (job := self._pop_single()) is None:
                    break
                self._run_nested(job)
        finally:
            self._nested = False
        return time.monotonic() - started

    def _pop_single(self) -> Job | None:
        with self._cond:
            if self._stopping:
                return None
            for job in self._queue:
                if job.kind not in self._batch_rules:
                    self._queue.remove(job)
                    self._active = [*self._active, job]
                    return job
            return None

    def _run_nested(self, job: Job) -> None:
        try:
            if job.cancelled:
                raise Cancelled()
            job.started_at = time.monotonic()
            job.finish(self._handlers[job.kind](self.runner, job))
        except BaseException as exc:  # noqa: BLE001 - reported to that job's request only
            job.finish(error=as_client_error(exc, self.name))
        finally:
            with self._cond:
                self._active = [j for j in self._active if j is not job]


def as_client_error(exc: BaseException, name: str) -> BaseException:
    """What the waiting request is told: API errors as they are, anything else a logged 500."""
    if isinstance(exc, ApiError | Cancelled):
        return exc
    log.exception("%s: request failed", name, exc_info=exc)
    return ServerError(f"Internal error while running the model: {type(exc).__name__}: {exc}")
