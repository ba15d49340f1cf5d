"""Silero VAD on MLX against the silero-vad package: the network (its TorchScript graph run
with the same 16 kHz weights) on espeak-ng speech, the probability-to-span rules (the
package's own get_speech_timestamps_from_probs, with max-speech cuts at the last silence as
whisper.cpp makes them), and the splice's time mapping."""

from __future__ import annotations

import math

import mlx.core as mx
import numpy as np
import pytest

from conversions.silero import to_mlx_layout
from engine.audio import SAMPLE_RATE, decode_audio
from engine.speech.vad import FRAME, SileroVad, Splice, VadParams, speech_spans
from tests.engine.speech.test_real_weights import speech
from tests.real_weights import silero_vad_16k

BIASED = ("weight", "bias")
LSTM = ("weight_ih", "weight_hh", "bias_ih", "bias_hh")
# TorchScript module name -> the safetensors name of the same tensor.
TORCH_NAMES = {
    "stft.forward_basis_buffer": "stft_conv.weight",
    **{f"encoder.{i}.reparam_conv.{p}": f"conv{i + 1}.{p}" for i in range(4) for p in BIASED},
    **{f"decoder.rnn.{p}": f"lstm_cell.{p}" for p in LSTM},
    "decoder.decoder.2.weight": "final_conv.weight",
    "decoder.decoder.2.bias": "final_conv.bias",
}  # fmt: skip


@pytest.fixture(scope="module")
def source() -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(str(silero_vad_16k()))


def _reference_probs(source: dict[str, np.ndarray], audio: np.ndarray) -> np.ndarray:
    """The package's TorchScript model, 16 kHz weights swapped for the safetensors file's,
    fed frame by frame as the package does (it keeps the state and the 64-sample context)."""
    from importlib.resources import files

    import torch

    path = str(files("silero_vad.data").joinpath("silero_vad.jit"))
    model = torch.jit.load(path)
    state = model._model.state_dict()
    state.update({k: torch.from_numpy(source[v]) for k, v in TORCH_NAMES.items()})
    model._model.load_state_dict(state)
    model.reset_states()
    padded = np.pad(audio, (0, -len(audio) % FRAME))
    with torch.no_grad():
        probs = [model(torch.from_numpy(padded[i : i + FRAME]), SAMPLE_RATE).item()
                 for i in range(0, len(padded), FRAME)]  # fmt: skip
    return np.array(probs, np.float32)


def _espeak(text: str) -> np.ndarray:
    return decode_audio(speech(text).read_bytes(), filename="speech.wav")


def test_network_matches_the_packages_model_on_speech_and_noise(source) -> None:
    rng = np.random.default_rng(1)
    words = _espeak("Please call Stella and ask her to bring these things with her.")
    gap = np.zeros(SAMPLE_RATE, np.float32)
    noise = rng.normal(0, 0.05, SAMPLE_RATE).astype(np.float32)
    audio = np.concatenate([gap, words, noise, words[:1234]])
    vad = SileroVad({k: mx.array(v) for k, v in to_mlx_layout(source).items()})
    ours = vad.probabilities(audio)
    reference = _reference_probs(source, audio)
    assert ours.shape == reference.shape == (math.ceil(len(audio) / FRAME),)
    assert np.abs(ours - reference).max() < 1e-4
    assert reference.max() > 0.9 and reference[: SAMPLE_RATE // FRAME].max() < 0.5


PARAMS = [
    VadParams(),
    VadParams(threshold=0.3, min_speech_duration_ms=100, min_silence_duration_ms=300),
    VadParams(max_speech_duration_s=2.0, speech_pad_ms=100),
    VadParams(max_speech_duration_s=1.0, min_silence_duration_ms=500, speech_pad_ms=0),
]


@pytest.mark.parametrize("params", PARAMS)
def test_spans_follow_silero_rules(params: VadParams) -> None:
    from silero_vad.utils_vad import get_speech_timestamps_from_probs

    rng = np.random.default_rng(7)
    # Runs of speech and silence of random lengths, with flicker in between.
    runs = [rng.uniform(0.0, 1.0, size=int(rng.integers(1, 90))) for _ in range(40)]
    levels = np.concatenate([np.clip(r * 0.3 + (i % 2) * 0.65, 0, 1) for i, r in enumerate(runs)])
    total = len(levels) * FRAME - 100
    ours = speech_spans(levels, total, params)
    theirs = get_speech_timestamps_from_probs(
        levels.tolist(),
        threshold=params.threshold,
        min_speech_duration_ms=params.min_speech_duration_ms,
        max_speech_duration_s=params.max_speech_duration_s,
        min_silence_duration_ms=params.min_silence_duration_ms,
        speech_pad_ms=params.speech_pad_ms,
        use_max_poss_sil_at_max_speech=False,
        audio_length_samples=total,
    )
    assert len(ours) > 5
    assert ours == [(s["start"], s["end"]) for s in theirs]


def test_splice_keeps_overlap_and_maps_times_back() -> None:
    audio = np.arange(10 * SAMPLE_RATE, dtype=np.float32)
    spans = [(SAMPLE_RATE, 2 * SAMPLE_RATE), (5 * SAMPLE_RATE, 6 * SAMPLE_RATE)]
    splice = Splice.join(audio, spans, overlap_s=0.1)
    first = int(1.1 * SAMPLE_RATE)
    gap = int(0.1 * SAMPLE_RATE)
    assert len(splice.audio) == first + gap + SAMPLE_RATE
    assert np.array_equal(splice.audio[:first], audio[SAMPLE_RATE : SAMPLE_RATE + first])
    assert not splice.audio[first : first + gap].any()
    assert np.array_equal(splice.audio[first + gap :], audio[5 * SAMPLE_RATE : 6 * SAMPLE_RATE])
    assert splice.to_original(0.0) == 1.0
    assert splice.to_original(0.5) == 1.5
    assert splice.to_original(1.12) == 2.1  # in the silence, nearer the first piece's end
    assert splice.to_original(1.19) == 5.0  # nearer the second piece
    assert splice.to_original(1.2 + 0.25) == pytest.approx(5.25)
    result = {"segments": [{"start": 1.2, "end": 2.2, "words": [{"start": 1.3, "end": 1.4}]}]}
    assert splice.remap(result)["segments"][0] == {
        "start": 5.0, "end": 6.0, "words": [{"start": 5.1, "end": 5.2}],
    }  # fmt: skip


def test_silence_has_no_spans(source) -> None:
    vad = SileroVad({k: mx.array(v) for k, v in to_mlx_layout(source).items()})
    audio = np.zeros(5 * SAMPLE_RATE, np.float32)
    assert speech_spans(vad.probabilities(audio), len(audio), VadParams()) == []
