"""The embeddings policy: requests batched together, split back, none starved."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from engine.config import Config
from engine.embeddings import decode
from engine.embeddings.decode import embed_batch
from engine.embeddings.request import EmbedRequest
from engine.errors import InvalidRequest
from engine.modelthread import Cancelled, Job, ModelThread
from tests.engine.fakes import FakeEmbeddings


class LongFake(FakeEmbeddings):
    max_tokens = 512

    def __init__(self) -> None:
        super().__init__()
        self.rounds: list[list[int]] = []

    def embed(self, token_lists):
        self.rounds.append([len(t) for t in token_lists])
        return super().embed(token_lists)


def make_jobs(loop, requests: list[EmbedRequest]) -> list[Job]:
    return [Job(r, loop, loop.create_future()) for r in requests]


async def settle(jobs: list[Job]) -> list:
    await asyncio.sleep(0)
    return await asyncio.gather(*(j.future for j in jobs), return_exceptions=True)


def run(runner, first: list[EmbedRequest], later: list[EmbedRequest] = (), budget=64):
    loop = asyncio.new_event_loop()
    jobs = make_jobs(loop, first)
    extra = make_jobs(loop, list(later))
    handed = []

    def take_more(in_flight: int) -> list[Job]:
        if extra and not handed:
            handed.extend(extra)
            return list(extra)
        return []

    embed_batch(runner, jobs, take_more, budget)
    results = loop.run_until_complete(settle(jobs + extra))
    loop.close()
    return results


def texts(*items: str) -> EmbedRequest:
    return EmbedRequest(list(items), None, False)


def test_results_are_split_back_in_order_and_equal_single_runs() -> None:
    runner = LongFake()
    requests = [texts("alpha", "beta"), texts("gamma"), texts("delta", "epsilon", "zeta")]
    results = run(runner, requests, budget=1000)
    assert len(runner.rounds) == 1  # one forward pass for all three requests
    for request, result in zip(requests, results, strict=True):
        alone = runner.embed(runner.tokenize(request.texts))
        assert np.array_equal(result.vectors, alone)
        assert result.token_counts == [len(t) + 2 for t in request.texts]


def test_a_large_request_does_not_starve_small_ones_that_arrive_later() -> None:
    runner = LongFake()
    large = texts(*["x" * 30] * 20)  # 20 sequences of 32 tokens; budget 64 => 10 rounds alone
    small = texts("hi")
    results = run(runner, [large], later=[small], budget=64)
    assert all(not isinstance(r, Exception) for r in results)
    small_round = next(i for i, r in enumerate(runner.rounds) if 4 in r)
    assert small_round <= 1, runner.rounds  # admitted right after the first round


def test_bad_request_fails_alone() -> None:
    runner = LongFake()
    results = run(runner, [texts("ok"), texts("y" * 600), texts("fine")], budget=1000)
    assert isinstance(results[1], InvalidRequest) and results[1].param == "input[0]"
    assert "input[0] has 602 tokens" in results[1].message
    assert results[0].vectors.shape == (1, 8) and results[2].vectors.shape == (1, 8)


def test_cancelled_request_is_dropped() -> None:
    runner = LongFake()
    loop = asyncio.new_event_loop()
    jobs = make_jobs(loop, [texts(*["a" * 30] * 10), texts("b")])
    jobs[0].cancel()
    embed_batch(runner, jobs, lambda n: [], 64)
    results = loop.run_until_complete(settle(jobs))
    loop.close()
    assert isinstance(results[0], Cancelled)
    assert results[1].vectors.shape == (1, 8)


class CancellingFake(LongFake):
    """Tokenizes as the fake does, recording the texts; cancels `victim` after the first round."""

    def __init__(self) -> None:
        super().__init__()
        self.tokenized: list[str] = []
        self.victim: Job | None = None

    def tokenize(self, texts):
        self.tokenized += texts
        return super().tokenize(texts)

    def embed(self, token_lists):
        if self.victim is not None and self.rounds:
            self.victim.cancel()
        return super().embed(token_lists)


def test_a_request_whose_client_left_is_never_tokenized() -> None:
    runner = CancellingFake()
    loop = asyncio.new_event_loop()
    jobs = make_jobs(loop, [texts("gone"), texts("kept")])
    later = make_jobs(loop, [texts("late and gone")])
    jobs[0].cancel()
    later[0].cancel()
    embed_batch(runner, jobs, lambda n: later if not runner.tokenized[1:] else [], 64)
    results = loop.run_until_complete(settle(jobs + later))
    loop.close()
    assert runner.tokenized == ["kept"]
    assert isinstance(results[0], Cancelled) and isinstance(results[2], Cancelled)
    assert results[1].vectors.shape == (1, 8)


def test_a_request_abandoned_mid_batch_leaves_at_the_next_round() -> None:
    runner = CancellingFake()
    loop = asyncio.new_event_loop()
    jobs = make_jobs(loop, [texts(*["a" * 30] * 20), texts("b")])
    runner.victim = jobs[0]
    embed_batch(runner, jobs, lambda n: [], 64)
    results = loop.run_until_complete(settle(jobs))
    loop.close()
    assert isinstance(results[0], Cancelled)
    assert results[1].vectors.shape == (1, 8)
    embedded = sum(len(r) for r in runner.rounds)
    assert embedded < 21 and len(runner.rounds) <= 2  # 2 rounds at most, not the 20 inputs


@pytest.mark.parametrize("budget", [1, 10, 1000])
def test_every_budget_makes_progress(budget: int) -> None:
    results = run(LongFake(), [texts("abc", "de"), texts("f")], budget=budget)
    assert [r.vectors.shape[0] for r in results] == [2, 1]


class SlowFake(FakeEmbeddings):
    def embed(self, token_lists):
        time.sleep(0.002)
        return super().embed(token_lists)


def test_a_batch_that_keeps_admitting_work_does_not_fill_the_queue() -> None:
    """Answered requests leave the running batch: clients that each keep one request in flight
    never see queue_full, however long the batch goes on admitting their next requests."""
    config = Config(queue_size=4)
    worker = ModelThread("embeddings", SlowFake, decode.policy(config), queue_size=4)

    async def client(name: str) -> int:
        for i in range(40):
            job = worker.submit(texts(f"{name} {i}"))
            assert (await job.result()).vectors.shape == (1, 8)
        return 40

    async def main() -> list[int]:
        worker.start()
        while worker.runner is None:
            await asyncio.sleep(0.001)
        return await asyncio.gather(*(client(str(c)) for c in range(3)))

    try:
        assert asyncio.run(main()) == [40, 40, 40]
        assert worker.pending == 0
    finally:
        worker.stop(5)
