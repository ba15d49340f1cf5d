"""The chat service's model-thread side: render and check each prompt, then decode.

Up to `chat_parallel` replies run at once; the policy (`run`) interleaves their decode steps,
one step of each in turn, admitting queued requests into the slots that free up. A failure ends
only its own reply. Each reply's events go to its handler: `Started`, then one `Piece` a token.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Generator, Iterator
from typing import Any, Protocol

from engine.chat.gemma_tokens import THINK_CLOSE, THINK_OPEN
from engine.chat.request import ChatRequest
from engine.chat.types import (
    ChatOutcome,
    ChatParams,
    ChatStep,
    Piece,
    PromptTooLongError,
    Started,
)
from engine.config import Config
from engine.errors import InvalidRequest
from engine.modelthread import Inbox, Job, Policy, as_client_error

log = logging.getLogger("mlxd.chat")


class ChatModel(Protocol):
    """What the decode loop needs of a chat runner (engine.chat.runner.ChatRunner; the tests'
    fakes implement the same)."""

    context_length: int
    eos_token_ids: frozenset[int]

    def generation_defaults(self) -> dict: ...

    def prepare(
        self,
        messages: list[dict],
        images: list[Any],
        *,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> Any: ...

    def decode_token(self, token: int) -> str: ...

    def generate(
        self, prompt: Any, params: ChatParams, is_cancelled: Callable[[], bool]
    ) -> Iterator[ChatStep]: ...


MIN_LOGPROB = -9999.0  # what OpenAI reports for tokens a mask made impossible (JSON has no -inf)


def _context_error(n_prompt: int, n_ctx: int) -> InvalidRequest:
    return InvalidRequest(
        f"The prompt has {n_prompt} tokens, more than the model's context of {n_ctx} tokens "
        "leaves room for",
        code="context_length_exceeded",
        extra={"n_prompt_tokens": n_prompt, "n_ctx": n_ctx},
    )


def opens_reasoning(prompt_text: str) -> bool:
    """Whether the rendered prompt leaves a thought channel open for the model to fill."""
    return prompt_text.rfind(THINK_OPEN) > prompt_text.rfind(THINK_CLOSE)


def chat_steps(runner: ChatModel, job: Job) -> Generator[None, None, ChatOutcome]:
    """One reply, a decode step per `next()`: render and check the prompt, then generate."""
    request: ChatRequest = job.payload
    try:
        prompt = runner.prepare(
            request.messages,
            request.images,
            enable_thinking=request.enable_thinking,
            tools=request.tools,
        )
    except PromptTooLongError as exc:
        raise _context_error(exc.n_prompt_tokens, exc.n_ctx) from None
    except ValueError as exc:
        raise InvalidRequest(f"The messages could not be rendered: {exc}") from None
    context = runner.context_length
    if prompt.n_tokens >= context:
        raise _context_error(prompt.n_tokens, context)
    params = _params(runner, request, context - prompt.n_tokens)
    job.emit(Started(prompt.n_tokens, opens_reasoning(prompt.text)))
    return (yield from _decode(runner, job, prompt, params))


def _params(runner: ChatModel, request: ChatRequest, room: int) -> Any:
    sampling = {**runner.generation_defaults(), **request.sampling}
    return ChatParams(
        max_tokens=min(request.max_tokens or room, room),
        temperature=sampling.get("temperature", 1.0),
        top_p=sampling.get("top_p", 1.0),
        top_k=sampling.get("top_k", 0),
        min_p=sampling.get("min_p", 0.0),
        seed=sampling.get("seed"),
        stop=request.stop,
        repetition_penalty=sampling.get("repetition_penalty"),
        presence_penalty=sampling.get("presence_penalty", 0.0),
        frequency_penalty=sampling.get("frequency_penalty", 0.0),
        logprobs=request.logprobs,
        constraint=request.constraint,
    )


def _decode(
    runner: ChatModel, job: Job, prompt: Any, params: Any
) -> Generator[None, None, ChatOutcome]:
    outcome = ChatOutcome(prompt_tokens=prompt.n_tokens)
    started = time.perf_counter()
    first_token_at = None
    try:
        for step in runner.generate(prompt, params, lambda: job.cancelled):
            first_token_at = first_token_at or time.perf_counter()
            _emit_step(runner, job, params, step, outcome)
            yield
    except ValueError as exc:  # e.g. a response format this tokenizer cannot enforce
        raise InvalidRequest(f"Generation failed: {exc}", param="response_format") from None
    if job.cancelled:
        log.info("chat: generation cancelled after %d tokens", outcome.completion_tokens)
    finished = time.perf_counter()
    first_token_at = first_token_at or finished
    outcome.prompt_ms = (first_token_at - started) * 1000
    outcome.predicted_ms = (finished - first_token_at) * 1000
    return outcome


def _emit_step(runner: ChatModel, job: Job, params: Any, step: Any, outcome: ChatOutcome) -> None:
    if step.token is not None:
        outcome.completion_tokens += 1
    if step.finish_reason is not None:
        outcome.finish_reason = step.finish_reason
    entry = None
    hidden = getattr(runner, "eos_token_ids", ())
    if params.logprobs is not None and step.token is not None and step.token not in hidden:
        entry = _logprob_entry(runner, step)
    if step.text or step.token is not None:
        job.emit(Piece(step.text, step.token, entry))


def _logprob_entry(runner: ChatModel, step: Any) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = runner.decode_token(token)
        value = max(float(logprob), MIN_LOGPROB)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    entry = item(step.token, step.logprob if step.logprob is not None else 0.0)
    entry["top_logprobs"] = [item(t, lp) for t, lp in step.top_logprobs]
    return entry


def policy(config: Config) -> Policy:
    """Up to `chat_parallel` replies at once, one decode step of each in turn; requests that
    arrive meanwhile take the slots that free up. A failure ends only its own reply."""

    def run(runner: ChatModel, inbox: Inbox) -> None:
        running: dict[Job, Generator[None, None, ChatOutcome]] = {}
        while inbox.wait(block=not running) or running:
            for job in inbox.take(limit=config.chat_parallel - len(running)):
                running[job] = chat_steps(runner, job)
            for job, steps in list(running.items()):
                if _step(job, steps):
                    del running[job]

    return run


def _step(job: Job, steps: Generator[None, None, ChatOutcome]) -> bool:
    """Advance one reply by a step; True when it has ended (and its job is finished)."""
    try:
        next(steps)
    except StopIteration as done:
        job.finish(done.value)
    except Exception as exc:  # noqa: BLE001 - reported to this reply's request only
        job.finish(error=as_client_error(exc, "chat"))
    else:
        return False
    return True
