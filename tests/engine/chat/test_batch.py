"""The batched decode engine (engine.chat.batch) on the tiny Gemma 4 with vision and on the real
Gemma 3 270M: a row computes what it computes alone, images never share state, the prefix cache
gives what a miss gives, n rows share one prefill, a removed row frees its KV at once, and a
long prompt is read in chunks while running rows keep decoding."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path
from typing import Any

import pytest

mx = pytest.importorskip("mlx.core")

from engine.chat.batch import BatchEngine, RowParams  # noqa: E402
from engine.chat.runner import ChatRunner  # noqa: E402
from tests.real_weights import gemma3_270m_mlx  # noqa: E402

PROMPTS = [
    "Hello, how are you today?",
    "The quick brown fox jumps over the lazy dog.",
    "Describe the picture in one sentence, please.",
    "What is in this image?",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024",
    "def add(a, b):",
    "The weather is sunny and warm; let us go for a walk.",
    "Thinking step by step: first, then, finally the answer is yes.",
]
PARAMS = [
    RowParams(),
    RowParams(temperature=0.8, seed=1, top_p=0.9),
    RowParams(temperature=1.0, seed=2, top_k=20),
    RowParams(temperature=0.7, seed=3, min_p=0.05),
    RowParams(temperature=1.2, seed=4, top_p=0.95, top_k=40, min_p=0.02),
    RowParams(repetition_penalty=1.3),
    RowParams(temperature=0.9, seed=5, presence_penalty=0.5, frequency_penalty=0.4),
    RowParams(logprobs=True),
]
N_TOKENS = 12


@pytest.fixture(scope="module", params=["tiny-gemma4", "gemma3-270m"])
def runner(request: pytest.FixtureRequest, tiny_gemma4: Path) -> ChatRunner:
    path = tiny_gemma4 if request.param == "tiny-gemma4" else gemma3_270m_mlx()
    return ChatRunner.load(path, request.param)


@pytest.fixture(scope="module")
def tiny_runner(tiny_gemma4: Path) -> ChatRunner:
    return ChatRunner.load(tiny_gemma4, "tiny-gemma4")


def make_engine(runner: ChatRunner, *, cache_bytes: int = 0, chunk: int = 16) -> BatchEngine:
    return BatchEngine(
        runner.model,
        is_vlm=runner.accepts_images,
        max_batch=16,
        prefill_chunk=chunk,
        cache_bytes=cache_bytes,
        eos_ids=runner.eos_token_ids,
        image_token_id=runner.image_token_id,
    )


def prompt_ids(runner: ChatRunner, text: str) -> list[int]:
    return runner.prepare([{"role": "user", "content": text}], []).input_ids[0].tolist()


def run(
    engine: BatchEngine, requests: dict[Hashable, dict[str, Any]], n_tokens: int = N_TOKENS
) -> tuple[dict[tuple[Hashable, int], list[int]], dict[Hashable, int]]:
    """Add every request, step until each row has n_tokens, remove it: (tokens, cached)."""
    for rid, kwargs in requests.items():
        engine.add(rid, **kwargs)
    tokens: dict[tuple[Hashable, int], list[int]] = {}
    cached: dict[Hashable, int] = {}
    most_rows = 0
    while engine.active or engine.pending:
        most_rows = max(most_rows, engine.active)
        for out in engine.step():
            tokens.setdefault((out.rid, out.index), []).append(out.token)
            if out.cached_tokens is not None:
                cached[out.rid] = out.cached_tokens
        for rid in {rid for rid, _ in engine.kv_tokens_by_row()}:
            rows = [t for (r, _), t in tokens.items() if r == rid]
            if rows and all(len(t) >= n_tokens for t in rows):
                engine.remove(rid)
    assert most_rows >= min(len(requests), 2) or len(requests) == 1
    return tokens, cached


def eight_requests(runner: ChatRunner) -> dict[Hashable, dict[str, Any]]:
    return {
        f"r{i}": {"prompt_ids": prompt_ids(runner, text), "params": params}
        for i, (text, params) in enumerate(zip(PROMPTS, PARAMS, strict=True))
    }


def test_batched_rows_equal_alone(runner: ChatRunner) -> None:
    requests = eight_requests(runner)
    batched, _ = run(make_engine(runner), requests)
    assert len(batched) == 8
    for rid, kwargs in requests.items():
        alone, _ = run(make_engine(runner), {rid: kwargs})
        assert alone[(rid, 0)] == batched[(rid, 0)], rid


def test_greedy_matches_the_libraries_own_single_request_decoding(runner: ChatRunner) -> None:
    """mlx-lm's / mlx-vlm's generate_step, greedy, is the reference for a batched row."""
    prepared = runner.prepare([{"role": "user", "content": PROMPTS[0]}], [])
    greedy = lambda logprobs: mx.argmax(logprobs, axis=-1)  # noqa: E731
    if runner.accepts_images:
        from mlx_vlm.generate import generate_step

        steps = generate_step(prepared.input_ids, runner.model, None, None, sampler=greedy)
    else:
        from mlx_lm.generate import generate_step

        steps = generate_step(prepared.input_ids[0], runner.model, sampler=greedy)
    reference = [int(token) for token, _ in (next(steps) for _ in range(N_TOKENS))]
    requests = eight_requests(runner)
    requests["reference"] = {"prompt_ids": prepared.input_ids[0].tolist(), "params": RowParams()}
    got, _ = run(make_engine(runner), requests)
    assert got[("reference", 0)] == reference


def _image_request(
    runner: ChatRunner, color: tuple[int, int, int], more: tuple[dict, ...] = ()
) -> dict:
    from PIL import Image

    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPTS[3]}]},
        *more,
    ]
    prepared = runner.prepare(messages, [Image.new("RGB", (48, 48), color)])
    return {
        "prompt_ids": prepared.input_ids[0].tolist(),
        "pixel_values": prepared.pixel_values,
        "model_kwargs": prepared.model_kwargs,
        "image_hashes": prepared.image_hashes,
        "params": RowParams(logprobs=True),
    }


def test_images_never_share_state(tiny_runner: ChatRunner) -> None:
    red = _image_request(tiny_runner, (255, 0, 0))
    blue = _image_request(tiny_runner, (0, 0, 255))
    assert red["prompt_ids"] == blue["prompt_ids"]  # same text, only the pixels differ
    assert red["image_hashes"] != blue["image_hashes"]
    red_alone, _ = run(make_engine(tiny_runner), {"red": red})
    blue_alone, _ = run(make_engine(tiny_runner), {"blue": blue})
    both, _ = run(make_engine(tiny_runner), {"red": red, "blue": blue})
    assert both[("red", 0)] == red_alone[("red", 0)]
    assert both[("blue", 0)] == blue_alone[("blue", 0)]
    engine = make_engine(tiny_runner, cache_bytes=1 << 30)
    run(engine, {"red": red})
    image_at = blue["prompt_ids"].index(tiny_runner.image_token_id)
    got, cached = run(engine, {"blue": blue})
    assert cached["blue"] <= image_at  # red's KV never serves blue past the image
    assert got[("blue", 0)] == blue_alone[("blue", 0)]
    got, cached = run(engine, {"red again": red})
    assert cached["red again"] == len(red["prompt_ids"]) - 1
    assert got[("red again", 0)] == red_alone[("red", 0)]


def test_a_second_turn_after_an_image_reads_only_its_new_text(tiny_runner: ChatRunner) -> None:
    engine = make_engine(tiny_runner, cache_bytes=1 << 30)
    run(engine, {"t1": _image_request(tiny_runner, (255, 0, 0))})
    turn = (
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "What shape is it, and what colour?"},
    )
    second = _image_request(tiny_runner, (255, 0, 0), more=turn)
    got, cached = run(engine, {"t2": second})
    ids = second["prompt_ids"]
    last_image_token = len(ids) - 1 - ids[::-1].index(tiny_runner.image_token_id)
    assert last_image_token < cached["t2"] < len(ids) - 1  # the image is in the cached part
    cold, _ = run(make_engine(tiny_runner), {"t2": second})
    assert got[("t2", 0)] == cold[("t2", 0)]


@pytest.mark.parametrize("params", [RowParams(), RowParams(temperature=0.9, seed=21, top_k=50)])
def test_prefix_cache_second_turn(runner: ChatRunner, params: RowParams) -> None:
    first = prompt_ids(runner, PROMPTS[1])
    engine = make_engine(runner, cache_bytes=1 << 31)
    turn1, cached = run(engine, {"t1": {"prompt_ids": first, "params": params}})
    assert cached["t1"] == 0
    answer = turn1[("t1", 0)]
    second = first + answer + prompt_ids(runner, "And then?")[1:]  # no second BOS
    got, cached = run(engine, {"t2": {"prompt_ids": second, "params": params}})
    # The end-of-generation snapshot: the prompt and every token fed, the last answer token too
    # (the step after it was already computing when the row left).
    assert cached["t2"] == len(first) + len(answer)
    cold, cold_cached = run(make_engine(runner), {"t2": {"prompt_ids": second, "params": params}})
    assert cold_cached["t2"] == 0
    assert got[("t2", 0)] == cold[("t2", 0)]
    again, cached = run(engine, {"t3": {"prompt_ids": first, "params": params}})
    assert cached["t3"] == len(first) - 1  # the end-of-prompt snapshot
    assert again[("t3", 0)] == answer


def test_n_rows_share_one_prefill(runner: ChatRunner) -> None:
    ids = prompt_ids(runner, PROMPTS[0])
    sampled = RowParams(temperature=1.0, seed=9)
    got, _ = run(
        make_engine(runner),
        {
            "s": {"prompt_ids": ids, "params": sampled, "n": 3},
            "g": {"prompt_ids": ids, "params": RowParams(), "n": 2},
        },
    )
    assert sorted(k for k in got if k[0] == "s") == [("s", 0), ("s", 1), ("s", 2)]
    assert got[("g", 0)] == got[("g", 1)]
    assert len({tuple(got[("s", i)]) for i in range(3)}) > 1  # each row its own stream
    single, _ = run(make_engine(runner), {"s": {"prompt_ids": ids, "params": sampled}})
    assert single[("s", 0)] == got[("s", 0)]


def test_remove_frees_the_row_and_its_kv(runner: ChatRunner) -> None:
    engine = make_engine(runner)
    a, b = prompt_ids(runner, PROMPTS[0]), prompt_ids(runner, PROMPTS[1])
    engine.add("a", a, params=RowParams())
    engine.add("b", b, params=RowParams())
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    while len(tokens["b"]) < 3:
        for out in engine.step():
            tokens[str(out.rid)].append(out.token)
    rows, kv, kv_bytes = engine.active, engine.kv_tokens, engine.kv_bytes
    held = engine.kv_tokens_by_row()[("a", 0)]
    assert held >= len(a) - 1 + len(tokens["a"])  # a step may still be computing
    engine.remove("a", keep_cache=False)
    assert engine.active == rows - 1
    assert engine.kv_tokens == kv - held
    assert engine.kv_bytes < kv_bytes
    while len(tokens["b"]) < N_TOKENS:
        for out in engine.step():
            assert out.rid == "b"
            tokens["b"].append(out.token)
    alone, _ = run(make_engine(runner), {"b": {"prompt_ids": b, "params": RowParams()}})
    assert tokens["b"] == alone[("b", 0)]


def test_a_long_prompt_is_read_in_chunks_while_rows_keep_decoding(runner: ChatRunner) -> None:
    engine = make_engine(runner, chunk=8)
    engine.add("a", prompt_ids(runner, PROMPTS[0]), params=RowParams())
    while engine.pending or not engine.active:
        engine.step()
    long_prompt = prompt_ids(runner, " ".join(PROMPTS))
    engine.add("long", long_prompt, params=RowParams())
    read = 0
    while engine.pending:
        outs = engine.step()
        assert "a" in [o.rid for o in outs]  # a gets its token every step
        progress = engine.kv_tokens_by_row().get(("long", -1), len(long_prompt) - 1)
        assert 0 < progress - read <= 8  # never more than the chunk at a time
        read = progress
    assert read == len(long_prompt) - 1


def test_a_top_k_past_the_vocabulary_keeps_every_token(tiny_runner: ChatRunner) -> None:
    ids = prompt_ids(tiny_runner, PROMPTS[0])
    huge = RowParams(temperature=1.0, seed=11, top_k=10**9)
    none = RowParams(temperature=1.0, seed=11)
    got, _ = run(make_engine(tiny_runner), {"huge": {"prompt_ids": ids, "params": huge}})
    want, _ = run(make_engine(tiny_runner), {"none": {"prompt_ids": ids, "params": none}})
    assert got[("huge", 0)] == want[("none", 0)]


def test_log_probabilities_only_where_asked_and_they_change_no_token(
    tiny_runner: ChatRunner,
) -> None:
    """A row gets its log-probabilities only when it asks (the normalising pass over the vocabulary
    is skipped for the others); asking changes none of its tokens, greedy or sampled; they sum to
    one and the greedy pick is their argmax."""
    ids = prompt_ids(tiny_runner, PROMPTS[1])
    sampled = {"temperature": 0.9, "seed": 7}
    requests = {
        "greedy": RowParams(),
        "greedy+lp": RowParams(logprobs=True),
        "sampled": RowParams(**sampled),
        "sampled+lp": RowParams(**sampled, logprobs=True),
    }
    engine = make_engine(tiny_runner)
    for rid, params in requests.items():
        engine.add(rid, ids, params=params)
    tokens: dict[Hashable, list[int]] = {rid: [] for rid in requests}
    while any(len(t) < N_TOKENS for t in tokens.values()):
        for out in engine.step():
            tokens[out.rid].append(out.token)
            assert (out.logprobs is not None) == out.rid.endswith("+lp"), out.rid
            if out.logprobs is not None:
                assert mx.exp(out.logprobs).sum().item() == pytest.approx(1.0, abs=1e-4)
                if out.rid == "greedy+lp":
                    assert mx.argmax(out.logprobs).item() == out.token
    assert tokens["greedy"][:N_TOKENS] == tokens["greedy+lp"][:N_TOKENS]
    assert tokens["sampled"][:N_TOKENS] == tokens["sampled+lp"][:N_TOKENS]
