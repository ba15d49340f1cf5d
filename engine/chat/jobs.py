"""Running one chat job for any of the chat port's APIs (OpenAI chat and legacy completions,
Anthropic Messages, OpenAI Responses): submit, wait for `Started`, gather the replies, or feed
an SSE stream with keep-alives while the model is busy."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any

from sanic import Request

from engine.chat.request import ChatRequest
from engine.chat.response import KEEPALIVE_S, Reply
from engine.chat.types import ChatOutcome, Piece, Started
from engine.errors import InvalidRequest
from engine.lifecycle import submit
from engine.modelthread import Job


@dataclass
class Running:
    """A submitted chat job whose prompt fits: its `Started` event and the first pieces."""

    chat: ChatRequest
    job: Job
    events: AsyncIterator[list[Any]]
    started: Started
    early: list[Piece]
    replies: list[Reply]


async def start(request: Request, chat: ChatRequest) -> Running:
    """Queue the job and wait for its prompt to be read; errors before generation raise here
    (plain JSON error responses, even for streams)."""
    job = submit(request, chat, stream=True)
    events = job.batches()
    try:
        started, *early = await anext(events)
    except StopAsyncIteration:
        await job.result()  # raises the job's error
        raise InvalidRequest("The request ended before generation started") from None
    replies = [Reply(chat, started, index) for index in range(chat.n)]
    return Running(chat, job, events, started, early, replies)


async def start_all(request: Request, chats: list[ChatRequest]) -> list[Running]:
    """Start several jobs; if one fails before generation, the others are cancelled."""
    runs: list[Running] = []
    try:
        for chat in chats:
            runs.append(await start(request, chat))
    except BaseException:
        for run in runs:
            run.job.cancel()
        raise
    return runs


async def count_tokens(request: Request, chat: ChatRequest) -> int:
    """The prompt's token count (rendered and tokenized on the model thread; nothing decoded)."""
    job = submit(request, replace(chat, count_only=True))
    outcome: ChatOutcome = await job.result()
    return outcome.prompt_tokens


async def pieces(running: Running) -> AsyncIterator[Piece]:
    """Every piece of the job, in order, until it ends."""
    for piece in running.early:
        yield piece
    async for batch in running.events:
        for piece in batch:
            yield piece


async def gather(running: Running) -> ChatOutcome:
    """Every piece into its reply; the outcome once the job is done."""
    replies = running.replies
    async for piece in pieces(running):
        replies[piece.index].add(piece)
    for reply in replies:
        reply.finish()
    return await running.job.result()


class EventStream:
    """A `text/event-stream` response fed by running jobs: `batches(running)` yields the pieces
    that arrived together and sends `keepalive` while none come; leaving the block cancels
    every job it read that is not finished."""

    def __init__(self, request: Request, keepalive: str) -> None:
        self.request, self.keepalive = request, keepalive
        self.response: Any = None
        self.jobs: list[Job] = []
        self.gone = False  # the client left: nothing more to send

    async def __aenter__(self) -> EventStream:
        self.response = await self.request.respond(
            content_type="text/event-stream", headers={"cache-control": "no-cache"}
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        for job in self.jobs:
            if not job.future.done():
                job.cancel()

    async def send(self, frames: str) -> None:
        if frames:  # an empty write would end a chunked response
            await self.response.send(frames)

    async def end(self) -> None:
        await self.response.eof()

    async def batches(self, running: Running) -> AsyncIterator[list[Piece]]:
        self.jobs.append(running.job)
        if running.early:
            yield running.early
        pending = None
        try:
            while True:
                pending = asyncio.ensure_future(anext(running.events, None))
                while not (await asyncio.wait({pending}, timeout=KEEPALIVE_S))[0]:
                    await self.response.send(self.keepalive)
                pieces = pending.result()
                self.gone = self._client_gone()
                if pieces is None or self.gone:
                    return
                yield pieces
        finally:
            if pending is not None and not pending.done():
                pending.cancel()

    def _client_gone(self) -> bool:
        transport = self.request.transport
        return transport is None or transport.is_closing()
