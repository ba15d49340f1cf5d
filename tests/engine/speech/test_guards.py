"""Hallucination guards (engine.speech.guards) and how the runner applies them: the entropy
check, the fallback ladder run before every rung's `on_window`, repeated segments dropped, and
the request fields that set them."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from engine.config import Config
from engine.errors import InvalidRequest
from engine.speech.guards import (
    Ladder,
    drop_repeated_segments,
    entropy_failed,
    token_entropy,
)
from engine.speech.request import Fields, inference_options, openai_options
from engine.speech.runner import SpeechRunner, _HookedModel


def test_entropy_of_a_repetitive_token_sequence() -> None:
    loop = [50364, 400, 291, 13] * 12  # the same four tokens, over and over: ln 4 = 1.39
    assert token_entropy(loop) == pytest.approx(np.log(4))
    assert entropy_failed(loop, 2.4)
    assert not entropy_failed(loop, 1.0)
    assert not entropy_failed(loop[:32], 2.4)  # whisper.cpp checks only past 32 tokens
    varied = list(range(100, 140))
    assert token_entropy(varied) == pytest.approx(np.log(32))  # the last 32 only
    assert not entropy_failed(varied, 2.4)
    assert not entropy_failed(loop, None)


def _result(**values: float) -> SimpleNamespace:
    base = {"avg_logprob": -0.3, "no_speech_prob": 0.1, "compression_ratio": 1.5}
    return SimpleNamespace(**{**base, **values})


def test_fallback_rules() -> None:
    cpp = Ladder(entropy_threshold=2.4)  # /inference: whisper.cpp's checks
    assert not cpp.needs_fallback(_result(), repetitive=False)
    assert cpp.needs_fallback(_result(), repetitive=True)
    assert cpp.needs_fallback(_result(no_speech_prob=0.9), repetitive=True)  # no excuse
    assert cpp.needs_fallback(_result(avg_logprob=-1.5), repetitive=False)
    assert not cpp.needs_fallback(_result(avg_logprob=-1.5, no_speech_prob=0.9), repetitive=False)
    assert not cpp.needs_fallback(_result(compression_ratio=9.0), repetitive=False)
    openai = Ladder(compression_ratio_threshold=2.4)  # /v1/audio/transcriptions
    assert openai.needs_fallback(_result(compression_ratio=9.0), repetitive=False)
    assert not openai.needs_fallback(
        _result(compression_ratio=9.0, no_speech_prob=0.9), repetitive=False
    )
    assert Ladder(beam_size=5, best_of=2).width(0.0) == 5
    assert Ladder(beam_size=5, best_of=2).width(0.4) == 2
    assert Ladder(beam_size=-1, best_of=2).width(0.0) == 1


def _segment(index: int, text: str) -> dict:
    return {"id": index, "start": index * 2.0, "end": index * 2.0 + 2, "text": text}


def test_a_repeated_segment_is_dropped() -> None:
    texts = [" Thank you.", " Thank you.", " thank you", " Bye.", " Thank you.", " Bye now."]
    result = {"text": "".join(texts), "segments": [_segment(i, t) for i, t in enumerate(texts)]}
    kept = drop_repeated_segments(result)
    assert [s["text"] for s in kept["segments"]] == [texts[0], texts[3], texts[4], texts[5]]
    assert [s["id"] for s in kept["segments"]] == [0, 1, 2, 3]
    assert [s["start"] for s in kept["segments"]] == [0.0, 6.0, 8.0, 10.0]
    assert kept["text"] == " Thank you. Bye. Thank you. Bye now."
    unchanged = {"text": " A. B.", "segments": [_segment(0, " A."), _segment(1, " B.")]}
    assert drop_repeated_segments(unchanged) is unchanged


# ---- the runner -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runner(tiny_whisper: Path) -> SpeechRunner:
    return SpeechRunner.load(tiny_whisper, "whisper-tiny-random")


def _noise(seconds: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    return (0.1 * rng.standard_normal(int(16_000 * seconds))).astype(np.float32)


def test_every_rung_runs_after_on_window(
    runner: SpeechRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    events: list[Any] = []
    original = _HookedModel._decode_rung

    def recorded(self: _HookedModel, features: Any, options: Any, ladder: Ladder) -> Any:
        events.append((options.temperature, ladder.width(options.temperature)))
        return original(self, features, options, ladder)

    monkeypatch.setattr(_HookedModel, "_decode_rung", recorded)
    runner.transcribe(
        _noise(1.0),
        language="en",
        temperature=(0.0, 0.5, 1.0),
        on_window=lambda: events.append("window"),
        beam_size=2,
        best_of=2,
        compression_ratio_threshold=-1.0,  # every rung fails: the whole ladder runs
        no_speech_threshold=None,
        sample_len=8,
    )
    rungs = ["window", (0.0, 2), "window", (0.5, 2), "window", (1.0, 2)]
    assert events and events == rungs * (len(events) // len(rungs))


@pytest.mark.parametrize(
    ("no_speech_prob", "avg_logprob", "text"),
    [(0.9, -2.0, ""), (0.9, -0.5, " Hello."), (0.3, -2.0, " Hello.")],
)
def test_a_silent_improbable_window_gives_no_text(
    runner: SpeechRunner,
    monkeypatch: pytest.MonkeyPatch,
    no_speech_prob: float,
    avg_logprob: float,
    text: str,
) -> None:
    from mlx_whisper.decoding import DecodingResult
    from mlx_whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(True, num_languages=runner._model.num_languages, language="en")
    begin = tokenizer.timestamp_begin
    tokens = [begin, *tokenizer.encode(" Hello."), begin + 50]

    def crafted(self: _HookedModel, features: Any, options: Any, ladder: Ladder) -> Any:
        result = DecodingResult(
            audio_features=features,
            language="en",
            tokens=tokens,
            text="Hello.",
            avg_logprob=avg_logprob,
            no_speech_prob=no_speech_prob,
            temperature=options.temperature,
            compression_ratio=1.0,
        )
        return result, False

    monkeypatch.setattr(_HookedModel, "_decode_rung", crafted)
    result = runner.transcribe(
        _noise(1.0), language="en", temperature=0.0, no_speech_threshold=0.6, logprob_threshold=-1.0
    )
    assert result["text"] == text


def test_repeated_segments_are_dropped_from_the_result(
    runner: SpeechRunner, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = [{**_segment(i, " Thank you."), "tokens": [50364, 1044, 291, 13]} for i in range(4)]
    crafted = {"text": " Thank you." * 4, "segments": loop, "language": "en"}
    monkeypatch.setattr(runner, "_run", lambda samples, **options: crafted)
    result = runner.transcribe(_noise(1.0), language="en", temperature=0.0)
    assert result["text"] == " Thank you."
    assert [s["text"] for s in result["segments"]] == [" Thank you."]
    assert result["segments"][0]["pieces"]


# ---- request fields -------------------------------------------------------------------------


def _fields(**form: str) -> Fields:
    return Fields(SimpleNamespace(form=form))  # type: ignore[arg-type]


def test_inference_fields_set_beam_search_and_the_guards() -> None:
    options, _, _ = inference_options(
        _fields(beam_size="5", best_of="3", entropy_thold="2.0", no_speech_thold="0.5"), Config()
    )
    assert (options.beam_size, options.best_of) == (5, 3)
    assert options.entropy_threshold == 2.0 and options.compression_ratio_threshold is None
    assert options.no_speech_threshold == 0.5 and options.logprob_threshold == -1.0
    defaults, _, _ = inference_options(_fields(), Config())
    assert (defaults.beam_size, defaults.best_of, defaults.entropy_threshold) == (-1, 2, 2.4)
    openai, _ = openai_options(_fields(), "transcribe")
    assert openai.beam_size == -1 and openai.entropy_threshold is None
    assert openai.compression_ratio_threshold == 2.4


@pytest.mark.parametrize("value", ["17", "-2", "five", "2.5"])
def test_a_bad_beam_size_is_a_400_naming_it(value: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        inference_options(_fields(beam_size=value), Config())
    assert caught.value.param == "beam_size"
