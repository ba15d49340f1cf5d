"""The speech service's model-thread side: transcriptions take turns, window by window.

Each transcription runs in its own greenlet on the model thread (one OS thread still touches
MLX). Before every window its `on_window` hook checks cancellation and the time limit, then
hands the turn back; the policy gives the next turn to the next job in a round robin, taking
newly queued jobs in behind the one that just ran. A short request therefore answers after
one window of each running job, a long one finishes however many arrive, and each job's time
limit counts only the model time of its own turns. A request whose windows are independent
(`batched`) is decoded in batches (engine.speech.batched): one round of its batch per turn.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np
from greenlet import greenlet

from engine.config import Config
from engine.errors import status_error
from engine.modelthread import Cancelled, Inbox, Job, Policy, as_client_error
from engine.speech.request import MIN_TIME_LIMIT_S, Options, SttJob

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

    def transcribe_pieces(
        self,
        pieces: list[tuple[np.ndarray, int]],
        *,
        batch: int,
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
    """Runs between windows: stops a cancelled or over-time job, then yields the turn.
    `used` is the job's own model time so far; `pause` hands the turn to the other jobs."""

    def __init__(
        self, job: Job, limit_s: float | None, used: Callable[[], float], pause: Callable[[], None]
    ) -> None:
        self.job = job
        self.limit_s = limit_s
        self.used = used
        self.pause = pause
        self.started = False

    def tick(self) -> None:
        """Before each window: the first one runs in the job's first turn."""
        self.job.check()
        if self.limit_s and self.used() > self.limit_s:
            raise status_error(
                504,
                f"Transcription exceeded its time limit of {self.limit_s:.0f} s of model time "
                f"(--stt-time-limit-factor seconds per audio second, at least "
                f"{MIN_TIME_LIMIT_S:.0f} s): raise the factor, or set it to 0 for no limit",
                "time_limit_exceeded",
            )
        if self.started:
            self.pause()
            self.job.check()
        self.started = True


class _Turns:
    """One job's transcription as a greenlet the policy resumes for one window at a time."""

    def __init__(self, runner: SpeechModel, job: Job) -> None:
        self.job = job
        self.model_s = 0.0  # the model time of this job's finished turns
        self.resumed = 0.0
        self._green = greenlet(lambda: _finish(runner, job, self.clock()))

    def clock(self) -> _Deadline:
        request: SttJob = self.job.payload
        return _Deadline(self.job, request.time_limit_s, self.used, self._pause)

    def used(self) -> float:
        return self.model_s + time.monotonic() - self.resumed

    def _pause(self) -> None:
        self._green.parent.switch()

    def step(self) -> bool:
        """Run until the job's next window boundary; False once it has finished."""
        self.resumed = time.monotonic()
        try:
            self._green.switch()
        finally:
            self.model_s += time.monotonic() - self.resumed
        return not self._green.dead


def transcribe_job(runner: SpeechModel, job: Job, clock: _Deadline) -> dict:
    try:
        return _run(runner, job.payload, clock)
    except Cancelled:
        log.info("stt: transcription cancelled after %.1f s (client gone)", clock.used())
        raise


def _run(runner: SpeechModel, request: SttJob, clock: _Deadline) -> dict:
    options = request.options
    if options.detect_only:
        probs = runner.detect_language(request.audio, on_window=clock.tick)
        best = max(probs, key=probs.get)
        return {"text": "", "segments": [], "language": best, "language_probs": probs}
    if options.vad is not None and request.vad_dir is not None:
        if batched(request):
            return _speech_pieces(runner, request, clock)
        from engine.speech.vad import transcribe_speech  # MLX: on the model thread only

        return transcribe_speech(
            request.vad_dir,
            request.audio,
            options.vad,
            lambda audio: _whisper(runner, audio, options, clock),
            options.language,
        )
    if batched(request):
        return _pieces(runner, [(request.audio, 0)], request, clock)
    return _whisper(runner, request.audio, options, clock)


def batched(request: SttJob) -> bool:
    """Whether the request's windows are independent, so decoded in batches: it does not
    condition on previous text (max_context 0), or VAD cut it into speech spans; greedy only."""
    options = request.options
    vad = options.vad is not None and request.vad_dir is not None
    independent = vad or not options.condition_on_previous_text
    return independent and request.batch > 1 and options.beam_size <= 1


def _speech_pieces(runner: SpeechModel, request: SttJob, clock: _Deadline) -> dict:
    """The speech spans, joined as whisper-server joins them and cut at span starts into
    pieces of up to MAX_PIECE_S, decoded in batches; times mapped back to the upload."""
    from engine.speech.batched import MAX_PIECE_S  # MLX: on the model thread only
    from engine.speech.vad import speech_splice

    assert request.vad_dir is not None and request.options.vad is not None
    splice = speech_splice(request.vad_dir, request.audio, request.options.vad)
    if splice is None:
        return {"text": "", "segments": [], "language": request.options.language or "en"}
    return splice.remap(_pieces(runner, splice.pieces(MAX_PIECE_S), request, clock))


def _pieces(
    runner: SpeechModel, pieces: list[tuple[np.ndarray, int]], request: SttJob, clock: _Deadline
) -> dict:
    return runner.transcribe_pieces(
        pieces, batch=request.batch, **_decode_options(request.options, clock)
    )


def _whisper(runner: SpeechModel, audio: np.ndarray, options: Options, clock: _Deadline) -> dict:
    extra = {"beam_size": options.beam_size} if options.beam_size > 1 else {}
    return runner.transcribe(
        audio,
        condition_on_previous_text=options.condition_on_previous_text,
        **_decode_options(options, clock),
        **extra,
    )


def _decode_options(options: Options, clock: _Deadline) -> dict[str, Any]:
    """What both paths take: the language, task, prompt and outputs, the fallback ladder and
    its checks, and the hook between windows."""
    extra: dict[str, Any] = {}
    if options.best_of is not None:
        extra["best_of"] = options.best_of
    if options.no_timestamps:
        extra["without_timestamps"] = True
    return extra | {
        "language": options.language,
        "task": options.task,
        "temperature": options.temperatures,
        "initial_prompt": options.prompt,
        "word_timestamps": options.word_timestamps,
        "language_probs": options.language_probs,
        "on_window": clock.tick,
        "entropy_threshold": options.entropy_threshold,
        "compression_ratio_threshold": options.compression_ratio_threshold,
        "logprob_threshold": options.logprob_threshold,
        "no_speech_threshold": options.no_speech_threshold,
    }


def policy(config: Config) -> Policy:
    """Round robin over the running transcriptions, one window per turn; jobs queued meanwhile
    join behind the job that just ran. Runs until every started job has finished."""

    def run(runner: SpeechModel, inbox: Inbox) -> None:
        ring: deque[_Turns] = deque()
        while ring or inbox.wait():
            ring.extend(_Turns(runner, job) for job in inbox.take())
            if not ring:
                continue
            turn = ring.popleft()
            running = turn.step()
            ring.extend(_Turns(runner, job) for job in inbox.take())
            if running:
                ring.append(turn)

    return run


def _finish(runner: SpeechModel, job: Job, clock: _Deadline) -> None:
    try:
        job.finish(transcribe_job(runner, job, clock))
    except BaseException as exc:  # noqa: BLE001 - reported to that job's request only
        job.finish(error=as_client_error(exc, "stt"))
