"""The speech service's model-thread side: one transcription at a time, window by window.

Between windows a job checks its cancellation and time limit, then lets the jobs queued since
run to the end (nested, one level deep) so a short request is not stuck behind a long one;
their time does not count against the running job's limit.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from engine.config import Config
from engine.errors import status_error
from engine.modelthread import Cancelled, Inbox, Job, Policy, as_client_error
from engine.speech.request import MIN_TIME_LIMIT_S, SttJob

log = logging.getLogger("mlxd.stt")


class SpeechModel(Protocol):
    """What a transcription job needs of a speech runner (engine.speech.runner; the tests'
    fakes implement the same)."""

    def detect_language(
        self, audio: np.ndarray, *, on_window: Callable[[], None] = ...
    ) -> dict[str, float]: ...

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        task: str = "transcribe",
        temperature: float | tuple[float, ...] = ...,
        initial_prompt: str | None = None,
        word_timestamps: bool = False,
        language_probs: bool = False,
        on_window: Callable[[], None] = ...,
        **decode_options: Any,
    ) -> dict: ...


class _Deadline:
    """Runs between windows: stops a cancelled or over-time job, then lets queued jobs run
    (their time does not count against this job)."""

    def __init__(self, job: Job, limit_s: float | None, others: Callable[[], float]) -> None:
        self.job = job
        self.others = others
        self.limit_s = limit_s
        self.started = time.monotonic()
        self.deadline = self.started + limit_s if limit_s else math.inf

    def tick(self) -> None:
        self.job.check()
        if time.monotonic() > self.deadline:
            raise status_error(
                504,
                f"Transcription exceeded its time limit of {self.limit_s:.0f} s of model time "
                f"(--stt-time-limit-factor seconds per audio second, at least "
                f"{MIN_TIME_LIMIT_S:.0f} s): raise the factor, or set it to 0 for no limit",
                "time_limit_exceeded",
            )
        self.deadline += self.others()
        self.job.check()


def transcribe_job(runner: SpeechModel, job: Job, others: Callable[[], float]) -> dict:
    request: SttJob = job.payload
    clock = _Deadline(job, request.time_limit_s, others)
    try:
        return _run(runner, request, clock)
    except Cancelled:
        elapsed = time.monotonic() - clock.started
        log.info("stt: transcription cancelled after %.1f s (client gone)", elapsed)
        raise


def _run(runner: SpeechModel, request: SttJob, clock: _Deadline) -> dict:
    options = request.options
    if options.detect_only:
        probs = runner.detect_language(request.audio, on_window=clock.tick)
        best = max(probs, key=probs.get)
        return {"text": "", "segments": [], "language": best, "language_probs": probs}
    extra: dict[str, Any] = {}
    if options.best_of is not None:
        extra["best_of"] = options.best_of
    if options.no_timestamps:
        extra["without_timestamps"] = True
    return runner.transcribe(
        request.audio,
        language=options.language,
        task=options.task,
        temperature=options.temperatures,
        initial_prompt=options.prompt,
        word_timestamps=options.word_timestamps,
        language_probs=options.language_probs,
        on_window=clock.tick,
        compression_ratio_threshold=options.compression_ratio_threshold,
        logprob_threshold=options.logprob_threshold,
        no_speech_threshold=options.no_speech_threshold,
        condition_on_previous_text=options.condition_on_previous_text,
        **extra,
    )


def policy(config: Config) -> Policy:
    """One job at a time; between its windows, the jobs queued meanwhile run nested."""

    def run(runner: SpeechModel, inbox: Inbox) -> None:
        def others() -> float:
            started = time.monotonic()
            for job in inbox.take():
                _finish(runner, job, lambda: 0.0)
            return time.monotonic() - started

        while inbox.wait():
            for job in inbox.take(limit=1):
                _finish(runner, job, others)

    return run


def _finish(runner: SpeechModel, job: Job, others: Callable[[], float]) -> None:
    try:
        job.finish(transcribe_job(runner, job, others))
    except BaseException as exc:  # noqa: BLE001 - reported to that job's request only
        job.finish(error=as_client_error(exc, "stt"))
