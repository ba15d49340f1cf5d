"""The chat route with a scripted fake runner: wire shapes, validation, thinking, tools (tier 1)."""

from __future__ import annotations

import base64
import io
import json
import threading
from pathlib import Path

import pytest
from PIL import Image

from engine.chat import response as chat_response
from tests.engine.fakes import FakeChat
from tests.engine.test_app import assert_error, serving

USER = [{"role": "user", "content": "Hi"}]
THINKING = ("<|channel>", "thought", "\n", "Let me ", "think", "<channel|>", "The ", "answer", ".")


def post(client, body: dict):
    return client.post("/v1/chat/completions", json={"messages": USER, **body})[1]


def sse(response) -> list[dict]:
    lines = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def joined(chunks: list[dict], key: str) -> str:
    return "".join(c["choices"][0]["delta"].get(key) or "" for c in chunks if c["choices"])


def png(color: str = "red", size: tuple[int, int] = (8, 8), kind: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, kind)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif", "BMP": "bmp"}[kind]
    return f"data:image/{mime};base64," + base64.b64encode(buffer.getvalue()).decode()


def test_thinking_goes_to_reasoning_content_never_content(tmp_path: Path) -> None:
    with serving(tmp_path, "chat", FakeChat(script=THINKING, eos=True)) as (client, _):
        body = post(client, {}).json
        message = body["choices"][0]["message"]
        assert message["content"] == "The answer."
        assert message["reasoning_content"] == message["reasoning"] == "Let me think"
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == len(THINKING) + 1
        assert body["usage"]["completion_tokens_details"]["reasoning_tokens"] == 6
        chunks = sse(post(client, {"stream": True}))
        assert joined(chunks, "content") == "The answer."
        assert joined(chunks, "reasoning_content") == joined(chunks, "reasoning") == "Let me think"
        assert all("<" not in (c["choices"][0]["delta"].get("content") or "") for c in chunks)


def test_thinking_that_eats_the_budget_says_length(tmp_path: Path) -> None:
    with serving(tmp_path, "chat", FakeChat(script=THINKING)) as (client, _):
        body = post(client, {"max_tokens": 4}).json
        choice = body["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"]["content"] == ""
        assert choice["message"]["reasoning_content"] == "Let me "


def test_prompt_that_opens_the_channel_starts_in_reasoning(tmp_path: Path) -> None:
    fake = FakeChat(script=("pondering", "<channel|>", "Yes"), prompt_suffix="<|channel>thought\n")
    with serving(tmp_path, "chat", fake) as (client, _):
        message = post(client, {}).json["choices"][0]["message"]
        assert (message["reasoning_content"], message["content"]) == ("pondering", "Yes")


@pytest.mark.parametrize(
    "extra, expected",
    [
        ({}, None),
        ({"chat_template_kwargs": {"enable_thinking": False}}, False),
        ({"chat_template_kwargs": {"enable_thinking": True}}, True),
        ({"reasoning_effort": "none"}, False),
        ({"reasoning_effort": "high"}, True),
    ],
)
def test_thinking_switch_reaches_the_template(tmp_path: Path, extra: dict, expected) -> None:
    with serving(tmp_path, "chat") as (client, fake):
        assert post(client, {**extra, "max_tokens": 1}).status == 200
        assert fake.calls[-1]["thinking"] is expected


def test_incoming_reasoning_content_and_tool_history_are_accepted(tmp_path: Path) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello", "reasoning_content": "greet back"},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    with serving(tmp_path, "chat") as (client, fake):
        response = client.post(
            "/v1/chat/completions", json={"messages": messages, "max_tokens": 2}
        )[1]
        assert response.status == 200, response.text
        assert [m["role"] for m in fake.calls[-1]["messages"]][-2:] == ["assistant", "tool"]


TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]
TOOL_SCRIPT = ("Sure", "<|tool_call>", "call:get_weather{", "city:", '<|"|>Paris<|"|>', "}")
TOOL_SCRIPT += ("<tool_call|>",)


def test_tool_calls_parsed_streamed_and_not(tmp_path: Path) -> None:
    with serving(tmp_path, "chat", FakeChat(script=TOOL_SCRIPT, eos=True)) as (client, fake):
        choice = post(client, {"tools": TOOLS}).json["choices"][0]
        assert choice["finish_reason"] == "tool_calls"
        assert choice["message"]["content"] == "Sure"
        (call,) = choice["message"]["tool_calls"]
        assert call["type"] == "function" and call["id"].startswith("call_")
        assert call["function"]["name"] == "get_weather"
        assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
        assert fake.calls[-1]["tools"] == TOOLS
        chunks = sse(post(client, {"tools": TOOLS, "stream": True}))
        calls = [c["choices"][0]["delta"].get("tool_calls") for c in chunks if c["choices"]]
        calls = [c for c in calls if c]
        assert len(calls) == 1 and calls[0][0]["index"] == 0
        assert json.loads(calls[0][0]["function"]["arguments"]) == {"city": "Paris"}
        assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_tool_choice_none_hides_tools_and_parses_nothing(tmp_path: Path) -> None:
    with serving(tmp_path, "chat", FakeChat(script=TOOL_SCRIPT, eos=True)) as (client, fake):
        choice = post(client, {"tools": TOOLS, "tool_choice": "none"}).json["choices"][0]
        assert fake.calls[-1]["tools"] is None
        assert "tool_calls" not in choice["message"] and choice["finish_reason"] == "stop"


def test_tool_choice_required_and_named_constrain_the_answer(tmp_path: Path) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    with serving(tmp_path, "chat") as (client, fake):
        for choice in ("required", named):
            assert post(client, {"tools": TOOLS, "tool_choice": choice}).status == 200
            constraint = fake.calls[-1]["params"].constraint
            assert [name for name, _ in constraint.tools] == ["get_weather"]
        assert post(client, {"tools": TOOLS}).status == 200
        assert fake.calls[-1]["params"].constraint is None


def test_response_format_builds_a_constraint(tmp_path: Path) -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    with serving(tmp_path, "chat") as (client, fake):
        post(client, {"response_format": {"type": "json_object"}})
        assert fake.calls[-1]["params"].constraint.json_schema is None
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        post(client, {"response_format": fmt})
        assert json.loads(fake.calls[-1]["params"].constraint.json_schema) == schema
        post(client, {"response_format": {"type": "text"}})
        assert fake.calls[-1]["params"].constraint is None


def test_stop_string_cuts_content_with_finish_stop(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, _):
        choice = post(client, {"stop": [" is", "zzz"]}).json["choices"][0]
        assert choice["message"]["content"] == "Hello world, this"
        assert choice["finish_reason"] == "stop"
        chunks = sse(post(client, {"stop": " fake", "stream": True}))
        assert joined(chunks, "content") == "Hello world, this is"
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_max_completion_tokens_and_default_is_the_context(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, fake):
        body = post(client, {"max_completion_tokens": 2}).json
        assert body["usage"]["completion_tokens"] == 2
        assert body["choices"][0]["finish_reason"] == "length"
        post(client, {})
        assert fake.calls[-1]["params"].max_tokens == 64 - 1  # context minus the prompt


def test_sampling_defaults_and_overrides(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, fake):
        post(client, {"max_tokens": 1})
        params = fake.calls[-1]["params"]
        assert (params.temperature, params.top_p, params.top_k) == (1.0, 0.95, 64)
        sampling = {
            "temperature": 0.2,
            "top_p": 0.5,
            "top_k": 3,
            "min_p": 0.1,
            "seed": 9,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.25,
            "repetition_penalty": 1.1,
        }
        post(client, {"max_tokens": 1, **sampling})
        params = fake.calls[-1]["params"]
        assert {k: getattr(params, k) for k in sampling} == sampling


def test_logprobs_streamed_and_not(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, _):
        body = post(client, {"max_tokens": 2, "logprobs": True, "top_logprobs": 2}).json
        entries = body["choices"][0]["logprobs"]["content"]
        assert [e["token"] for e in entries] == ["Hello", " world"]
        assert entries[0]["logprob"] == -0.5 and entries[0]["bytes"] == list(b"Hello")
        assert [t["token"] for t in entries[0]["top_logprobs"]] == ["Hello", "<7>"]
        chunks = sse(post(client, {"max_tokens": 2, "logprobs": True, "stream": True}))
        streamed = [
            e
            for c in chunks
            if c["choices"]
            for e in (c["choices"][0]["logprobs"] or {}).get("content", [])
        ]
        assert [e["token"] for e in streamed] == ["Hello", " world"]


def test_keepalive_comments_while_waiting(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(chat_response, "KEEPALIVE_S", 0.05)
    gate = threading.Event()
    threading.Timer(0.5, gate.set).start()
    with serving(tmp_path, "chat", FakeChat(gate=gate)) as (client, _):
        response = post(client, {"max_tokens": 2, "stream": True})
        assert ": keepalive" in response.text
        assert sse(response)[0]["choices"][0]["delta"]["role"] == "assistant"


def test_several_images_of_every_type(tmp_path: Path) -> None:
    parts = [{"type": "text", "text": "Compare"}]
    for kind in ("PNG", "JPEG", "WEBP", "GIF"):
        parts.append({"type": "image_url", "image_url": {"url": png("blue", kind=kind)}})
    messages = [{"role": "user", "content": parts}]
    with serving(tmp_path, "chat") as (client, fake):
        response = client.post("/v1/chat/completions", json={"messages": messages})[1]
        assert response.status == 200, response.text
        images = fake.calls[-1]["images"]
        assert len(images) == 4 and all(im.mode == "RGB" for im in images)


def _image_error(client, url: str) -> dict:
    part = {"type": "image_url", "image_url": {"url": url}}
    messages = [{"role": "user", "content": [part]}]
    return assert_error(client.post("/v1/chat/completions", json={"messages": messages})[1], 400)


def test_bad_images_are_400(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, _):
        assert "Unsupported image type BMP" in _image_error(client, png(kind="BMP"))["message"]
        bomb = _image_error(client, png(size=(8000, 6000)))
        assert "over the limit" in bomb["message"] and bomb["code"] == "image_too_large"
        error = _image_error(client, "http://127.0.0.1:9/x.png")
        assert error["code"] == "image_url_not_allowed" and "--allow-image-urls" in error["message"]
        assert error["param"] == "messages[0].content[0].image_url"
        svg = "data:image/svg+xml;base64," + base64.b64encode(b"<svg></svg>").decode()
        assert "could not be decoded" in _image_error(client, svg)["message"]


def test_image_urls_are_fetched_when_allowed(tmp_path: Path) -> None:
    import http.server

    data = base64.b64decode(png("green").split(",")[1])

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the http.server API
            self.send_response(200)
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{httpd.server_port}/img.png"
    part = {"type": "image_url", "image_url": {"url": url}}
    try:
        with serving(tmp_path, "chat", chat_allow_image_urls=True) as (client, fake):
            messages = [{"role": "user", "content": [part]}]
            response = client.post("/v1/chat/completions", json={"messages": messages})[1]
            assert response.status == 200, response.text
            assert fake.calls[-1]["images"][0].getpixel((0, 0)) == (0, 128, 0)
    finally:
        httpd.shutdown()


@pytest.mark.parametrize(
    "body, param",
    [
        ({"tools": "x"}, "tools"),
        ({"tools": [{"type": "function"}]}, "tools[0]"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "x"}}},
            "tool_choice",
        ),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format.json_schema.schema",
        ),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"max_completion_tokens": -1}, "max_completion_tokens"),
        ({"min_p": 2}, "min_p"),
        ({"top_k": -1}, "top_k"),
        ({"frequency_penalty": 5}, "frequency_penalty"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"stop": ["a"] * 17}, "stop"),
        (
            {"chat_template_kwargs": {"enable_thinking": "yes"}},
            "chat_template_kwargs.enable_thinking",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool_calls": "no"}]},
            "messages[0].tool_calls",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": 3}]}]},
            "messages[0].content[0].text",
        ),
    ],
)
def test_more_bad_requests(tmp_path: Path, body: dict, param: str) -> None:
    with serving(tmp_path, "chat") as (client, _):
        assert_error(post(client, body), 400, param=param)
        assert_error(post(client, {**body, "stream": True}), 400, param=param)


# ---- budgets: images and prompt length before the expensive work ------------------------------


def _image_parts(urls: list[str]) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    return [{"role": "user", "content": [{"type": "text", "text": "Look"}, *parts]}]


def _png_header(width: int, height: int) -> str:
    """A PNG whose header says `width` x `height` but whose pixel data stops after a row."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data))
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
    return "data:image/png;base64," + base64.b64encode(raw + chunk(b"IEND", b"")).decode()


def test_too_many_images_are_refused_before_any_is_decoded(tmp_path: Path) -> None:
    garbage = "data:image/png;base64," + base64.b64encode(b"not an image").decode()
    with serving(tmp_path, "chat", chat_max_images=3) as (client, fake):
        body = {"messages": _image_parts([garbage] * 4)}
        error = assert_error(client.post("/v1/chat/completions", json=body)[1], 400)
        assert error["code"] == "too_many_images" and error["param"] == "messages"
        assert "4 images, over the limit of 3" in error["message"]
        assert (error["images"], error["max_images"]) == (4, 3)
        ok = client.post("/v1/chat/completions", json={"messages": _image_parts([png()] * 3)})[1]
        assert ok.status == 200 and len(fake.calls[-1]["images"]) == 3


def test_the_images_pixels_together_are_capped_from_their_headers(tmp_path: Path) -> None:
    with serving(tmp_path, "chat", chat_max_image_pixels=100_000_000) as (client, fake):
        body = {"messages": _image_parts([_png_header(6000, 6000)] * 3)}
        error = assert_error(client.post("/v1/chat/completions", json=body)[1], 400)
        assert error["code"] == "images_too_large"
        assert (
            "3 images hold 108000000 pixels together, over the limit of 100000000"
            in (error["message"])
        )
        # Two of them fit: then they are decoded, and these have no pixels to decode.
        body = {"messages": _image_parts([_png_header(6000, 6000)] * 2)}
        error = assert_error(client.post("/v1/chat/completions", json=body)[1], 400)
        assert "could not be decoded" in error["message"]
        assert fake.calls == []


def test_a_prompt_longer_than_the_context_can_hold_is_refused_untokenized(tmp_path: Path) -> None:
    fake = FakeChat()
    fake.max_token_chars = 16  # context 64 tokens: at most 1024 characters
    with serving(tmp_path, "chat", fake) as (client, _):
        text = "word " * (3 * 1024 * 1024 // 5)  # 3 MiB
        body = {"messages": [{"role": "user", "content": [{"type": "text", "text": text}]}]}
        error = assert_error(client.post("/v1/chat/completions", json=body)[1], 400)
        assert error["code"] == "context_length_exceeded"
        assert (error["n_prompt_chars"], error["n_ctx"]) == (len(text), 64)
        assert fake.calls == []  # never rendered nor tokenized
        short = {"messages": [{"role": "user", "content": "x" * 1000}]}
        assert client.post("/v1/chat/completions", json=short)[1].status == 200
        assert len(fake.calls) == 1
