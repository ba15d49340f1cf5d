"""Chat at scale through `mlxd serve`, on the tiny Gemma 4 with vision and the real Gemma 3 270M:
concurrent requests answer what they answer alone, a second turn reuses the prefix cache and
says so, images never share cached state, `n` choices, and the KV budget's admission."""

from __future__ import annotations

import base64
import io
import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from PIL import Image

from tests.real_weights import gemma3_270m_mlx
from tests.serving import Server, poll_until, serve_one

SAMPLINGS = [
    {"temperature": 0},
    {"temperature": 0.8, "seed": 1, "top_p": 0.9},
    {"temperature": 1.0, "seed": 2, "top_k": 20},
    {"temperature": 0.7, "seed": 3, "min_p": 0.05},
    {"temperature": 1.2, "seed": 4, "top_p": 0.95, "top_k": 40, "min_p": 0.02},
    {"temperature": 0, "repetition_penalty": 1.3},
    {"temperature": 0.9, "seed": 5, "presence_penalty": 0.5, "frequency_penalty": 0.4},
    {"temperature": 0, "logprobs": True, "top_logprobs": 2, "stop": ["zz"]},
]
TEXTS = [
    "Hello, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Describe a picture in one sentence, please.",
    "What is in this image?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024",
    "def add(a, b):",
    "The weather is sunny and warm; let us go for a walk.",
    "Thinking step by step: first, then, finally the answer is yes.",
]


def image_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def user(text: str, image: str | None = None) -> list[dict]:
    if image is None:
        return [{"role": "user", "content": text}]
    parts = [{"type": "image_url", "image_url": {"url": image_url(image)}}]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def chat(server: Server, body: dict) -> dict:
    response = server.post("chat", "/v1/chat/completions", json={"model": "m", **body})
    assert response.status_code == 200, response.text
    return response.json()


def answer(reply: dict) -> list[tuple]:
    """What must match: each choice's text, reasoning, finish reason and tokens. (Logprob
    values may differ in the last bits: an optimized BLAS picks its matmul kernel by the
    number of rows, so a batched row is not always bit-identical to the same row alone.)"""
    out = []
    for choice in reply["choices"]:
        message = choice["message"]
        logprobs = choice.get("logprobs") or {}
        tokens = [e["token"] for e in logprobs.get("content") or []]
        reason = choice["finish_reason"]
        out.append((message.get("content"), message.get("reasoning_content"), reason, tokens))
    return out


def logprob_values(reply: dict) -> list[float]:
    return [
        e["logprob"]
        for choice in reply["choices"]
        for e in (choice.get("logprobs") or {}).get("content") or []
    ]


@pytest.fixture(scope="module", params=["tiny-gemma4", "gemma3-270m"])
def model(request: pytest.FixtureRequest, tiny_gemma4: Path) -> tuple[str, Path]:
    return request.param, tiny_gemma4 if request.param == "tiny-gemma4" else gemma3_270m_mlx()


@pytest.fixture(scope="module")
def server(model: tuple[str, Path], tmp_path_factory) -> Iterator[Server]:
    yield from serve_one(tmp_path_factory.mktemp("scale"), "chat", model[1], "--chat-batch", "8")


@pytest.fixture(scope="module")
def cold(model: tuple[str, Path], tmp_path_factory) -> Iterator[Server]:
    """The same model with the prefix cache off."""
    tmp = tmp_path_factory.mktemp("scale-cold")
    yield from serve_one(tmp, "chat", model[1], "--chat-cache-bytes", "0")


def eight_bodies(model_name: str) -> list[dict]:
    bodies = []
    for i, (text, sampling) in enumerate(zip(TEXTS, SAMPLINGS, strict=True)):
        image = {2: "red", 3: "blue"}.get(i) if model_name == "tiny-gemma4" else None
        bodies.append({"messages": user(text, image), "max_tokens": 10 + i, **sampling})
    return bodies


def test_concurrent_requests_answer_what_they_answer_alone(server: Server, model, cold) -> None:
    bodies = eight_bodies(model[0])
    alone = [chat(cold, body) for body in bodies]
    for _ in range(2):  # the second time with the prefix cache warm
        with ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda body: chat(server, body), bodies))
        assert [answer(r) for r in together] == [answer(r) for r in alone]
        for batched, single in zip(together, alone, strict=True):
            assert logprob_values(batched) == pytest.approx(logprob_values(single), abs=1e-3)


def test_a_second_turn_reuses_the_cache_and_answers_as_without(
    server: Server, cold: Server
) -> None:
    system = {"role": "system", "content": "You answer briefly. " * 20}
    first = [system, *user("Name a colour.")]
    body = {"messages": first, "max_tokens": 8, "temperature": 0}
    turn1 = chat(server, body)
    said = turn1["choices"][0]["message"]["content"] or "Blue."
    second = [*first, {"role": "assistant", "content": said}, *user("And another?")]
    for sampling in ({"temperature": 0}, {"temperature": 0.9, "seed": 7}):
        body = {"messages": second, "max_tokens": 8, **sampling}
        warm, cool = chat(server, body), chat(cold, body)
        assert warm["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        assert warm["timings"]["cache_n"] == warm["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cool["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        assert answer(warm) == answer(cool)
        assert warm["usage"]["prompt_tokens"] == cool["usage"]["prompt_tokens"]


@pytest.mark.parametrize("model", ["tiny-gemma4"], indirect=True)  # Gemma 3 270M reads no images
def test_different_images_with_the_same_text_never_share_state(
    server: Server, cold: Server, model
) -> None:
    text = "Which colour is this picture?"
    bodies = {
        color: {"messages": user(text, color), "max_tokens": 6, "temperature": 0, "logprobs": True}
        for color in ("green", "purple")
    }
    chat(server, bodies["green"])  # its KV is now in the cache
    warm = chat(server, bodies["purple"])
    assert answer(warm) == answer(chat(cold, bodies["purple"]))
    green = chat(cold, bodies["green"])
    assert logprob_values(green) != logprob_values(warm)  # the pixels reached the model


def test_n_choices(server: Server) -> None:
    body = {"messages": user("Tell me"), "max_tokens": 8, "n": 3, "seed": 3, "logprobs": True}
    sampled = chat(server, body)
    assert [c["index"] for c in sampled["choices"]] == [0, 1, 2]
    tokens = [len(c["logprobs"]["content"]) for c in sampled["choices"]]
    assert all(tokens) and sampled["usage"]["completion_tokens"] >= sum(tokens)
    greedy = {"messages": user("Tell me"), "max_tokens": 8, "n": 2, "temperature": 0}
    reply = chat(server, greedy)
    first, second = answer(reply)
    assert first == second
    alone = chat(server, {**greedy, "n": 1})
    assert answer(alone)[0] == first
    # Streamed: every chunk names its choice, and each choice's text adds up to the same.
    texts = {0: "", 1: ""}
    with httpx.stream(
        "POST",
        server.url("chat") + "/v1/chat/completions",
        json={"model": "m", **greedy, "stream": True},
        timeout=120,
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    texts[choice["index"]] += choice["delta"].get("content") or ""
    assert texts[0] == texts[1] == first[0]


# ---- the KV budget ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def budget_server(tiny_gemma4: Path, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("kv-budget")
    yield from serve_one(tmp, "chat", tiny_gemma4, "--chat-kv-tokens", "600", "--chat-batch", "4")


def stream_events(server: Server, body: dict, events: list, name: str, stop_after=None) -> str:
    """Stream a reply, logging (name, 'token'|'done') into `events`; returns the content."""
    text = ""
    payload = {"model": "m", **body, "stream": True}
    with httpx.stream(
        "POST", server.url("chat") + "/v1/chat/completions", json=payload, timeout=300
    ) as response:
        assert response.status_code == 200, response.read()
        for line in response.iter_lines():
            if line == "data: [DONE]":
                events.append((name, "done"))
            elif line.startswith("data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    if choice["delta"].get("content"):
                        text += choice["delta"]["content"]
                        events.append((name, "token"))
            if stop_after is not None and len(text) >= stop_after:
                return text  # leaves: the connection closes
    return text


def test_a_request_that_could_never_fit_is_a_400_naming_both_numbers(budget_server) -> None:
    body = {"model": "m", "messages": user("Hello"), "max_tokens": 700}
    response = budget_server.post("chat", "/v1/chat/completions", json=body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "kv_budget_exceeded" and error["kv_budget"] == 600
    assert str(error["n_kv_tokens"]) in error["message"] and "600" in error["message"]
    assert error["n_kv_tokens"] > 700
    many = {"model": "m", "messages": user("Hello"), "max_tokens": 200, "n": 3}
    assert budget_server.post("chat", "/v1/chat/completions", json=many).status_code == 400


def test_admission_waits_for_room_and_loses_nothing(budget_server) -> None:
    events: list[tuple[str, str]] = []
    body = {"messages": user("Tell me a long story"), "max_tokens": 400, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(stream_events, budget_server, body, events, "first")
        while not events:  # the first holds most of the budget before the second arrives
            time.sleep(0.01)
        second = pool.submit(stream_events, budget_server, body, events, "second")
        texts = [first.result(), second.result()]
    assert texts[0] == texts[1] and texts[0]
    # The second could not fit beside the first: its first token comes after the first's end.
    assert events.index(("first", "done")) < events.index(("second", "token"))


def test_a_client_that_leaves_frees_its_rows_and_kv(budget_server) -> None:
    events: list[tuple[str, str]] = []
    body = {"messages": user("Tell me a long story"), "max_tokens": 400, "temperature": 0}
    with ThreadPoolExecutor(2) as pool:
        gone = pool.submit(stream_events, budget_server, body, events, "gone", stop_after=3)
        gone.result()
        kept = pool.submit(stream_events, budget_server, body, events, "kept").result()
    assert kept and ("kept", "done") in events
    budget_server.wait_for(
        lambda: "chat: generation cancelled after" in budget_server.log(), 30, "the cancel"
    )
    line = budget_server.log().split("chat: generation cancelled after ")[1]
    assert int(line.split()[0]) < 400  # the abandoned reply left the batch early


@pytest.fixture(scope="module")
def one_slot_server(tiny_gemma4: Path, tmp_path_factory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("kv-queue")
    flags = ("--chat-kv-tokens", "600", "--chat-batch", "2", "--queue-size", "3")
    yield from serve_one(tmp, "chat", tiny_gemma4, *flags)


def queue_depth(server: Server) -> float:
    for line in server.get("chat", "/metrics").text.splitlines():
        if line.startswith("mlxd_queue_depth "):
            return float(line.split()[1])
    raise AssertionError("no mlxd_queue_depth in /metrics")


def test_past_the_queue_a_request_is_a_503_with_retry_after_and_no_queued_one_is_lost(
    one_slot_server: Server,
) -> None:
    """The first reply holds the KV budget; the second waits beside it for KV room (the batch
    has two rows); the third waits in the queue; a fourth finds the service's three places
    (--queue-size counts the requests taken too) full: 503 with Retry-After. The three
    accepted replies finish with the same text (the order in which they ran is
    test_admission_waits_for_room_and_loses_nothing's)."""
    server, events = one_slot_server, []
    body = {"messages": user("Tell me a long story"), "max_tokens": 560, "temperature": 0}
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(stream_events, server, body, events, "first")
        poll_until(lambda: bool(events), "the first reply's first token")
        second = pool.submit(stream_events, server, body, events, "second")
        third = pool.submit(stream_events, server, body, events, "third")
        poll_until(lambda: queue_depth(server) >= 1, "a request in the queue")
        refused = server.post("chat", "/v1/chat/completions", json={"model": "m", **body})
        texts = [first.result(), second.result(), third.result()]
    assert refused.status_code == 503, refused.text
    assert refused.headers["retry-after"] == "1"
    assert refused.json()["error"]["code"] == "queue_full"
    assert texts[0] == texts[1] == texts[2] and texts[0]
    assert {name for name, event in events if event == "done"} == {"first", "second", "third"}
