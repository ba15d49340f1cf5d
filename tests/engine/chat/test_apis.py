"""The chat port's other APIs, driven by the official SDKs against a scripted fake runner:
Anthropic Messages (`anthropic`), OpenAI Responses and legacy completions (`openai`). Each
stream's event order is checked against the published sequence."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import re
from pathlib import Path

import anthropic
import httpx
import openai
import pytest
from PIL import Image

from tests.engine.fakes import FakeChat
from tests.fuzz.live import live as served_live

THINKING = ("<|channel>", "thought", "\n", "Let me ", "think", "<channel|>", "The ", "answer", ".")
TOOL_SCRIPT = ("<|tool_call>", "call:get_weather{", "city:", '<|"|>Paris<|"|>', "}", "<tool_call|>")
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string"}},
    "required": ["city"],
}
USER = [{"role": "user", "content": "Hi"}]


def live(tmp_path: Path, fake: FakeChat, **settings) -> contextlib.AbstractContextManager[str]:
    """A served fake whose event loop runs in a thread, so real HTTP clients can call it."""
    return served_live(tmp_path, "chat", fake, **settings)


def claude(url: str, key: str = "x") -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=url, api_key=key, max_retries=0)


def oai(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)


def sse_events(response: httpx.Response) -> list[tuple[str, dict]]:
    out, kind = [], None
    for line in response.text.splitlines():
        if line.startswith("event: "):
            kind = line[7:]
        elif line.startswith("data: "):
            data = json.loads(line[6:])
            assert data["type"] == kind
            out.append((kind, data))
    return out


def png_base64(color: str) -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


# ---- Anthropic Messages ----------------------------------------------------------------------

ANTHROPIC_ORDER = re.compile(
    r"message_start (ping )*"
    r"((content_block_start (ping |content_block_delta )*content_block_stop )(ping )*)*"
    r"message_delta message_stop "
)


def test_messages_thinking_and_text_blocks_streamed_in_the_published_order(tmp_path) -> None:
    fake = FakeChat(script=THINKING, eos=True)
    with live(tmp_path, fake) as url:
        api = claude(url)
        body = {"model": "gemma-4-e4b", "max_tokens": 64, "messages": USER}
        thinking = {"type": "enabled", "budget_tokens": 1024}
        message = api.messages.create(**body, thinking=thinking)
        assert fake.calls[-1]["thinking"] is True
        assert [b.type for b in message.content] == ["thinking", "text"]
        assert message.content[0].thinking == "Let me think"
        assert message.content[1].text == "The answer."
        assert (message.stop_reason, message.stop_sequence) == ("end_turn", None)
        assert message.usage.output_tokens == len(THINKING) + 1
        with api.messages.stream(**body, thinking=thinking) as stream:
            kinds = [event.type for event in stream]
            final = stream.get_final_message()
        assert [(b.type, b.model_dump().get("text")) for b in final.content] == [
            (b.type, b.model_dump().get("text")) for b in message.content
        ]
        assert final.content[0].thinking == "Let me think" and final.stop_reason == "end_turn"
        assert "thinking" in kinds and "text" in kinds
        raw = httpx.post(f"{url}/v1/messages", json={**body, "stream": True}, timeout=30)
        events = sse_events(raw)
        sequence = "".join(kind + " " for kind, _ in events)
        assert ANTHROPIC_ORDER.fullmatch(sequence), sequence
        starts = [e["content_block"]["type"] for k, e in events if k == "content_block_start"]
        assert starts == ["thinking", "text"]
        deltas = [e["delta"]["type"] for k, e in events if k == "content_block_delta"]
        assert deltas.index("signature_delta") < deltas.index("text_delta")
        assert events[-2][1]["delta"]["stop_reason"] == "end_turn"
        assert events[-2][1]["usage"]["output_tokens"] == len(THINKING) + 1
        api.messages.create(**body, thinking={"type": "disabled"})
        assert fake.calls[-1]["thinking"] is False


def test_messages_tool_use_round_trip(tmp_path) -> None:
    fake = FakeChat(script=TOOL_SCRIPT, eos=True)
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER}]
    with live(tmp_path, fake) as url:
        api = claude(url)
        ask = [{"role": "user", "content": "Weather in Paris?"}]
        message = api.messages.create(model="m", max_tokens=64, messages=ask, tools=tools)
        assert message.stop_reason == "tool_use"
        (call,) = message.content
        assert (call.type, call.name, call.input) == ("tool_use", "get_weather", {"city": "Paris"})
        sent_tools = fake.calls[-1]["tools"]
        assert sent_tools[0]["function"]["name"] == "get_weather"
        assert sent_tools[0]["function"]["parameters"] == WEATHER
        with api.messages.stream(model="m", max_tokens=64, messages=ask, tools=tools) as stream:
            streamed = stream.get_final_message()
        assert streamed.content[0].input == {"city": "Paris"}
        assert streamed.stop_reason == "tool_use"
        result = {"type": "tool_result", "tool_use_id": call.id, "content": "18 C"}
        follow = [
            *ask,
            {"role": "assistant", "content": [c.model_dump() for c in message.content]},
            {"role": "user", "content": [result, {"type": "text", "text": "Thanks"}]},
        ]
        api.messages.create(model="m", max_tokens=64, messages=follow, tools=tools)
        sent = fake.calls[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool", "user"]
        assert sent[1]["tool_calls"][0]["id"] == call.id
        assert json.loads(sent[1]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
        assert (sent[2]["tool_call_id"], sent[2]["content"]) == (call.id, "18 C")
        forced = {"type": "tool", "name": "get_weather"}
        api.messages.create(model="m", max_tokens=64, messages=ask, tools=tools, tool_choice=forced)
        assert fake.calls[-1]["params"].constraint.tools[0][0] == "get_weather"


def test_messages_system_images_stop_sequences_and_max_tokens(tmp_path) -> None:
    fake = FakeChat(eos=True)
    with live(tmp_path, fake) as url:
        api = claude(url)
        image = {
            "type": "image",
            "source": {"type": "base64", "media_type": "image/png", "data": png_base64("red")},
        }
        content = [image, {"type": "text", "text": "What is it?"}]
        message = api.messages.create(
            model="m",
            max_tokens=64,
            system=[{"type": "text", "text": "Be brief."}],
            messages=[{"role": "user", "content": content}],
            stop_sequences=[" fake"],
        )
        call = fake.calls[-1]
        assert call["messages"][0] == {"role": "system", "content": "Be brief."}
        assert len(call["images"]) == 1 and call["images"][0].getpixel((0, 0)) == (255, 0, 0)
        assert (message.stop_reason, message.stop_sequence) == ("stop_sequence", " fake")
        assert message.content[0].text == "Hello world, this is"
        short = api.messages.create(model="m", max_tokens=2, messages=USER)
        assert short.stop_reason == "max_tokens" and short.content[0].text == "Hello world"
        fmt = {"format": {"type": "json_schema", "schema": WEATHER}}
        api.messages.create(model="m", max_tokens=4, messages=USER, output_config=fmt)
        assert json.loads(fake.calls[-1]["params"].constraint.json_schema) == WEATHER


def test_count_tokens_matches_the_prompt_a_message_reads(tmp_path) -> None:
    with live(tmp_path, FakeChat(eos=True)) as url:
        api = claude(url)
        words = [{"role": "user", "content": "one two three four"}]
        counted = api.messages.count_tokens(model="m", messages=words, system="five six")
        message = api.messages.create(model="m", max_tokens=4, messages=words, system="five six")
        assert counted.input_tokens == message.usage.input_tokens == 6


def test_messages_errors_are_in_anthropics_shape(tmp_path) -> None:
    with live(tmp_path, FakeChat(), api_key="sekrit") as url:
        api = claude(url, key="sekrit")
        with pytest.raises(anthropic.BadRequestError) as bad:
            api.messages.create(model="m", max_tokens=0, messages=USER)
        assert bad.value.body["type"] == "error"
        assert bad.value.body["error"]["type"] == "invalid_request_error"
        assert "max_tokens" in bad.value.body["error"]["message"]
        missing = httpx.post(
            f"{url}/v1/messages",
            json={"model": "m", "messages": USER},
            headers={"x-api-key": "sekrit"},
        )
        assert missing.status_code == 400 and missing.json()["type"] == "error"
        block = {"type": "document", "source": {"type": "text", "data": "x"}}
        with pytest.raises(anthropic.BadRequestError) as unsupported:
            api.messages.create(
                model="m", max_tokens=4, messages=[{"role": "user", "content": [block]}]
            )
        assert "messages[0].content[0].type" in unsupported.value.body["error"]["message"]
        with pytest.raises(anthropic.AuthenticationError) as denied:
            claude(url, key="wrong").messages.create(model="m", max_tokens=4, messages=USER)
        assert denied.value.body["error"]["type"] == "authentication_error"
        chat = httpx.post(f"{url}/v1/chat/completions", json={"messages": USER})
        assert chat.status_code == 401 and "error" in chat.json() and "type" not in chat.json()


# ---- OpenAI Responses -----------------------------------------------------------------------

RESPONSES_ORDER = re.compile(
    r"response\.created response\.in_progress "
    r"(response\.output_item\.added ("
    r"response\.content_part\.added (response\.(reasoning|output)_text\.delta )*"
    r"response\.(reasoning|output)_text\.done response\.content_part\.done "
    r"|response\.function_call_arguments\.delta response\.function_call_arguments\.done "
    r")response\.output_item\.done )*"
    r"response\.(completed|incomplete) "
)


def test_responses_plain_and_streamed_say_the_same_in_the_published_order(tmp_path) -> None:
    fake = FakeChat(script=THINKING, eos=True)
    with live(tmp_path, fake) as url:
        api = oai(url)
        response = api.responses.create(
            model="gemma-4-e4b", input="Hi", instructions="Be brief.", reasoning={"effort": "low"}
        )
        assert fake.calls[-1]["messages"] == [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
        ]
        assert fake.calls[-1]["thinking"] is True
        assert response.status == "completed" and response.output_text == "The answer."
        assert [item.type for item in response.output] == ["reasoning", "message"]
        assert response.output[0].content[0].text == "Let me think"
        assert response.usage.output_tokens == len(THINKING) + 1
        assert response.usage.output_tokens_details.reasoning_tokens == 6
        events = list(api.responses.create(model="m", input="Hi", stream=True))
        sequence = "".join(event.type + " " for event in events)
        assert RESPONSES_ORDER.fullmatch(sequence), sequence
        assert [e.sequence_number for e in events] == list(range(len(events)))
        text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        final = events[-1].response
        assert text == final.output_text == "The answer."
        assert api.responses.retrieve(final.id).output_text == "The answer."


def test_responses_function_tool_round_trip_with_previous_response_id(tmp_path) -> None:
    fake = FakeChat(script=TOOL_SCRIPT, eos=True)
    tools = [{"type": "function", "name": "get_weather", "parameters": WEATHER}]
    with live(tmp_path, fake) as url:
        api = oai(url)
        first = api.responses.create(model="m", input="Weather in Paris?", tools=tools)
        (call,) = first.output
        assert (call.type, call.name, json.loads(call.arguments)) == (
            "function_call",
            "get_weather",
            {"city": "Paris"},
        )
        events = list(api.responses.create(model="m", input="Paris?", tools=tools, stream=True))
        sequence = "".join(event.type + " " for event in events)
        assert RESPONSES_ORDER.fullmatch(sequence), sequence
        args = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        assert json.loads("".join(args)) == {"city": "Paris"}
        output = {"type": "function_call_output", "call_id": call.call_id, "output": "18 C"}
        api.responses.create(model="m", input=[output], previous_response_id=first.id, tools=tools)
        sent = fake.calls[-1]["messages"]
        assert [m["role"] for m in sent] == ["user", "assistant", "tool"]
        assert sent[0]["content"] == "Weather in Paris?"
        assert sent[1]["tool_calls"][0]["id"] == call.call_id
        assert (sent[2]["tool_call_id"], sent[2]["content"]) == (call.call_id, "18 C")


def test_responses_json_schema_images_store_and_delete(tmp_path) -> None:
    fake = FakeChat(eos=True)
    with live(tmp_path, fake) as url:
        api = oai(url)
        fmt = {"type": "json_schema", "name": "weather", "schema": WEATHER, "strict": True}
        image = {"type": "input_image", "image_url": "data:image/png;base64," + png_base64("blue")}
        item = {"role": "user", "content": [{"type": "input_text", "text": "Which?"}, image]}
        response = api.responses.create(model="m", input=[item], text={"format": fmt})
        assert json.loads(fake.calls[-1]["params"].constraint.json_schema) == WEATHER
        assert fake.calls[-1]["images"][0].getpixel((0, 0)) == (0, 0, 255)
        assert api.responses.retrieve(response.id).id == response.id
        assert [i.type for i in api.responses.input_items.list(response.id).data] == ["message"]
        assert api.responses.input_items.list(response.id, order="asc").data[0].role == "user"
        bad_order = httpx.get(f"{url}/v1/responses/{response.id}/input_items?order=up")
        assert bad_order.status_code == 400 and bad_order.json()["error"]["param"] == "order"
        api.responses.delete(response.id)
        with pytest.raises(openai.NotFoundError):
            api.responses.retrieve(response.id)
        unstored = api.responses.create(model="m", input="Hi", store=False)
        with pytest.raises(openai.NotFoundError):
            api.responses.retrieve(unstored.id)
        with pytest.raises(openai.NotFoundError):
            api.responses.create(model="m", input="Hi", previous_response_id=unstored.id)
        short = api.responses.create(model="m", input="Hi", max_output_tokens=2)
        assert short.status == "incomplete"
        assert short.incomplete_details.reason == "max_output_tokens"


def test_responses_bad_input_is_an_openai_error(tmp_path) -> None:
    with live(tmp_path, FakeChat()) as url:
        api = oai(url)
        with pytest.raises(openai.BadRequestError) as web:
            api.responses.create(model="m", input="Hi", tools=[{"type": "web_search"}])
        assert web.value.body["param"] == "tools[0].type"
        with pytest.raises(openai.BadRequestError) as missing:
            api.responses.create(model="m", input=None)
        assert missing.value.body["param"] == "input"
        with pytest.raises(openai.BadRequestError) as empty:
            api.responses.create(model="m", input=[])
        assert empty.value.body["param"] == "input"
        with pytest.raises(openai.BadRequestError) as part:
            api.responses.create(
                model="m", input=[{"role": "user", "content": [{"type": "input_file"}]}]
            )
        assert part.value.body["param"] == "input[0].content[0].type"


# ---- legacy completions -----------------------------------------------------------------------


def test_completions_raw_prompt_echo_stop_logprobs_and_streaming(tmp_path) -> None:
    fake = FakeChat(eos=True)
    with live(tmp_path, fake) as url:
        api = oai(url)
        done = api.completions.create(model="m", prompt="Once upon", max_tokens=3, echo=True)
        assert fake.calls[-1] == {"prompt": "Once upon", "params": fake.calls[-1]["params"]}
        assert done.object == "text_completion"
        assert done.choices[0].text == "Once uponHello world,"
        assert done.choices[0].finish_reason == "length"
        assert done.usage.prompt_tokens == 2 and done.usage.completion_tokens == 3
        stopped = api.completions.create(model="m", prompt="x", stop=[" this"], logprobs=1)
        choice = stopped.choices[0]
        assert (choice.text, choice.finish_reason) == ("Hello world,", "stop")
        assert choice.logprobs.tokens[:2] == ["Hello", " world"]
        assert choice.logprobs.text_offset[:3] == [0, 5, 11]
        chunks = list(
            api.completions.create(model="m", prompt=["a", "b c"], max_tokens=2, stream=True)
        )
        texts = {0: "", 1: ""}
        for chunk in chunks:
            texts[chunk.choices[0].index] += chunk.choices[0].text
        assert texts == {0: "Hello world", 1: "Hello world"}
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        assert finishes == ["length", "length"]


def test_completions_refuse_what_they_cannot_do(tmp_path) -> None:
    with live(tmp_path, FakeChat()) as url:
        api = oai(url)
        with pytest.raises(openai.BadRequestError) as suffix:
            api.completions.create(model="m", prompt="def f(", suffix="return 1")
        assert suffix.value.body["param"] == "suffix"
        with pytest.raises(openai.BadRequestError) as tokens:
            api.completions.create(model="m", prompt=[1, 2, 3])
        assert tokens.value.body["param"] == "prompt"
        with pytest.raises(openai.BadRequestError) as echo:
            api.completions.create(model="m", prompt="x", echo=True, logprobs=1)
        assert echo.value.body["param"] == "logprobs"
