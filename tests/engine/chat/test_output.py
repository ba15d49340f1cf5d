"""OutputParser: reasoning / content / tool calls split from any slicing of the raw text."""

from __future__ import annotations

import json

import pytest

from engine.chat.output import Delta, OutputParser, parse_tool_calls

RAW = (
    "<|channel>thought\nThe user says hi 你好 😀<channel|>Hello <turn|>there"
    '<|tool_call>call:get_weather{city:<|"|>Paris, {FR}<|"|>,days:3,'
    'opts:{metric:true,tags:[<|"|>a<|"|>,null]}}<tool_call|>'
)


def parse(text: str, step: int, **options) -> Delta:
    parser, out = OutputParser(**options), Delta()
    for i in range(0, len(text), step):
        out.extend(parser.feed(text[i : i + step]))
    out.extend(parser.finish())
    return out


@pytest.mark.parametrize("step", [1, 2, 3, 7, 1000])
def test_any_slicing_gives_the_same_split(step: int) -> None:
    out = parse(RAW, step)
    assert out.reasoning == "The user says hi 你好 😀"
    assert out.content == "Hello there"
    (call,) = out.tool_calls
    assert call.name == "get_weather"
    assert json.loads(call.arguments) == {
        "city": "Paris, {FR}",
        "days": 3,
        "opts": {"metric": True, "tags": ["a", None]},
    }


def test_partial_markers_are_held_back_not_leaked() -> None:
    parser = OutputParser()
    assert parser.feed("Hi <|chan").content == "Hi "
    delta = parser.feed("nel>thought\nhmm")
    assert delta.content == "" and "<" not in delta.reasoning
    assert parser.feed("<chan").reasoning == ""
    assert parser.feed("nel|>done").content == "done"


def test_a_lone_angle_bracket_is_content_at_the_end() -> None:
    assert parse("a < b and x <|t", 1).content == "a < b and x <|t"


def test_prompt_opened_channel_starts_in_reasoning() -> None:
    out = parse("thinking here<channel|>answer", 2, reasoning=True)
    assert (out.reasoning, out.content) == ("thinking here", "answer")


def test_unclosed_thinking_stays_reasoning() -> None:
    out = parse("<|channel>thought\nstill going", 3)
    assert (out.reasoning, out.content) == ("still going", "")


def test_tool_calls_off_keep_the_text_as_content() -> None:
    out = parse('<|tool_call>call:f{a:<|"|>x<|"|>}<tool_call|>', 4, tools=False)
    assert out.tool_calls == [] and out.content == 'call:f{a:"x"}'


def test_malformed_or_unclosed_tool_calls_fall_back_to_content() -> None:
    assert parse("<|tool_call>call:f{a:<tool_call|>", 3).content == "call:f{a:"
    assert parse("<|tool_call>call:f{a:1", 3).content == "call:f{a:1"


def test_json_arguments_and_several_calls() -> None:
    calls = parse_tool_calls('call:a{"x": "q\\"uote"} call:b{}')
    assert [c.name for c in calls] == ["a", "b"]
    assert json.loads(calls[0].arguments) == {"x": 'q"uote'}
    assert calls[0].id != calls[1].id
    assert parse_tool_calls("nonsense") is None


def test_control_tokens_never_reach_content() -> None:
    out = parse("<bos>A<|turn>B<|think|>C<eos><|image|>D<end_of_turn>", 2)
    assert out.content == "ABCD"
