"""The model thread: the one thread of a service process that touches MLX.

A plain mechanism. The event loop submits jobs into a bounded queue; the model thread loads the
model, then runs the service's scheduling policy, which takes jobs from its `Inbox` and runs
them. Results and stream events go back to the loop with `call_soon_threadsafe`; cancellation
is a flag the policy checks between steps. The policies (chat's decode loop, embeddings'
batches, speech's windows) live with their services.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol

from engine.errors import ApiError, ServerError, Unavailable
from engine.keepalive import SERVICE_KEEP_ALIVE
from engine.memory import MlxMemory, mlx_memory, release_mlx_memory, rss_bytes
from engine.store import ModelMissing

log = logging.getLogger("mlxd.modelthread")

_END = object()


class ModelState(Enum):
    LOADING = "loading model"
    READY = "ok"
    UNLOADED = "unloaded"  # idled past its keep-alive; the next request reloads it
    RELOADING = "reloading model"
    MISSING = "model missing"
    FAILED = "model failed to load"


class Cancelled(Exception):
    """Raised inside a policy when its job was cancelled (client gone or shutdown)."""


SHUTDOWN_RETRY_AFTER_S = 5


def shutting_down() -> Unavailable:
    """What a request the service cannot finish before it stops is told."""
    return Unavailable(
        "Server is shutting down; retry shortly",
        code="shutting_down",
        headers={"Retry-After": str(SHUTDOWN_RETRY_AFTER_S)},
    )


@dataclass(eq=False)
class Job:
    payload: Any
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future
    events: asyncio.Queue | None = None
    cancel_event: threading.Event = field(default_factory=threading.Event)
    enqueued_at: float = field(default_factory=time.monotonic)
    finished: bool = False  # set on the model thread by `finish`
    load_ms: float | None = None  # the reload this job waited for, if any
    observer: Observer | None = None
    progress: Callable[[], None] | None = None  # the model thread's heartbeat
    started_at: float | None = None  # taken by the policy
    finished_at: float | None = None
    # Each stream event with the time the model thread sent it (for the observer's timings).
    timeline: list[tuple[float, Any]] = field(default_factory=list)

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
        if self.progress is not None:
            self.progress()
        if self.events is not None:
            self.timeline.append((time.monotonic(), item))
            self.loop.call_soon_threadsafe(self.events.put_nowait, item)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.progress is not None:
            self.progress()
        self.finished = True
        self.finished_at = time.monotonic()
        self.loop.call_soon_threadsafe(self._settle, result, error)
        if self.observer is not None:
            try:
                self.observer.finished(self, result, error)
            except Exception:  # an observer's bug must not fail the model thread
                log.exception("job observer failed")

    def _settle(self, result: Any, error: BaseException | None) -> None:
        if self.events is not None:
            self.events.put_nowait(_END)
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)

    def answer_now(self, error: BaseException) -> None:
        """Answer the waiting request with `error` at once, whatever the model thread still does
        with the job (event loop only; a later `finish` is ignored)."""
        self.cancel()
        self._settle(None, error)

    async def result(self) -> Any:
        """Wait for the result; if the waiting request is cancelled, cancel the job too."""
        try:
            return await asyncio.shield(self.future)
        except asyncio.CancelledError:
            self.cancel()
            raise

    async def stream(self):
        """Yield stream events until the job ends; then `result()` gives the outcome."""
        async for batch in self.batches():
            for item in batch:
                yield item

    async def batches(self):
        """Yield the stream events in lists: each list holds every event that had arrived by
        then (a streaming handler sends them in one write); `result()` gives the outcome."""
        assert self.events is not None
        try:
            while True:
                item = await self.events.get()
                batch = []
                while item is not _END:
                    batch.append(item)
                    if self.events.empty():
                        break
                    item = self.events.get_nowait()
                if batch:
                    yield batch
                if item is _END:
                    return
        except (asyncio.CancelledError, GeneratorExit):
            self.cancel()
            raise


class Outbox:
    """Stream events a policy produces during one step, handed to the event loop in one
    wake-up (`flush`) instead of one per event. Flush before finishing a job."""

    def __init__(self) -> None:
        self._items: list[tuple[Job, Any]] = []

    def emit(self, job: Job, item: Any) -> None:
        if job.progress is not None:
            job.progress()
        if job.events is not None:
            job.timeline.append((time.monotonic(), item))
            self._items.append((job, item))

    def flush(self) -> None:
        if not self._items:
            return
        items, self._items = self._items, []
        items[0][0].loop.call_soon_threadsafe(_deliver, items)


def _deliver(items: list[tuple[Job, Any]]) -> None:
    for job, item in items:
        job.events.put_nowait(item)  # type: ignore[union-attr]


# Whether a queued job may join the jobs taken so far in one `Inbox.take` call.
Fits = Callable[[list[Job], Job], bool]


class Inbox(Protocol):
    """What a policy sees of the queue (model thread only)."""

    def wait(self, block: bool = True) -> bool:
        """False once the service is stopping; with `block`, first wait for a queued job."""
        ...

    def take(self, fits: Fits | None = None, *, limit: int | None = None) -> list[Job]:
        """Queued jobs, oldest first, that `fits` accepts (at most `limit`); they count as
        running until finished. Cancelled jobs are finished and dropped on the way."""
        ...


# A service's scheduling policy: runs jobs from the inbox until `wait` returns False.
Policy = Callable[[Any, Inbox], None]


class Observer(Protocol):
    """Watches the model thread's work (the metrics); called on the model thread."""

    def loaded(self, seconds: float) -> None: ...

    def finished(self, job: Job, result: Any, error: BaseException | None) -> None: ...


class ModelThread:
    """Owns the model thread of one service process."""

    def __init__(
        self,
        name: str,
        load: Callable[[], Any],
        policy: Policy,
        *,
        queue_size: int,
        observer: Observer | None = None,
        keep_alive: float | None = None,
    ) -> None:
        self.name = name
        self.keep_alive = keep_alive  # seconds an idle model stays loaded; None: forever
        self.idle_after = keep_alive  # the last request's keep_alive, else the service's
        self.idle_since: float | None = None  # monotonic; None while requests are queued
        self.accepted = 0
        self.loads = 0
        self.load_ms: float | None = None
        self.memory = MlxMemory()  # MLX's counters as the model thread last read them
        self._idle = False
        self.observer = observer
        self._load = load
        self._policy = policy
        self.queue_size = queue_size
        self.state = ModelState.LOADING
        self.message = "Loading model"
        self.runner: Any = None
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []
        self._cond = threading.Condition()
        self._stopping = False
        self.draining = False  # shutdown: new jobs refused, running ones finish
        self.progress_at = time.monotonic()  # the model thread's last sign of progress
        self._thread = threading.Thread(target=self._main, name=f"mlxd-model-{name}", daemon=True)

    # ---- event-loop side -------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    @property
    def pending(self) -> int:
        with self._cond:
            return self._pending()

    def _pending(self) -> int:
        return len(self._queue) + sum(not job.finished for job in self._running)

    def counts(self) -> tuple[int, int]:
        """(queued, running): jobs waiting for the policy, and taken but not finished."""
        with self._cond:
            return len(self._queue), sum(not job.finished for job in self._running)

    @property
    def served(self) -> int:
        """Requests accepted and since finished, whatever their outcome."""
        return self.accepted - self.pending

    def unload_in(self) -> float | None:
        """Seconds until the idle model unloads; None when it is not idle or stays loaded."""
        idle_since, idle_after = self.idle_since, self.idle_after
        if self.state is not ModelState.READY or idle_since is None or idle_after is None:
            return None
        return max(0.0, idle_since + idle_after - time.monotonic())

    def ensure_ready(self) -> None:
        if self.state is ModelState.LOADING:
            raise Unavailable("Loading model", code="model_loading", headers={"Retry-After": "5"})
        usable = (ModelState.READY, ModelState.UNLOADED, ModelState.RELOADING)
        # A reload that failed is tried again by the next request; a first load is not.
        if self.state not in usable and self.loads == 0:
            raise Unavailable(self.message, code="model_unavailable")

    def submit(
        self, payload: Any, *, stream: bool = False, keep_alive: Any = SERVICE_KEEP_ALIVE
    ) -> Job:
        """Queue a job (an unloaded model reloads for it). `keep_alive`: seconds the model
        stays loaded once idle after this job (None: forever), else the service's setting."""
        self.ensure_ready()
        loop = asyncio.get_running_loop()
        job = Job(payload, loop, loop.create_future(), asyncio.Queue() if stream else None)
        job.observer = self.observer
        job.progress = self._beat
        with self._cond:
            if self._stopping or self.draining:
                raise shutting_down()
            if self._pending() >= self.queue_size:
                raise Unavailable(
                    f"Server busy: {self.queue_size} requests are already queued; retry shortly",
                    code="queue_full",
                    headers={"Retry-After": "1"},
                )
            if not self._pending():  # the stall clock starts when work arrives
                self.progress_at = time.monotonic()
            self._queue.append(job)
            self.accepted += 1
            self.idle_since = None
            self.idle_after = self.keep_alive if keep_alive is SERVICE_KEEP_ALIVE else keep_alive
            self._cond.notify()
        return job

    def stalled_for(self) -> float:
        """Seconds the loaded model has made no progress while jobs wait on it (0: none wait,
        or the model is not loaded)."""
        with self._cond:
            busy = self._pending() > 0
        if not busy or self.state is not ModelState.READY:
            return 0.0
        return max(0.0, time.monotonic() - self.progress_at)

    def begin_drain(self) -> None:
        """Shutdown's first step (event loop): refuse new jobs, answer the queued ones with a
        503, let the running ones finish."""
        with self._cond:
            self.draining = True
            queued, self._queue = list(self._queue), deque()
        for job in queued:
            job.cancel()
            job.finish(error=shutting_down())

    def abort(self) -> None:
        """Shutdown's last step (event loop): answer every unfinished job with a 503 now and
        stop the model thread, which drops the work at its next step."""
        with self._cond:
            self._stopping = True
            jobs = [*self._queue, *self._running]
            self._cond.notify_all()
        for job in jobs:
            if not job.finished:
                job.answer_now(shutting_down())

    def stop(self, timeout: float) -> None:
        """Cancel queued and running work and wait (bounded) for the model thread to finish."""
        with self._cond:
            self._stopping = True
            for job in [*self._queue, *self._running]:
                job.cancel()
            self._cond.notify_all()
        self._thread.join(timeout)

    # ---- model-thread side (the Inbox) -----------------------------------------------------

    def _beat(self) -> None:
        self.progress_at = time.monotonic()

    def wait(self, block: bool = True) -> bool:
        """Also False (with `_idle` set) once a loaded model has waited past its keep-alive."""
        self._beat()
        self.memory = mlx_memory()
        with self._cond:
            while block and not self._queue and not self._stopping:
                if self.idle_since is None:
                    self.idle_since = time.monotonic()
                left = self.unload_in()
                if left == 0.0:
                    self._idle = True
                    return False
                self._cond.wait(left)
            return not self._stopping

    def take(self, fits: Fits | None = None, *, limit: int | None = None) -> list[Job]:
        taken: list[Job] = []
        self._beat()
        with self._cond:
            self._running = [job for job in self._running if not job.finished]
            if self._stopping:
                return taken
            for job in list(self._queue):
                if limit is not None and len(taken) >= limit:
                    break
                if job.cancelled:
                    self._queue.remove(job)
                    job.finish(error=Cancelled())
                elif fits is None or fits(taken, job):
                    self._queue.remove(job)
                    job.started_at = time.monotonic()
                    taken.append(job)
            self._running += taken
        return taken

    # ---- model-thread main -------------------------------------------------------------------

    def _main(self) -> None:
        loaded = self._load_model()
        while loaded and self._serve():
            self._unload()
            loaded = self._reload()
        if self._stopping or loaded:
            error = shutting_down()
        else:  # the first load failed: anything queued meanwhile is told why
            error = Unavailable(self.message, code="model_unavailable")
        self._fail_running(error)
        self._fail_queued(error)

    def _reload(self) -> bool:
        """Wait for a request, then load the model again. A failed reload answers the requests
        that waited for it with the reason; the next request tries again (the files may be
        back, memory freed). False once the service stops."""
        while self.wait():
            if self._load_model():
                return True
            self._fail_queued(Unavailable(self.message, code="model_unavailable"))
        return False

    def _fail_queued(self, error: BaseException) -> None:
        with self._cond:
            queued, self._queue = list(self._queue), deque()
        for job in queued:
            job.finish(error=error)

    def _serve(self) -> bool:
        """Run the policy until the service stops (False) or the model has idled past its
        keep-alive (True)."""
        self._idle = False
        while not self._idle and self.wait(block=False):
            try:
                self._policy(self.runner, self)
            except BaseException as exc:  # noqa: BLE001 - reported to the running requests
                self._fail_running(as_client_error(exc, self.name))
        return self._idle and not self._stopping

    def _unload(self) -> None:
        """Drop the model and give its memory back: the runner (and the policy's state, gone
        with its frames), then MLX's cached buffers."""
        before = rss_bytes()
        self.runner = None
        gc.unfreeze()  # the model's objects were frozen at load: let the collector free them
        gc.collect()
        release_mlx_memory()
        self.memory = mlx_memory()
        self.state, self.message = ModelState.UNLOADED, "unloaded"
        log.info(
            "%s: model unloaded after idling; RSS %.0f -> %.0f MB",
            self.name,
            before / 1e6,
            rss_bytes() / 1e6,
        )

    def _fail_running(self, error: BaseException) -> None:
        with self._cond:
            running, self._running = self._running, []
        for job in running:
            if not job.finished:
                job.finish(error=error)

    def _load_model(self) -> bool:
        started = time.monotonic()
        reloading = self.loads > 0
        if reloading:
            self.state, self.message = ModelState.RELOADING, "Reloading model"
        try:
            runner = self._load()
        except ModelMissing as exc:
            self.state, self.message = ModelState.MISSING, str(exc)
        except Exception as exc:  # any load failure must leave the service up and explaining
            log.exception("%s: model failed to load", self.name)
            self.state, self.message = ModelState.FAILED, f"Model failed to load: {exc}"
        else:
            # The loaded model's objects live as long as the process: keep them out of the
            # collector's full passes, which would otherwise pause every stream for ~0.2 s.
            gc.collect()
            gc.freeze()
            self.runner = runner
            self.loads += 1
            self.load_ms = (time.monotonic() - started) * 1000
            self.memory = mlx_memory()
            with self._cond:
                if reloading:
                    for job in self._queue:
                        job.load_ms = self.load_ms
                self.state, self.message = ModelState.READY, "ok"
            seconds = time.monotonic() - started
            log.info("%s: model ready in %.1f s", self.name, seconds)
            if self.observer is not None:
                self.observer.loaded(seconds)
            return True
        log.error("%s: %s", self.name, self.message)
        return False


def as_client_error(exc: BaseException, name: str) -> BaseException:
    """What the waiting request is told: API errors as they are, anything else a logged 500."""
    if isinstance(exc, ApiError | Cancelled):
        return exc
    log.exception("%s: request failed", name, exc_info=exc)
    return ServerError(f"Internal error while running the model: {type(exc).__name__}: {exc}")
