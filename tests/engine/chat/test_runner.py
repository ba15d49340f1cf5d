"""ChatRunner on a tiny random Gemma 4 (vision) checkpoint converted by mlx-vlm, and on a
tiny random Gemma 3 text checkpoint in mlx-lm's layout (the text-only path)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip("mlx_vlm")

from PIL import Image  # noqa: E402

from engine.chat.runner import (  # noqa: E402
    ChatParams,
    ChatRunner,
    ChatStep,
    PromptTooLongError,
    StopMatcher,
    is_text_only,
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


@pytest.fixture(scope="module")
def text_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_gemma3_text_mlx(tmp_path_factory.mktemp("gemma3") / "mlx")


@pytest.fixture(scope="module")
def text_runner(text_model_dir: Path) -> ChatRunner:
    return ChatRunner.load(text_model_dir, "tiny-gemma3")


@pytest.fixture(params=["runner", "text_runner"])
def any_runner(request: pytest.FixtureRequest) -> ChatRunner:
    """The generation tests run on both paths: mlx-vlm (Gemma 4) and mlx-lm (Gemma 3 text)."""
    return request.getfixturevalue(request.param)


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


def test_greedy_generate(any_runner: ChatRunner) -> None:
    runner = any_runner
    prompt = runner.prepare(USER, [])
    steps = run(runner, prompt)
    assert steps[-1].finish_reason in ("stop", "length")
    assert text_of(steps).strip()
    assert all(s.token is not None for s in steps)
    assert text_of(run(runner, prompt)) == text_of(steps)  # greedy is deterministic


def test_max_tokens_gives_length_after_exactly_n_tokens(any_runner: ChatRunner) -> None:
    runner = any_runner
    prompt = runner.prepare(USER, [])
    steps = run(runner, prompt, replace(GREEDY, max_tokens=3))
    assert len(steps) == 3
    assert steps[-1].finish_reason == "length"
    assert all(s.token not in runner.eos_token_ids for s in steps)


def test_seed_reproducible_at_temperature_one(any_runner: ChatRunner) -> None:
    runner = any_runner
    prompt = runner.prepare(USER, [])
    sampled = replace(GREEDY, temperature=1.0, max_tokens=12)
    first = [s.token for s in run(runner, prompt, replace(sampled, seed=7))]
    again = [s.token for s in run(runner, prompt, replace(sampled, seed=7))]
    other = [s.token for s in run(runner, prompt, replace(sampled, seed=8))]
    assert first == again
    assert first != other


def test_stop_string_cuts_and_is_not_emitted(any_runner: ChatRunner) -> None:
    runner = any_runner
    prompt = runner.prepare(USER, [])
    full = text_of(run(runner, prompt))
    stop = next(full[i : i + 2] for i in range(3, len(full) - 2) if full[i : i + 2].strip())
    steps = run(runner, prompt, replace(GREEDY, stop=("never-there", stop)))
    assert steps[-1].finish_reason == "stop"
    assert text_of(steps) == full[: full.index(stop)]
    assert stop not in text_of(steps)


def test_cancellation_stops_within_one_step(any_runner: ChatRunner) -> None:
    runner = any_runner
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


def test_logprobs(any_runner: ChatRunner) -> None:
    runner = any_runner
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


def test_seeded_requests_stay_reproducible_when_interleaved(any_runner: ChatRunner) -> None:
    runner = any_runner
    prompt = runner.prepare(USER, [])
    sampled = replace(GREEDY, temperature=1.0, max_tokens=10, seed=11)
    alone = [s.token for s in run(runner, prompt, sampled)]
    a = runner.generate(prompt, sampled, lambda: False)
    b = runner.generate(prompt, replace(sampled, seed=12), lambda: False)
    interleaved: list[int | None] = []
    for step_a, _ in zip(a, b, strict=True):
        interleaved.append(step_a.token)
    assert interleaved == alone


# ------------------------------------------------- text-only path (mlx-lm, Gemma 3 text)

GEMMA3_SPECIALS = ("<start_of_turn>", "<end_of_turn>")
TEXT_CONTEXT = 256


def _gemma3_tokenizer():
    from tokenizers import AddedToken

    from tests.tiny.gemma4 import _train_tokenizer

    tok = _train_tokenizer()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA3_SPECIALS])
    return tok


def _gemma3_config(vocab_size: int, ids: dict[str, int]) -> dict:
    return {
        "model_type": "gemma3_text",
        "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "sliding_window": 32,
        "sliding_window_pattern": 2,
        "max_position_embeddings": TEXT_CONTEXT,
        "vocab_size": vocab_size,
        "bos_token_id": ids["<bos>"],
        "eos_token_id": [ids["<eos>"], ids["<end_of_turn>"]],
        "pad_token_id": ids["<pad>"],
    }


def build_gemma3_text_mlx(dest: Path) -> Path:
    """A tiny random gemma3_text model in mlx-lm's layout, Gemma 3 chat template included."""
    import mlx.core as mx
    import numpy as np
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text
    from mlx_lm.utils import save_config, save_model

    from conversions.gemma import GEMMA3_CHAT_TEMPLATE

    tok = _gemma3_tokenizer()
    ids = {t: tok.token_to_id(t) for t in ("<bos>", "<eos>", "<pad>", *GEMMA3_SPECIALS)}
    config = _gemma3_config(tok.get_vocab_size(), ids)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    rng = np.random.default_rng(5)
    weights = {
        name: mx.array(rng.normal(0.0, 0.1, value.shape).astype(np.float32))
        for name, value in tree_flatten(model.parameters())
        if name != "lm_head.weight"
    }
    model.load_weights(list(model.sanitize(weights).items()))
    save_model(dest, model)
    save_config(dict(config), config_path=dest / "config.json")
    tok.save(str(dest / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "GemmaTokenizer",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "chat_template": GEMMA3_CHAT_TEMPLATE,
    }
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    gen = {"eos_token_id": config["eos_token_id"], "top_k": 64, "top_p": 0.95}
    (dest / "generation_config.json").write_text(json.dumps(gen))
    return dest


def test_text_only_is_detected_by_config(text_model_dir: Path, model_dir: Path) -> None:
    assert is_text_only(json.loads((text_model_dir / "config.json").read_text()))
    assert not is_text_only(json.loads((model_dir / "config.json").read_text()))
    assert not is_text_only({"model_type": "no_such_model"})


def test_text_only_load(text_runner: ChatRunner) -> None:
    assert not text_runner.accepts_images and text_runner.processor is None
    assert text_runner.context_length == TEXT_CONTEXT
    end_of_turn = text_runner.tokenizer.convert_tokens_to_ids("<end_of_turn>")
    assert {text_runner.tokenizer.eos_token_id, end_of_turn} <= text_runner.eos_token_ids
    assert text_runner.generation_defaults() == {
        "temperature": 1.0,
        "top_p": 0.95,
        "top_k": 64,
        "min_p": 0.0,
    }


def test_text_only_prepare_renders_gemma3_turns_with_one_bos(text_runner: ChatRunner) -> None:
    system = [{"role": "system", "content": "Be brief."}]
    prompt = text_runner.prepare(system + USER, [])
    assert prompt.text == (
        "<bos><start_of_turn>user\nBe brief.\n\nHello, how are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    ids = prompt.input_ids.tolist()[0]
    bos = text_runner.tokenizer.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1
    assert text_runner.tokenizer.convert_tokens_to_ids("<start_of_turn>") in ids


def test_text_only_refuses_images(text_runner: ChatRunner) -> None:
    with pytest.raises(ValueError, match="this model does not accept images"):
        image_prompt(text_runner, "red")
    with pytest.raises(ValueError, match="this model does not accept images"):
        text_runner.prepare(USER, [Image.new("RGB", (32, 32))])


def test_text_only_prepare_errors(text_runner: ChatRunner) -> None:
    with pytest.raises(ValueError, match="chat template"):
        text_runner.prepare(USER + USER, [])  # two user turns in a row
    with pytest.raises(PromptTooLongError) as info:
        text_runner.prepare([{"role": "user", "content": "hello " * 300}], [])
    assert info.value.n_ctx == TEXT_CONTEXT


def test_text_only_greedy_follows_the_model_logits(text_runner: ChatRunner) -> None:
    prompt = text_runner.prepare(USER, [])
    first = run(text_runner, prompt, replace(GREEDY, max_tokens=1))[0]
    assert first.token == int(text_runner.prompt_logits(prompt).argmax().item())


def test_text_only_penalties_change_the_output(text_runner: ChatRunner) -> None:
    prompt = text_runner.prepare(USER, [])
    plain = [s.token for s in run(text_runner, prompt, replace(GREEDY, max_tokens=24))]
    penalised = replace(GREEDY, max_tokens=24, repetition_penalty=5.0, presence_penalty=5.0)
    assert [s.token for s in run(text_runner, prompt, penalised)] != plain


def test_max_token_chars_bounds_every_token(runner: ChatRunner) -> None:
    vocab = runner.tokenizer.get_vocab()
    assert runner.max_token_chars == max(len(token) for token in vocab)
    ids = runner.tokenizer.encode("A sentence, with punctuation!  And spaces.")
    pieces = [runner.tokenizer.decode([i]) for i in ids]
    assert all(len(piece) <= runner.max_token_chars for piece in pieces)
