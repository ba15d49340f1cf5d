"""The chat service's model-thread side: continuous batching of every reply.

The policy (`policy`) renders and checks each queued request's prompt, reserves its KV token
positions under the budget (`--chat-kv-tokens`), and adds it to the runner's batch: one forward
pass per step decodes a token of every running reply (each keeping its own sampling, penalties,
constraint, stop strings and random stream) while new prompts are read in chunks beside them.
Requests join and leave between steps; `n` choices read the prompt once and decode as rows of
their own. A request that does not fit the KV budget now waits in order; one that could never
fit is a 400 naming both numbers. A client that leaves frees its rows and KV at the next step.
Each reply's events go to its handler: `Started`, then one `Piece` a token (with its choice).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from engine.chat.gemma_tokens import THINK_CLOSE, THINK_OPEN
from engine.chat.request import ChatRequest, check_prompt_chars, prompt_chars
from engine.chat.types import (
    ChatOutcome,
    ChatParams,
    Piece,
    PromptTooLongError,
    RowFailed,
    RowStep,
    Started,
)
from engine.config import Config
from engine.errors import InvalidRequest, Unavailable
from engine.modelthread import Cancelled, Inbox, Job, Outbox, Policy, as_client_error

log = logging.getLogger("mlxd.chat")

MIN_LOGPROB = -9999.0  # what OpenAI reports for tokens a mask made impossible (JSON has no -inf)
RESERVE_STEP = 256  # KV positions a reply without max_tokens reserves at a time, per choice


class ChatBatch(Protocol):
    """Replies decoded together (engine.chat.runner.ChatBatch; the tests' fake the same)."""

    active: int  # rows decoding
    kv_tokens: int  # KV token positions held

    def add(self, rid: Hashable, prompt: Any, params: ChatParams, n: int = 1) -> None: ...

    def remove(self, rid: Hashable, index: int | None = None) -> None: ...

    def step(self) -> list[RowStep]: ...


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
        audio: Sequence[Any] = (),
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> Any: ...

    def prepare_raw(self, text: str) -> Any: ...

    def decode_token(self, token: int) -> str: ...

    def open_batch(self, *, max_batch: int, prefill_chunk: int, cache_bytes: int) -> ChatBatch: ...

    def default_kv_tokens(self) -> int: ...


@dataclass(eq=False)
class _Reply:
    """One request in the batch: its choices, its KV reservation and what it has produced."""

    rid: int
    job: Job
    params: ChatParams
    prompt: Any
    n: int
    reserved: int  # KV positions per choice: prompt + the new tokens reserved so far
    limit_set: bool  # the client set max_tokens: the reservation never grows
    outcome: ChatOutcome
    produced: list[int] = field(default_factory=list)  # tokens per choice
    open: set[int] = field(default_factory=set)  # choices still decoding
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None

    @property
    def need(self) -> int:
        return self.n * self.reserved


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


def _params(runner: ChatModel, request: ChatRequest, room: int) -> ChatParams:
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


class Scheduler:
    """Continuous batching on the model thread: admission under the row and KV budgets, one
    batched step at a time, and each row's tokens routed to its request."""

    def __init__(self, runner: ChatModel, config: Config) -> None:
        self.runner, self.config = runner, config
        self.batch = runner.open_batch(
            max_batch=config.chat_batch,
            prefill_chunk=config.chat_prefill_chunk,
            cache_bytes=config.chat_cache_bytes,
        )
        self.budget = config.chat_kv_tokens or runner.default_kv_tokens()
        self.replies: dict[int, _Reply] = {}
        self.waiting: deque[_Reply] = deque()  # prepared, waiting for KV room, in order
        self.outbox = Outbox()  # a step's tokens reach the event loop in one wake-up
        self._ids = 0

    @property
    def busy(self) -> bool:
        return bool(self.replies or self.waiting)

    @property
    def reserved(self) -> int:
        return sum(reply.need for reply in self.replies.values())

    @property
    def rows(self) -> int:
        return sum(reply.n for reply in [*self.replies.values(), *self.waiting])

    # ---- admission ---------------------------------------------------------------------

    def admit(self, inbox: Inbox, *, accepting: bool) -> None:
        while self.waiting and self.waiting[0].need <= self.budget - self.reserved:
            self._start(self.waiting.popleft())
        if not accepting:
            return
        room = self.config.chat_batch - self.rows

        def fits(taken: list[Job], job: Job) -> bool:
            return sum(j.payload.n for j in taken) + job.payload.n <= room

        for job in inbox.take(fits):
            reply = self._prepare(job)
            if reply is None:
                continue
            if reply.need > self.budget:
                job.finish(error=self._never_fits(reply))
            elif not self.waiting and reply.need <= self.budget - self.reserved:
                self._start(reply)
            else:
                self.waiting.append(reply)

    def _prepare(self, job: Job) -> _Reply | None:
        """Render and tokenize the prompt; a client error finishes the job and returns None."""
        request: ChatRequest = job.payload
        try:
            prompt = self._prompt(request)
        except InvalidRequest as exc:
            job.finish(error=exc)
            return None
        if request.count_only:
            job.finish(ChatOutcome(finish_reasons=[], prompt_tokens=prompt.n_tokens))
            return None
        room = self.runner.context_length - prompt.n_tokens
        params = _params(self.runner, request, room)
        limit_set = request.max_tokens is not None
        new = params.max_tokens if limit_set else min(room, RESERVE_STEP)
        self._ids += 1
        return _Reply(
            self._ids,
            job,
            params,
            prompt,
            request.n,
            prompt.n_tokens + new,
            limit_set,
            ChatOutcome(
                finish_reasons=["stop"] * request.n,
                prompt_tokens=prompt.n_tokens,
            ),
            produced=[0] * request.n,
            open=set(range(request.n)),
        )

    def _prompt(self, request: ChatRequest) -> Any:
        check_prompt_chars(prompt_chars(request), self.runner)  # before tokenizing it
        try:
            if request.prompt is not None:
                return self.runner.prepare_raw(request.prompt)
            prompt = self.runner.prepare(
                request.messages,
                request.images,
                audio=request.audio,
                enable_thinking=request.enable_thinking,
                tools=request.tools,
            )
        except PromptTooLongError as exc:
            raise _context_error(exc.n_prompt_tokens, exc.n_ctx) from None
        except ValueError as exc:
            raise InvalidRequest(f"The messages could not be rendered: {exc}") from None
        if prompt.n_tokens >= self.runner.context_length:
            raise _context_error(prompt.n_tokens, self.runner.context_length)
        return prompt

    def _never_fits(self, reply: _Reply) -> InvalidRequest:
        return InvalidRequest(
            f"The request needs {reply.need} KV token positions ({reply.n} x "
            f"({reply.prompt.n_tokens} prompt + {reply.reserved - reply.prompt.n_tokens} new)), "
            f"more than this server's KV budget of {self.budget} (--chat-kv-tokens): lower "
            "max_tokens or n, or shorten the prompt",
            param="max_tokens",
            code="kv_budget_exceeded",
            extra={"n_kv_tokens": reply.need, "kv_budget": self.budget},
        )

    def _start(self, reply: _Reply) -> None:
        try:
            self.batch.add(reply.rid, reply.prompt, reply.params, reply.n)
        except ValueError as exc:  # e.g. a response format this tokenizer cannot enforce
            error = InvalidRequest(f"Generation failed: {exc}", param="response_format")
            reply.job.finish(error=error)
            return
        self.replies[reply.rid] = reply
        started = Started(reply.prompt.n_tokens, opens_reasoning(reply.prompt.text))
        reply.job.emit(started)

    # ---- running -----------------------------------------------------------------------

    def drop_cancelled(self, *, stopping: bool) -> None:
        """Replies whose client left (or that shutdown cancelled) leave the batch now; a running
        one ends with finish_reason "cancelled", a waiting one is refused."""
        for reply in [*self.replies.values()]:
            if reply.job.cancelled:
                self.batch.remove(reply.rid)
                log.info(
                    "chat: generation cancelled after %d tokens", reply.outcome.completion_tokens
                )
                for index in reply.open:
                    reply.outcome.finish_reasons[index] = "cancelled"
                self._finish(reply, time.perf_counter())
        for reply in [r for r in self.waiting if r.job.cancelled]:
            self.waiting.remove(reply)
            error = Unavailable("Server is shutting down", code="shutting_down")
            reply.job.finish(error=error if stopping else Cancelled())

    def step(self) -> None:
        if not self.replies:
            return
        try:
            rows = self.batch.step()
        except RowFailed as failed:
            log.error("chat: a reply failed", exc_info=failed.__cause__)
            if (reply := self.replies.get(failed.rid)) is not None:
                self._fail(reply, as_client_error(failed.__cause__ or failed, "chat"))
            return
        now = time.perf_counter()
        for row in rows:
            if (reply := self.replies.get(row.rid)) is not None:
                self._advance(reply, row, now)
        self.outbox.flush()

    def _advance(self, reply: _Reply, row: RowStep, now: float) -> None:
        step = row.step
        reply.first_token_at = reply.first_token_at or now
        if row.cached_tokens is not None:
            reply.outcome.cached_tokens = row.cached_tokens
        if step.token is not None:
            reply.outcome.completion_tokens += 1
            reply.produced[row.index] += 1
        entry = None
        if self._shows_logprob(reply, step):
            entry = _logprob_entry(self.runner, step)
        if step.text or step.token is not None:
            self.outbox.emit(reply.job, Piece(step.text, step.token, entry, row.index))
        if step.finish_reason is None:
            self._extend(reply, row.index)
            return
        reply.outcome.finish_reasons[row.index] = step.finish_reason
        if step.stop_sequence is not None:
            reply.outcome.stop_sequences[row.index] = step.stop_sequence
        reply.open.discard(row.index)
        if not reply.open:
            self._finish(reply, now)

    def _shows_logprob(self, reply: _Reply, step: Any) -> bool:
        hidden = self.runner.eos_token_ids
        return reply.params.logprobs is not None and step.token not in (None, *hidden)

    def _extend(self, reply: _Reply, index: int) -> None:
        """A reply without max_tokens reserves KV as it goes; with no room left, its choice
        ends with finish_reason "length"."""
        if reply.limit_set or reply.prompt.n_tokens + reply.produced[index] < reply.reserved:
            return
        room = self.runner.context_length - reply.reserved
        grow = min(RESERVE_STEP, room)
        if grow > 0 and reply.n * grow <= self.budget - self.reserved:
            reply.reserved += grow
            return
        self.batch.remove(reply.rid, index)
        reply.outcome.finish_reasons[index] = "length"
        reply.open.discard(index)
        if not reply.open:
            self._finish(reply, time.perf_counter())

    def _finish(self, reply: _Reply, now: float) -> None:
        self.outbox.flush()  # its last tokens before its end
        self.replies.pop(reply.rid, None)
        first = reply.first_token_at or now
        reply.outcome.prompt_ms = (first - reply.started) * 1000
        reply.outcome.predicted_ms = (now - first) * 1000
        reply.job.finish(reply.outcome)

    def _fail(self, reply: _Reply, error: BaseException) -> None:
        """Take a running reply out (rows and KV freed now) and fail its job."""
        self.outbox.flush()
        self.replies.pop(reply.rid, None)
        self.batch.remove(reply.rid)
        reply.job.finish(error=error)


def _logprob_entry(runner: ChatModel, step: Any) -> dict[str, Any]:
    def item(token: int, logprob: float) -> dict[str, Any]:
        text = runner.decode_token(token)
        value = max(float(logprob), MIN_LOGPROB)
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}

    entry = item(step.token, step.logprob if step.logprob is not None else 0.0)
    entry["top_logprobs"] = [item(t, lp) for t, lp in step.top_logprobs]
    return entry


def policy(config: Config) -> Policy:
    """Continuous batching: up to `chat_batch` rows decode together, one step at a time."""

    def run(runner: ChatModel, inbox: Inbox) -> None:
        scheduler = Scheduler(runner, config)
        while (accepting := inbox.wait(block=not scheduler.busy)) or scheduler.busy:
            scheduler.drop_cancelled(stopping=not accepting)
            scheduler.admit(inbox, accepting=accepting)
            scheduler.step()

    return run
