"""The embeddings service's model-thread side: token-budgeted batches across requests.

The policy takes every queued request that fits one batch, tokenizes their texts in one call,
then embeds round by round under a token budget per forward pass; a request finishes as soon as
its vectors are done, and requests that arrive meanwhile join the running batch.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from engine.config import Config
from engine.embeddings.request import EmbedRequest, EmbedResult
from engine.errors import InvalidRequest
from engine.modelthread import Cancelled, Inbox, Job, Policy


class EmbeddingsModel(Protocol):
    """What the batching policy needs of an embeddings runner (engine.embeddings.runner; the
    tests' fakes implement the same)."""

    hidden_size: int
    max_tokens: int

    def vocab_size(self) -> int: ...

    def tokenize(self, texts: list[str]) -> list[list[int]]: ...

    def embed(self, token_lists: list[list[int]]) -> np.ndarray: ...


def _checked(
    runner: EmbeddingsModel, request: EmbedRequest, lists: list[list[int]]
) -> tuple[list[list[int]], list[int]]:
    """One request's token lists, checked against the vocabulary and the model's limit."""
    vocab, limit = runner.vocab_size(), runner.max_tokens
    truncated = []
    for index, tokens in enumerate(lists):
        bad = [t for t in tokens if not 0 <= t < vocab]
        if bad:
            raise InvalidRequest(
                f"input[{index}] has token id {bad[0]} outside the vocabulary (0..{vocab - 1})",
                param=f"input[{index}]",
            )
        if len(tokens) > limit:
            if not request.truncate:
                raise InvalidRequest(
                    f"input[{index}] has {len(tokens)} tokens, over the model's limit of {limit}; "
                    'shorten it or send "truncate": true',
                    param=f"input[{index}]",
                    code="context_length_exceeded",
                )
            truncated.append(index)
    if truncated:
        lists = [_truncate(t, limit, keep_last=request.texts is not None) for t in lists]
    return lists, truncated


def _truncate(tokens: list[int], limit: int, keep_last: bool) -> list[int]:
    if len(tokens) <= limit:
        return tokens
    return tokens[: limit - 1] + tokens[-1:] if keep_last else tokens[:limit]


@dataclass
class _Work:
    """One request being embedded: its sequences, and the vectors done so far."""

    job: Job
    sequences: list[list[int]]
    truncated: list[int]
    vectors: np.ndarray
    next: int = 0

    @property
    def remaining_tokens(self) -> int:
        return sum(len(s) for s in self.sequences[self.next :])


def _start(runner: EmbeddingsModel, jobs: list[Job]) -> list[_Work]:
    """Tokenize the texts of all `jobs` in one call, then check each request on its own. A
    request whose client has left meanwhile is dropped before its texts are tokenized."""
    jobs = _drop_cancelled(jobs)
    texts = [text for job in jobs for text in job.payload.texts or []]
    tokenized = iter(runner.tokenize(texts) if texts else [])
    work = []
    for job in jobs:
        request: EmbedRequest = job.payload
        if request.texts is not None:
            lists = [next(tokenized) for _ in request.texts]
        else:
            lists = request.token_lists or []
        try:
            sequences, truncated = _checked(runner, request, lists)
        except InvalidRequest as exc:
            job.finish(error=exc)
            continue
        vectors = np.empty((len(sequences), runner.hidden_size), dtype=np.float32)
        work.append(_Work(job, sequences, truncated, vectors))
    return work


def _next_round(work: list[_Work], budget: int) -> list[tuple[_Work, int]]:
    """Sequences for one forward pass: the oldest request's next one (so nothing starves), then
    the requests with the least left first, until the token budget is spent."""
    picked = [(work[0], work[0].next)]
    spent = len(work[0].sequences[work[0].next])
    cursor = {id(work[0]): work[0].next + 1}
    for item in sorted(work, key=lambda w: w.remaining_tokens):
        index = cursor.get(id(item), item.next)
        while index < len(item.sequences) and spent + len(item.sequences[index]) <= budget:
            picked.append((item, index))
            spent += len(item.sequences[index])
            index += 1
        cursor[id(item)] = index
    return picked


def embed_batch(
    runner: EmbeddingsModel, jobs: list[Job], take_more: Callable[[int], list[Job]], budget: int
) -> None:
    """Embed requests together, round by round; finish each as soon as its vectors are done and
    admit requests that arrive meanwhile, so a large request cannot starve small ones."""
    work = _start(runner, jobs)
    while work:
        picked = _next_round(work, budget)
        vectors = runner.embed([item.sequences[index] for item, index in picked])
        for (item, index), vector in zip(picked, vectors, strict=True):
            item.vectors[index] = vector
            item.next = max(item.next, index + 1)
        work = _settle(work)
        work += _start(runner, take_more(sum(len(w.sequences) for w in work)))


def _drop_cancelled(jobs: list[Job]) -> list[Job]:
    kept = []
    for job in jobs:
        if job.cancelled:
            job.finish(error=Cancelled())
        else:
            kept.append(job)
    return kept


def _settle(work: list[_Work]) -> list[_Work]:
    left = []
    for item in work:
        if item.job.cancelled:
            item.job.finish(error=Cancelled())
        elif item.next == len(item.sequences):
            lengths = [len(s) for s in item.sequences]
            item.job.finish(EmbedResult(item.vectors, lengths, item.truncated))
        else:
            left.append(item)
    return left


def policy(config: Config) -> Policy:
    """Batch every queued request that fits `embeddings_max_inputs` in flight (or, with
    batching off, one request per forward pass, for comparison)."""
    limit, budget = config.embeddings_max_inputs, config.embeddings_batch_tokens

    def run(runner: EmbeddingsModel, inbox: Inbox) -> None:
        def more(in_flight: int) -> list[Job]:
            if not config.embeddings_batching:
                return []

            def fits(taken: list[Job], job: Job) -> bool:
                queued = sum(j.payload.count for j in taken)
                return in_flight + queued + job.payload.count <= limit

            return inbox.take(fits)

        while inbox.wait():
            jobs = more(0) if config.embeddings_batching else inbox.take(limit=1)
            embed_batch(runner, jobs, more, budget)

    return run
