"""Chat through `mlxd serve` on a tiny random Gemma 4 (vision), driven by the OpenAI SDKs.

The served model is the tiny checkpoint with two token ids re-assigned to Gemma 4's thinking
markers (tests.tiny.gemma4.swap_token_ids): greedy decoding of PROMPT then writes
``<|channel>`` ... ``<channel|>`` at known places, so the route's reasoning split is tested on
real model output.
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
from PIL import Image

from tests.serving import Server, serve_one

PROMPT = [{"role": "user", "content": "Hello"}]
N_TOKENS = 16


@dataclass(frozen=True)
class Script:
    """What greedy decoding of PROMPT gives once the markers are swapped in."""

    reasoning: str
    content: str


def _candidates(tokenizer, steps, prompt_ids: list[int]) -> list[int]:
    """Positions whose token is an ordinary word piece, unique in the output, not in the prompt."""
    ids = [s.token for s in steps]
    out = []
    for i, step in enumerate(steps):
        name = tokenizer.convert_ids_to_tokens(step.token)
        plain = name.strip("\u2581").isalpha() and not name.startswith("<")
        unique = ids.count(step.token) == 1 and step.token not in prompt_ids
        if plain and step.text.strip() and unique:
            out.append(i)
    return out


@pytest.fixture(scope="module")
def marker_model(tiny_gemma4: Path, tmp_path_factory) -> tuple[Path, Script]:
    from engine.chat.runner import ChatParams, ChatRunner
    from tests.tiny.gemma4 import swap_token_ids

    runner = ChatRunner.load(tiny_gemma4, "tiny")
    greedy = ChatParams(N_TOKENS, 0.0, 1.0, 0, 0.0, None, ())
    prompt = runner.prepare(PROMPT, [])
    steps = list(runner.generate(prompt, greedy, lambda: False))
    assert len(steps) == N_TOKENS and steps[-1].finish_reason == "length"
    spots = _candidates(runner.tokenizer, steps, prompt.input_ids.tolist()[0])
    opening, closing = spots[0], next(i for i in spots if i >= spots[0] + 3)
    swaps = {steps[opening].token: "<|channel>", steps[closing].token: "<channel|>"}
    texts = [s.text for s in steps]
    script = Script(
        reasoning="".join(texts[opening + 1 : closing]),
        content="".join(texts[:opening] + texts[closing + 1 :]),
    )
    assert script.reasoning.strip() and script.content.strip()
    dest = tmp_path_factory.mktemp("marker-gemma4") / "tiny-gemma4-markers"
    return swap_token_ids(tiny_gemma4, dest, swaps), script


@pytest.fixture(scope="module")
def server(marker_model, tmp_path_factory) -> Iterator[Server]:
    yield from serve_one(tmp_path_factory.mktemp("chat-e2e"), "chat", marker_model[0])


@pytest.fixture(scope="module")
def api(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("chat") + "/v1", api_key="x", max_retries=0)


def streamed(api: openai.OpenAI, **request) -> dict:
    out = {"content": "", "reasoning": "", "finish": None, "usage": None, "chunks": []}
    for chunk in api.chat.completions.create(stream=True, **request):
        out["chunks"].append(chunk)
        out["usage"] = chunk.usage or out["usage"]
        for choice in chunk.choices:
            extra = choice.delta.model_extra or {}
            out["content"] += choice.delta.content or ""
            out["reasoning"] += extra.get("reasoning_content") or ""
            out["finish"] = choice.finish_reason or out["finish"]
    return out


def image_url(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), color).save(buffer, "PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


GREEDY = {"model": "gemma-4-e4b", "temperature": 0, "max_tokens": N_TOKENS}


def test_thinking_markers_split_reasoning_from_content(api, marker_model) -> None:
    _, script = marker_model
    reply = api.chat.completions.create(messages=PROMPT, **GREEDY)
    message = reply.choices[0].message
    extra = message.model_extra
    assert extra["reasoning_content"] == extra["reasoning"] == script.reasoning
    assert message.content == script.content
    assert "<" not in message.content and script.reasoning not in message.content
    assert reply.usage.completion_tokens_details.reasoning_tokens >= 3
    stream = streamed(api, messages=PROMPT, **GREEDY, stream_options={"include_usage": True})
    assert (stream["reasoning"], stream["content"]) == (script.reasoning, script.content)
    assert stream["finish"] == "length" and stream["usage"].completion_tokens == N_TOKENS
    assert stream["chunks"][0].choices[0].delta.role == "assistant"


def test_thinking_that_eats_the_budget_is_length_with_empty_content(api, marker_model) -> None:
    reply = api.chat.completions.create(messages=PROMPT, **{**GREEDY, "max_tokens": 3})
    choice = reply.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert choice.message.model_extra["reasoning_content"]


def test_response_envelope(api) -> None:
    reply = api.chat.completions.create(messages=[{"role": "user", "content": "Hi"}], **GREEDY)
    assert reply.id.startswith("chatcmpl-") and reply.created > 0
    assert reply.model == "tiny-gemma4-markers" and reply.system_fingerprint
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert reply.model_extra["timings"]["predicted_n"] == usage.completion_tokens


def test_two_images_change_the_output(api) -> None:
    def ask(color: str):
        content = [
            {"type": "image_url", "image_url": {"url": image_url(color)}},
            {"type": "text", "text": "What is in this image?"},
        ]
        return api.chat.completions.create(
            messages=[{"role": "user", "content": content}],
            logprobs=True,
            top_logprobs=5,
            **{**GREEDY, "max_tokens": 6},
        )

    red, blue = ask("red"), ask("blue")
    assert red.usage.prompt_tokens == blue.usage.prompt_tokens
    first = [
        [(t.token, round(t.logprob, 4)) for t in r.choices[0].logprobs.content[0].top_logprobs]
        for r in (red, blue)
    ]
    assert first[0] != first[1]
    both = ask("red")
    assert both.choices[0].logprobs.content[0].logprob == pytest.approx(
        red.choices[0].logprobs.content[0].logprob, abs=1e-4
    )


def test_several_images_in_one_message(api) -> None:
    content = [{"type": "image_url", "image_url": {"url": image_url(c)}} for c in ("red", "blue")]
    content.append({"type": "text", "text": "Compare"})
    one = api.chat.completions.create(
        messages=[{"role": "user", "content": content[1:]}], **{**GREEDY, "max_tokens": 2}
    )
    two = api.chat.completions.create(
        messages=[{"role": "user", "content": content}], **{**GREEDY, "max_tokens": 2}
    )
    assert two.usage.prompt_tokens > one.usage.prompt_tokens


def test_same_seed_same_output(api) -> None:
    request = {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 12}
    request.update(temperature=1.0, top_p=1.0, extra_body={"top_k": 0})
    first = api.chat.completions.create(model="m", seed=42, **request)
    again = api.chat.completions.create(model="m", seed=42, **request)
    other = api.chat.completions.create(model="m", seed=43, **request)
    text = [r.choices[0].message for r in (first, again, other)]
    assert (text[0].content, text[0].model_extra) == (text[1].content, text[1].model_extra)
    assert (text[0].content, text[0].model_extra) != (text[2].content, text[2].model_extra)
    stream = streamed(api, model="m", seed=42, **request)
    assert stream["content"] == text[0].content


def test_stop_string_ends_generation_and_is_not_in_content(api) -> None:
    messages = [{"role": "user", "content": "Describe the picture"}]
    full = api.chat.completions.create(messages=messages, **GREEDY).choices[0].message.content
    stop = next(full[i : i + 2] for i in range(2, len(full) - 2) if full[i : i + 2].strip())
    reply = api.chat.completions.create(messages=messages, stop=[stop, "never"], **GREEDY)
    assert reply.choices[0].finish_reason == "stop"
    assert reply.choices[0].message.content == full[: full.index(stop)]
    stream = streamed(api, messages=messages, stop=stop, **GREEDY)
    assert stream["content"] == full[: full.index(stop)] and stream["finish"] == "stop"


def test_json_schema_is_enforced(api) -> None:
    schema = {
        "type": "object",
        "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "maximum": 99}},
        "required": ["ok", "n"],
        "additionalProperties": False,
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}}
    request = {"messages": [{"role": "user", "content": "Answer"}], "response_format": fmt}
    reply = api.chat.completions.create(**request, **{**GREEDY, "max_tokens": 40})
    value = json.loads(reply.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool)
    stream = streamed(api, **request, **{**GREEDY, "max_tokens": 40})
    assert json.loads(stream["content"]) == value


def test_named_tool_choice_gives_parsed_tool_calls(api) -> None:
    parameters = {
        "type": "object",
        "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo"]}},
        "required": ["city"],
        "additionalProperties": False,
    }
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": parameters}}]
    request = {
        "messages": [{"role": "user", "content": "Weather?"}],
        "tools": tools,
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    reply = api.chat.completions.create(**request, **{**GREEDY, "max_tokens": 30})
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments)["city"] in ("Paris", "Tokyo")
    stream = streamed(api, **request, **{**GREEDY, "max_tokens": 30})
    assert stream["finish"] == "tool_calls"


def test_context_overflow_is_400_naming_both_numbers(api) -> None:
    long = "hello " * 5000
    with pytest.raises(openai.BadRequestError) as info:
        api.chat.completions.create(messages=[{"role": "user", "content": long}], **GREEDY)
    error = info.value.body
    assert error["code"] == "context_length_exceeded" and "4096" in error["message"]
    assert str(error["n_prompt_tokens"]) in error["message"]


@pytest.mark.parametrize(
    "request_body",
    [
        {"messages": []},
        {"messages": [{"role": "user", "content": "x"}], "temperature": 9},
        {"messages": [{"role": "user", "content": "x"}], "n": 99},
        {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}},
        {
            "messages": [
                {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
            ]
        },
    ],
)
def test_malformed_requests_are_openai_400s(api, request_body: dict) -> None:
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as info:
            api.chat.completions.create(model="m", stream=stream, **request_body)
        assert set(info.value.body) >= {"message", "type", "param", "code"}


def test_disconnect_frees_the_slot(server: Server, api) -> None:
    body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 3000, "stream": True}
    with httpx.stream("POST", server.url("chat") + "/v1/chat/completions", json=body) as response:
        for line in response.iter_lines():
            if '"content"' in line or '"reasoning_content"' in line:
                break
    server.wait_for(lambda: "generation cancelled after" in server.log(), 10, "the cancel")
    reply = api.chat.completions.create(
        messages=[{"role": "user", "content": "Hi"}], max_tokens=3, model="m", timeout=30
    )
    assert reply.choices[0].finish_reason in ("stop", "length")


def test_a_second_reply_runs_beside_a_long_one_and_seeds_still_reproduce(
    server: Server, api
) -> None:
    seeded = {"messages": [{"role": "user", "content": "Tell me"}], "max_tokens": 12, "seed": 42}
    seeded.update(model="m", temperature=1.0, top_p=1.0, extra_body={"top_k": 0})
    alone = api.chat.completions.create(**seeded).choices[0].message.content
    cancels = server.log().count("generation cancelled after")
    body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 3000, "stream": True}
    url = server.url("chat") + "/v1/chat/completions"
    with httpx.stream("POST", url, json=body) as response:
        lines = response.iter_lines()
        next(line for line in lines if '"content": "' in line or '"reasoning_content"' in line)
        beside = api.chat.completions.create(**seeded, timeout=60)
        assert beside.choices[0].message.content == alone
        assert any('"delta": {' in line for line in lines)
    # Closed while still generating: one slot would have finished it before `beside` ran.
    server.wait_for(
        lambda: server.log().count("generation cancelled after") > cancels, 10, "the cancel"
    )


def test_node_sdk_streamed_and_not(server: Server, api, node_client) -> None:
    request = {"kind": "chat", "model": "m", "messages": PROMPT, **GREEDY}
    base = server.url("chat") + "/v1"
    whole, stream = node_client(base, request), node_client(base, {**request, "stream": True})
    python = api.chat.completions.create(messages=PROMPT, **GREEDY)
    assert whole["content"] == stream["content"] == python.choices[0].message.content
    assert whole["finish_reason"] == stream["finish_reason"] == "length"


# ---- the chat port's other APIs on the same model -----------------------------------------


def test_anthropic_messages_split_thinking_like_chat(server: Server, marker_model) -> None:
    import anthropic

    _, script = marker_model
    sdk = anthropic.Anthropic(base_url=server.url("chat"), api_key="x", max_retries=0)
    # This SDK no longer takes `temperature` as an argument; the route still honours it.
    request = {"model": "gemma-4-e4b", "max_tokens": N_TOKENS, "extra_body": {"temperature": 0}}
    message = sdk.messages.create(messages=PROMPT, **request)
    blocks = {block.type: block for block in message.content}
    assert blocks["thinking"].thinking == script.reasoning
    assert blocks["text"].text == script.content
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == N_TOKENS
    with sdk.messages.stream(messages=PROMPT, **request) as stream:
        final = stream.get_final_message()
    assert [b.model_dump().get("text") for b in final.content] == [
        b.model_dump().get("text") for b in message.content
    ]
    counted = sdk.messages.count_tokens(model="gemma-4-e4b", messages=PROMPT)
    chat = api_for(server).chat.completions.create(messages=PROMPT, **GREEDY)
    assert counted.input_tokens == chat.usage.prompt_tokens
    assert (
        message.usage.input_tokens + message.usage.cache_read_input_tokens == counted.input_tokens
    )


def test_responses_match_chat_and_continue_a_stored_conversation(server: Server, marker_model):
    _, script = marker_model
    api = api_for(server)
    response = api.responses.create(
        model="gemma-4-e4b", input="Hello", temperature=0, max_output_tokens=N_TOKENS
    )
    assert response.output_text == script.content
    assert response.output[0].type == "reasoning"
    assert response.output[0].content[0].text == script.reasoning
    assert response.status == "incomplete"
    events = list(
        api.responses.create(
            model="gemma-4-e4b",
            input="Hello",
            temperature=0,
            max_output_tokens=N_TOKENS,
            stream=True,
        )
    )
    assert events[-1].type == "response.incomplete"
    assert events[-1].response.output_text == script.content
    follow = api.responses.create(
        model="gemma-4-e4b",
        input="And then?",
        previous_response_id=response.id,
        temperature=0,
        max_output_tokens=4,
    )
    assert follow.usage.input_tokens > response.usage.input_tokens + N_TOKENS // 2
    assert follow.usage.input_tokens_details.cached_tokens > 0


def test_legacy_completions_read_raw_text(server: Server) -> None:
    api = api_for(server)
    done = api.completions.create(model="gemma-4-e4b", prompt="Hello", max_tokens=4, temperature=0)
    assert done.choices[0].finish_reason == "length" and done.usage.completion_tokens == 4
    templated = api.chat.completions.create(messages=PROMPT, **GREEDY).usage.prompt_tokens
    assert done.usage.prompt_tokens < templated  # no chat template around the text
    again = api.completions.create(model="gemma-4-e4b", prompt="Hello", max_tokens=4, temperature=0)
    assert again.choices[0].text == done.choices[0].text


def api_for(server: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("chat") + "/v1", api_key="x", max_retries=0)
