"""Property tests of the parsers: whatever a client sends, each gives a parsed value or the
project's 4xx error (InvalidRequest and its kin), never another exception. Derandomized and
bounded, so the run is reproducible and short."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from sanic.compat import Header
from sanic.request import File, RequestParameters

from engine.app import _check_host, _check_origin, _host_name
from engine.chat import anthropic, completions, responses
from engine.chat import request as chat
from engine.config import Config, build_config
from engine.embeddings.request import parse_input
from engine.errors import ApiError, InvalidRequest, PermissionDenied
from engine.keepalive import parse_keep_alive
from engine.protocol import cannot_be_http
from engine.speech.request import Fields, inference_options, openai_options
from engine.validation import (
    optional_array,
    optional_bool,
    optional_number,
    optional_object,
    optional_string,
    parse_json_body,
    required,
)

FUZZ = settings(max_examples=150, deadline=None, derandomize=True, database=None)

SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=2**62, max_value=2**70)
    | st.floats()
    | st.text(max_size=20)
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)


def bodies(*names: str, values: st.SearchStrategy = JSON_VALUES) -> st.SearchStrategy:
    """JSON objects whose keys are mostly the fields a parser reads."""
    keys = st.sampled_from(names) | st.text(max_size=6)
    return st.dictionaries(keys, values, max_size=len(names) + 1)


def parses_or_refuses(parse: Any, *args: Any, **kwargs: Any) -> Any:
    """parse(*args, **kwargs)'s value, or None when it refuses with a client error."""
    try:
        return parse(*args, **kwargs)
    except ApiError as exc:
        assert 400 <= exc.status < 500, exc
        assert exc.message
        return None


# ---- the JSON body loader ------------------------------------------------------------------

MEDIA = st.sampled_from(
    ["", "application/json", "application/json; charset=utf-8", "application/x-www-form-urlencoded"]
    + ["text/plain", "application/vnd.api+json", "multipart/form-data; boundary=x"]
)
JSON_TEXT = JSON_VALUES.map(lambda v: json.dumps(v).encode())
SPLICED = st.tuples(JSON_TEXT, st.binary(max_size=8), st.integers(0, 64)).map(
    lambda t: t[0][: t[2]] + t[1] + t[0][t[2] :]
)
RAW_BODIES = (
    JSON_TEXT
    | SPLICED
    | st.binary(max_size=64)
    | st.sampled_from(
        [
            b"\\ud800",
            b'{"a": "\\udfff"}',
            b"[" * 5000,
            b'{"n": ' + b"9" * 5000 + b"}",
            b"\xff\xfe{}",
        ]
    )
)


def fake_request(body: bytes, media: str) -> SimpleNamespace:
    headers = Header([("content-type", media)] if media else [])
    return SimpleNamespace(headers=headers, body=body, ctx=SimpleNamespace())


@FUZZ
@given(raw=RAW_BODIES, media=MEDIA)
def test_json_body_is_an_object_or_a_4xx(raw: bytes, media: str) -> None:
    body = parses_or_refuses(parse_json_body, fake_request(raw, media))
    assert body is None or isinstance(body, dict)


# ---- field readers ---------------------------------------------------------------------------

NAMES = ("x", "temperature", "n")


@FUZZ
@given(body=bodies(*NAMES), low=st.none() | st.integers(-5, 5), integer=st.booleans())
def test_numbers_are_in_range_or_a_400(body: dict, low: int | None, integer: bool) -> None:
    high = None if low is None else low + 10
    bounds = {"minimum": low, "maximum": high, "integer": integer}
    for name in NAMES:
        value = parses_or_refuses(optional_number, body, name, **bounds)
        if value is not None:
            assert not isinstance(value, bool)
            assert isinstance(value, int) or not integer
            assert low is None or low <= value <= high


@FUZZ
@given(body=bodies(*NAMES))
def test_typed_fields_have_their_type_or_a_400(body: dict) -> None:
    for name in NAMES:
        assert parses_or_refuses(optional_bool, body, name) in (True, False, None)
        text = parses_or_refuses(optional_string, body, name, ("a", "b"))
        assert text in ("a", "b", None)
        assert isinstance(parses_or_refuses(optional_object, body, name), dict | None)
        assert isinstance(parses_or_refuses(optional_array, body, name), list | None)
        parses_or_refuses(required, body, name)


# ---- chat bodies (OpenAI, Anthropic, Responses, legacy) --------------------------------------

PART = st.fixed_dictionaries(
    {"type": st.sampled_from(["text", "image_url", "input_audio", "tool_use", "x"])},
    optional={"text": JSON_VALUES, "image_url": JSON_VALUES, "input_audio": JSON_VALUES},
)
MESSAGE = st.fixed_dictionaries(
    {"role": st.sampled_from([*chat.ROLES, "bot"]) | JSON_VALUES},
    optional={
        "content": st.text(max_size=10) | st.lists(PART | JSON_VALUES, max_size=3) | JSON_VALUES,
        "tool_calls": JSON_VALUES,
        "reasoning_content": JSON_VALUES,
    },
)
SCHEMA = st.sampled_from([{"type": "object"}, {"type": "string", "pattern": "("}, {"x": 1}])
CHAT_VALUES = (
    JSON_VALUES
    | st.lists(MESSAGE, max_size=3)
    | st.fixed_dictionaries({"type": st.sampled_from(["json_schema", "json_object", "text"])})
    | st.fixed_dictionaries({"type": st.just("json_object"), "schema": SCHEMA | JSON_VALUES})
    | st.fixed_dictionaries({"function": st.fixed_dictionaries({"name": st.text(max_size=3)})})
)
CHAT_FIELDS = (
    "messages",
    "temperature",
    "top_p",
    "top_k",
    "seed",
    "max_tokens",
    "stop",
    "n",
    "tools",
    "tool_choice",
    "response_format",
    "reasoning_effort",
    "chat_template_kwargs",
    "logprobs",
    "top_logprobs",
)


def parse_chat_fields(body: dict[str, Any]) -> None:
    """What `parse_request` reads before it needs the app (decoding, the queue)."""
    chat.parse_messages(required(body, "messages"))
    chat.parse_n(body, 4)
    tools = chat.parse_tools(body)
    choice = chat.parse_tool_choice(body, tools)
    thinking = chat.parse_thinking(body)
    chat.build_constraint(chat.parse_response_format(body), tools, choice, thinking)
    chat.parse_sampling(body)
    chat.parse_max_tokens(body)
    chat.parse_stop(body.get("stop"))
    chat.parse_logprobs(body)


@FUZZ
@given(body=bodies(*CHAT_FIELDS, values=CHAT_VALUES))
def test_chat_bodies_parse_or_are_a_400(body: dict) -> None:
    parses_or_refuses(parse_chat_fields, body)


ANTHROPIC_FIELDS = ("messages", "system", "max_tokens", "tools", "tool_choice", "thinking")
ANTHROPIC_FIELDS += ("output_config", "stop_sequences", "metadata", "temperature")


@FUZZ
@given(body=bodies(*ANTHROPIC_FIELDS, values=CHAT_VALUES), count=st.booleans())
def test_anthropic_bodies_translate_or_are_a_400(body: dict, count: bool) -> None:
    translated = parses_or_refuses(anthropic.chat_body, body, for_count=count)
    if translated is not None:
        parses_or_refuses(parse_chat_fields, translated)


RESPONSES_FIELDS = ("input", "instructions", "max_output_tokens", "tools", "tool_choice", "text")
RESPONSES_FIELDS += ("reasoning", "temperature")
INPUT_ITEMS = st.lists(
    st.fixed_dictionaries(
        {},
        optional={
            "type": st.sampled_from(["message", "function_call", "function_call_output", "x"]),
            "role": st.sampled_from(["user", "assistant", "system"]),
            "content": st.text(max_size=5) | st.lists(PART, max_size=2) | JSON_VALUES,
            "call_id": JSON_VALUES,
            "name": JSON_VALUES,
            "arguments": JSON_VALUES,
            "output": JSON_VALUES,
        },
    ),
    max_size=3,
)


@FUZZ
@given(body=bodies(*RESPONSES_FIELDS, values=CHAT_VALUES | INPUT_ITEMS))
def test_responses_bodies_translate_or_are_a_400(body: dict) -> None:
    translated = parses_or_refuses(responses.chat_body, body, [])
    if translated is not None:
        parses_or_refuses(parse_chat_fields, translated)


@FUZZ
@given(value=JSON_VALUES | st.lists(st.text(max_size=3), max_size=20))
def test_legacy_prompts_are_strings_or_a_400(value: Any) -> None:
    prompts = parses_or_refuses(completions.parse_prompts, value)
    assert prompts is None or all(isinstance(p, str) for p in prompts)


# ---- embeddings --------------------------------------------------------------------------------


@FUZZ
@given(value=JSON_VALUES | st.lists(st.integers() | st.lists(st.integers(), max_size=3)))
def test_embeddings_input_is_texts_or_tokens_or_a_400(value: Any) -> None:
    parsed = parses_or_refuses(parse_input, value, 8)
    if parsed is not None:
        texts, tokens = parsed
        assert (texts is None) != (tokens is None)


# ---- the speech forms -----------------------------------------------------------------------

FORM_FIELDS = (
    "response_format",
    "language",
    "temperature",
    "temperature_inc",
    "best_of",
    "beam_size",
    "max_len",
    "offset_t",
    "duration",
    "no_timestamps",
    "detect_language",
    "translate",
    "vad",
    "vad_threshold",
    "vad_max_speech_duration_s",
    "stream",
    "timestamp_granularities[]",
)
FORM_TEXT = st.text(max_size=12) | st.sampled_from(
    ["1e400", "nan", "-inf", "1" * 400, "true", "0x10", "1_000", "\x00", "auto", "verbose_json"]
    + ["1e-300", "5e-324", "0.001"]
)
FORMS = st.dictionaries(
    st.sampled_from(FORM_FIELDS) | st.text(max_size=4), st.lists(FORM_TEXT, min_size=1, max_size=2)
)


def form_request(form: dict[str, list[str]]) -> SimpleNamespace:
    files = RequestParameters({"file": [File("audio/wav", b"RIFF", "a.wav")]})
    return SimpleNamespace(form=RequestParameters(form), files=files)


@FUZZ
@given(form=FORMS, task=st.sampled_from(["transcribe", "translate"]))
def test_speech_forms_parse_or_are_a_400(form: dict, task: str) -> None:
    fields = Fields(form_request(form))
    config = build_config({"stt_vad": "vad" in form})
    parses_or_refuses(inference_options, fields, config)
    parses_or_refuses(openai_options, fields, task, config)


@FUZZ
@given(value=JSON_VALUES | FORM_TEXT)
def test_keep_alive_is_seconds_or_a_value_error(value: Any) -> None:
    try:
        seconds = parse_keep_alive(value)
    except ValueError:
        return
    assert seconds is None or seconds >= 0


# ---- Host and Origin ---------------------------------------------------------------------------

HOSTS = st.text(max_size=30) | st.sampled_from(
    ["127.0.0.1:8080", "[::1]:1", "localhost", "evil.example", "[::1", "a:99999", "LOCALHOST:80"]
)
ORIGINS = st.text(max_size=30) | st.sampled_from(
    ["http://localhost:3000", "https://evil.example", "null", "file://", "http://127.0.0.1.x"]
)


@FUZZ
@given(hosts=st.lists(HOSTS, max_size=2), origin=st.none() | ORIGINS)
def test_host_and_origin_pass_or_are_refused(hosts: list[str], origin: str | None) -> None:
    pairs = [("host", h) for h in hosts] + ([("origin", origin)] if origin is not None else [])
    request = SimpleNamespace(headers=Header(pairs))
    for header in hosts:
        assert _host_name(header) is None or isinstance(_host_name(header), str)
    allowed = {"127.0.0.1", "localhost", "[::1]"}
    try:
        _check_host(request, allowed)
        _check_origin(request, Config())
    except (InvalidRequest, PermissionDenied):
        return
    if len(hosts) == 1:
        assert _host_name(hosts[0]) in allowed


# ---- the request line ------------------------------------------------------------------------

METHODS = st.sampled_from(["GET", "POST", "HEAD", "OPTIONS", "DELETE", "PRI", "get"])
TARGETS = st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30)


@FUZZ
@given(method=METHODS, target=TARGETS, version=st.sampled_from(["1.1", "1.0"]), cut=st.integers())
def test_any_start_of_an_http_request_is_let_through(
    method: str, target: str, version: str, cut: int
) -> None:
    request = f"{method} {target} HTTP/{version}\r\nHost: x\r\n\r\n".encode()
    assert not cannot_be_http(request[: abs(cut) % (len(request) + 1)])


@FUZZ
@given(noise=st.binary(min_size=1, max_size=64))
def test_bytes_no_request_line_starts_with_are_recognised(noise: bytes) -> None:
    first = noise.lstrip(b"\r\n")[:1]
    if first and not (first.isalnum() or first in b"!#$%&'*+.^_`|~-"):
        assert cannot_be_http(noise)
