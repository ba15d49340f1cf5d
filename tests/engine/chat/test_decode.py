"""Chat slots: up to --chat-parallel replies generated at once, their decode steps interleaved
on the one model thread, with the real model thread and a scripted runner."""

from __future__ import annotations

import asyncio
import time

import pytest

from engine.chat import decode
from engine.chat.request import ChatRequest
from engine.config import Config
from engine.errors import InvalidRequest, ServerError
from engine.modelthread import ModelThread
from tests.engine.fakes import FakeChat


def request(text: str, max_tokens: int) -> ChatRequest:
    messages = [{"role": "user", "content": text}]
    return ChatRequest(messages, [], {}, max_tokens, (), None, None)


class RecordingChat(FakeChat):
    """FakeChat that logs (prompt, token index) for every decode step, in the order run."""

    def __init__(self) -> None:
        super().__init__()
        self.steps: list[tuple[str, int]] = []

    def prepare(self, messages, images, *, audio=(), enable_thinking=None, tools=None):
        if messages[0]["content"] == "too long":
            raise InvalidRequest("prompt too long", param="messages")
        return super().prepare(
            messages, images, audio=audio, enable_thinking=enable_thinking, tools=tools
        )

    def generate(self, prompt, params, is_cancelled):
        for index, step in enumerate(super().generate(prompt, params, is_cancelled)):
            time.sleep(0.002)  # a decode step takes time
            if prompt.text == "crash" and index == 2:
                raise RuntimeError("out of memory")
            self.steps.append((prompt.text, index))
            yield step


def run(parallel: int, plan: list[tuple[float, ChatRequest]]) -> tuple:
    """Submit each request after its delay; return the runner, the outcome (or error) of each
    request, and the order in which the requests finished."""
    runner = RecordingChat()
    config = Config(chat_batch=parallel)
    worker = ModelThread("chat", lambda: runner, decode.policy(config), queue_size=8)
    finished: list[str] = []

    async def one(delay: float, body: ChatRequest):
        await asyncio.sleep(delay)
        job = worker.submit(body, stream=True)
        async for _ in job.stream():
            pass
        try:
            return await job.result()
        except (InvalidRequest, ServerError) as exc:
            return exc
        finally:
            finished.append(body.messages[0]["content"])

    async def main() -> list:
        worker.start()
        while worker.runner is None:
            await asyncio.sleep(0.001)
        return await asyncio.gather(*(one(delay, body) for delay, body in plan))

    try:
        return (runner, *asyncio.run(main()), finished)
    finally:
        worker.stop(5)


def test_replies_generate_together_one_step_each_in_turn() -> None:
    runner, long, short, finished = run(2, [(0, request("long", 40)), (0, request("short", 3))])
    assert long.completion_tokens == 40 and short.completion_tokens == 3
    assert finished == ["short", "long"]
    # From the step the short one was admitted, the two take turns, a step each.
    texts = [text for text, _ in runner.steps]
    first, last = texts.index("short"), len(texts) - 1 - texts[::-1].index("short")
    assert 1 <= texts[first : last + 1].count("long") <= 3


def test_a_request_arriving_mid_reply_takes_a_free_slot() -> None:
    runner, long, late, finished = run(2, [(0, request("long", 60)), (0.05, request("late", 2))])
    assert finished == ["late", "long"]
    first_late = runner.steps.index(("late", 0))
    assert 0 < first_late < len(runner.steps) - 3
    assert ("long", 59) in runner.steps[first_late:]


def test_one_slot_is_one_reply_at_a_time() -> None:
    runner, first, second, finished = run(1, [(0, request("first", 10)), (0, request("second", 3))])
    assert finished == ["first", "second"]
    assert [text for text, _ in runner.steps] == ["first"] * 10 + ["second"] * 3


@pytest.mark.parametrize("parallel", [1, 3])
def test_a_failing_request_ends_only_itself(parallel: int) -> None:
    plan = [(0, request("a", 5)), (0, request("too long", 5)), (0, request("b", 5))]
    _, a, failed, b, _ = run(parallel, plan)
    assert isinstance(failed, InvalidRequest) and failed.param == "messages"
    assert a.completion_tokens == 5 and b.completion_tokens == 5


def test_a_reply_that_crashes_mid_generation_is_a_500_for_it_alone() -> None:
    plan = [(0, request("a", 8)), (0, request("crash", 8)), (0, request("b", 8))]
    _, a, crashed, b, _ = run(3, plan)
    assert isinstance(crashed, ServerError) and "out of memory" in str(crashed)
    assert a.completion_tokens == 8 and b.completion_tokens == 8
