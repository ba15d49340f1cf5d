"""ChatRunner on a tiny random Gemma 4 (vision) checkpoint converted by mlx-vlm."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")

from PIL import Image  # noqa: E402

from engine.runners.chat import (  # noqa: E402
    ChatParams,
    ChatRunner,
    ChatStep,
    PromptTooLongError,
    StopMatcher,
)
from tests.tiny.gemma4 import build_gemma4_mlx  # noqa: E402

GREEDY = ChatParams(
    max_tokens=16, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=None, stop=()
)
USER = [{"role": "user", "content": "Hello, how are you?"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma4_mlx(tmp_path_factory.mktemp("gemma4") / "mlx")


@pytest.fixture(scope="module")
def runner(model_dir: Path) -> ChatRunner:
    return ChatRunner.load(model_dir, "tiny-gemma4")


def run(runner: ChatRunner, prompt, params: ChatParams = GREEDY, cancel=lambda: False):
    steps = list(runner.generate(prompt, params, cancel))
    for step in steps:
        assert isinstance(step, ChatStep)
        assert "\ufffd" not in step.text
    assert [s.finish_reason is not None for s in steps] == [False] * (len(steps) - 1) + [True]
    return steps


def text_of(steps: list[ChatStep]) -> str:
    return "".join(s.text for s in steps)


def image_prompt(runner: ChatRunner, color: str):
    content = [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,"}},
        {"type": "text", "text": "What is in this image?"},
    ]
    return runner.prepare(
        [{"role": "user", "content": content}], [Image.new("RGB", (64, 48), color)]
    )


def test_checkpoint_layout(model_dir: Path) -> None:
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "gemma4"
    assert config["audio_config"] is None
    assert config["text_config"]["layer_types"] == [
        "sliding_attention",
        "full_attention",
        "sliding_attention",
        "full_attention",
    ]
    total = sum(p.stat().st_size for p in model_dir.iterdir())
    assert total < 2_000_000  # float32 MLX weights of a ~290k-parameter model


def test_load(runner: ChatRunner) -> None:
    assert runner.model_id == "tiny-gemma4"
    assert runner.context_length == 4096
    turn_end = runner.tokenizer.convert_tokens_to_ids("<turn|>")
    assert {runner.tokenizer.eos_token_id, turn_end} <= runner.eos_token_ids
    defaults = runner.generation_defaults()
    assert defaults == {"temperature": 1.0, "top_p": 0.95, "top_k": 64, "min_p": 0.0}


def test_prepare_renders_template_with_one_bos(runner: ChatRunner) -> None:
    system = [{"role": "system", "content": "Be brief."}]
    prompt = runner.prepare(system + USER, [])
    assert prompt.text == (
        "<bos><|turn>system\nBe brief.<turn|>\n"
        "<|turn>user\nHello, how are you?<turn|>\n<|turn>model\n"
    )
    ids = prompt.input_ids.tolist()[0]
    assert ids[0] == runner.tokenizer.bos_token_id
    assert ids.count(runner.tokenizer.bos_token_id) == 1
    assert prompt.n_tokens == len(ids)


def test_prepare_image_path_has_one_bos_and_soft_tokens(runner: ChatRunner) -> None:
    prompt = image_prompt(runner, "red")
    ids = prompt.input_ids.tolist()[0]
    assert ids.count(runner.tokenizer.bos_token_id) == 1
    assert ids[0] == runner.tokenizer.bos_token_id
    assert ids.count(runner.image_token_id) == 12  # 48x64 px -> 3x4 pooled patches
    assert prompt.pixel_values is not None and prompt.n_images == 1


def test_prepare_thinking_and_tools(runner: ChatRunner) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather for a city",
                "parameters": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}},
                    "required": ["city"],
                },
            },
        }
    ]
    text = runner.prepare(USER, [], enable_thinking=True, tools=tools).text
    assert text.startswith("<bos><|turn>system\n<|think|><|tool>declaration:get_weather{")
    assert "<|think|>" not in runner.prepare(USER, [], enable_thinking=False).text
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = USER + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
    ]
    text = runner.prepare(history, [], tools=tools).text
    assert '<|tool_call>call:get_weather{city:<|"|>Paris<|"|>}<tool_call|>' in text
    assert text.endswith(
        '<|tool_response>response:get_weather{value:<|"|>sunny<|"|>}<tool_response|>'
    )


def test_prepare_errors(runner: ChatRunner) -> None:
    misplaced = USER + [{"role": "system", "content": "late"}]
    with pytest.raises(ValueError, match="chat template"):
        runner.prepare(misplaced, [])
    with pytest.raises(ValueError, match="image"):
        runner.prepare(USER, [Image.new("RGB", (32, 32))])
    with pytest.raises(PromptTooLongError) as info:
        runner.prepare([{"role": "user", "content": "hello " * 5000}], [])
    assert info.value.n_ctx == 4096 and info.value.n_prompt_tokens > 4096


def test_greedy_generate(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    steps = run(runner, prompt)
    assert steps[-1].finish_reason in ("stop", "length")
    assert text_of(steps).strip()
    assert all(s.token is not None for s in steps)
    assert text_of(run(runner, prompt)) == text_of(steps)  # greedy is deterministic


def test_max_tokens_gives_length_after_exactly_n_tokens(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    steps = run(runner, prompt, replace(GREEDY, max_tokens=3))
    assert len(steps) == 3
    assert steps[-1].finish_reason == "length"
    assert all(s.token not in runner.eos_token_ids for s in steps)


def test_seed_reproducible_at_temperature_one(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    sampled = replace(GREEDY, temperature=1.0, max_tokens=12)
    first = [s.token for s in run(runner, prompt, replace(sampled, seed=7))]
    again = [s.token for s in run(runner, prompt, replace(sampled, seed=7))]
    other = [s.token for s in run(runner, prompt, replace(sampled, seed=8))]
    assert first == again
    assert first != other


def test_stop_string_cuts_and_is_not_emitted(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    full = text_of(run(runner, prompt))
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    steps = run(runner, prompt, replace(GREEDY, stop=("never-there", stop)))
    assert steps[-1].finish_reason == "stop"
    assert text_of(steps) == full[: full.index(stop)]
    assert stop not in text_of(steps)


def test_cancellation_stops_within_one_step(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    produced: list[int] = []

    def cancelled() -> bool:
        return len(produced) >= 2

    steps = []
    for step in runner.generate(prompt, replace(GREEDY, max_tokens=50), cancelled):
        steps.append(step)
        if step.token is not None:
            produced.append(step.token)
    assert steps[-1].finish_reason == "cancelled"
    assert len(produced) == 2
    first = list(runner.generate(prompt, GREEDY, lambda: True))
    assert [s.finish_reason for s in first] == ["cancelled"]


def test_red_and_blue_images_differ(runner: ChatRunner) -> None:
    red, blue = image_prompt(runner, "red"), image_prompt(runner, "blue")
    assert red.input_ids.tolist() == blue.input_ids.tolist()
    red_logits = runner.prompt_logits(red).tolist()
    blue_logits = runner.prompt_logits(blue).tolist()
    assert max(abs(a - b) for a, b in zip(red_logits, blue_logits, strict=True)) > 1e-3
    red_tokens = [s.token for s in run(runner, red, replace(GREEDY, max_tokens=6))]
    blue_tokens = [s.token for s in run(runner, blue, replace(GREEDY, max_tokens=6))]
    assert red_tokens != blue_tokens


def test_logprobs(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    steps = run(runner, prompt, replace(GREEDY, max_tokens=2, logprobs=3))
    best_id, best = steps[0].top_logprobs[0]
    assert best_id == steps[0].token and best == pytest.approx(steps[0].logprob)
    assert len(steps[0].top_logprobs) == 3 and best < 0


@pytest.mark.parametrize(
    ("chunks", "stops", "expected"),
    [
        (["Hel", "lo wor", "ld"], ("wor",), ("Hello ", True)),
        (["ab", "c"], ("cd",), ("abc", False)),
        (["x<", "|e", "nd|>y"], ("<|end|>",), ("x", True)),
    ],
)
def test_stop_matcher(
    chunks: list[str], stops: tuple[str, ...], expected: tuple[str, bool]
) -> None:
    matcher = StopMatcher(stops)
    emitted, stopped = "", False
    for chunk in chunks:
        out, stopped = matcher.feed(chunk)
        emitted += out
        if stopped:
            break
    if not stopped:
        emitted += matcher.flush()
    assert (emitted, stopped) == expected


def test_stop_matcher_holds_back_a_possible_prefix() -> None:
    matcher = StopMatcher(("STOP",))
    assert matcher.feed("abcST") == ("abc", False)
    assert matcher.feed("x") == ("STx", False)


def test_seeded_requests_stay_reproducible_when_interleaved(runner: ChatRunner) -> None:
    prompt = runner.prepare(USER, [])
    sampled = replace(GREEDY, temperature=1.0, max_tokens=10, seed=11)
    alone = [s.token for s in run(runner, prompt, sampled)]
    a = runner.generate(prompt, sampled, lambda: False)
    b = runner.generate(prompt, replace(sampled, seed=12), lambda: False)
    interleaved: list[int | None] = []
    for step_a, _ in zip(a, b, strict=True):
        interleaved.append(step_a.token)
    assert interleaved == alone
