"""Batched long-form decoding (engine.speech.batched) on a tiny random Whisper: each row of a
batch decodes to the tokens its window gives alone, through rows that end at different steps
and rows that fall back to a higher temperature; the quiet cuts and when a request is batched.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
import pytest

from engine.audio import SAMPLE_RATE
from engine.speech import batched as batched_module
from engine.speech.batched import MAX_PIECE_S, split_pieces
from engine.speech.decode import batched
from engine.speech.request import Options, SttJob, VadParams
from engine.speech.runner import SpeechRunner
from tests.tiny.whisper import build_whisper_mlx

GREEDY = {"language": "en", "temperature": (0.0,)}


def _noise(seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(SAMPLE_RATE * seconds))).astype(np.float32)


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> SpeechRunner:
    """Loaded without SpeechRunner.load's warm-up (no word timestamps here to compile for)."""
    from mlx_whisper.load_models import load_model

    model_dir = build_whisper_mlx(tmp_path_factory.mktemp("whisper") / "tiny")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", lambda *a, **k: pytest.fail("network"))
        model = load_model(str(model_dir), dtype=mx.float32)
    return SpeechRunner(model, model_dir, "whisper-tiny-random", mx.float32)


class _EndsEarly:
    """The tiny model's output layer, plus end-of-text made certain wherever the hidden
    state's first feature is high: rows then end after different numbers of steps (the random
    model otherwise always runs to the 224-token limit). Both paths read logits through it."""

    def __init__(self, embedding: Any, eot: int) -> None:
        self._embedding = embedding
        self._eot = mx.array(np.eye(embedding.weight.shape[0], dtype=np.float32)[eot])

    def __call__(self, tokens: mx.array) -> mx.array:
        return self._embedding(tokens)

    def as_linear(self, x: mx.array) -> mx.array:
        logits = self._embedding.as_linear(x)
        return logits + 1e4 * (x[..., :1] > 2.0) * self._eot


@pytest.fixture
def ends_early(runner: SpeechRunner) -> Iterator[None]:
    decoder = runner._model._model.decoder
    original = decoder.token_embedding
    # An instance attribute shadows the module's own entry until it is deleted again.
    object.__setattr__(decoder, "token_embedding", _EndsEarly(original, 50257))
    yield
    object.__delattr__(decoder, "token_embedding")
    assert decoder.token_embedding is original


def _by_piece(result: dict, starts: list[int]) -> list[list[list[int]]]:
    """Each piece's segment tokens (a piece's segments start at or after its own start)."""
    bounds = [s / SAMPLE_RATE for s in starts] + [float("inf")]
    return [
        [seg["tokens"] for seg in result["segments"] if a <= seg["start"] < b]
        for a, b in zip(bounds, bounds[1:], strict=False)
    ]


def test_rows_of_different_lengths_decode_as_each_window_alone(
    runner: SpeechRunner, ends_early: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    seconds = (3.0, 12.0, 20.0, 26.0, 7.0)
    audios = [_noise(s, seed) for seed, s in enumerate(seconds)]
    starts = [i * 40 * SAMPLE_RATE for i in range(len(audios))]
    lengths: list[int] = []
    result = batched_module._result

    def counted(vocab: Any, sampled: list[int], *rest: Any) -> Any:
        lengths.append(len(sampled))
        return result(vocab, sampled, *rest)

    monkeypatch.setattr(batched_module, "_result", counted)
    together = runner.transcribe_pieces(list(zip(audios, starts, strict=True)), batch=8, **GREEDY)
    assert len(set(lengths)) > 2  # rows of one batch ended after different numbers of steps
    alone = [
        runner.transcribe(a, condition_on_previous_text=False, **GREEDY)["segments"] for a in audios
    ]
    assert _by_piece(together, starts) == [[seg["tokens"] for seg in segs] for segs in alone]
    for segs, start in zip(alone, starts, strict=True):
        for seg in segs:
            seg["start"] = round(seg["start"] + start / SAMPLE_RATE, 3)
    assert [s["start"] for s in together["segments"]] == [s["start"] for a in alone for s in a]
    assert together["text"] == "".join(s["text"] for a in alone for s in a)


def test_a_row_that_falls_back_decodes_as_it_would_alone(runner: SpeechRunner) -> None:
    audios = [_noise(s, seed) for seed, s in enumerate((4.0, 9.0, 15.0))]
    pieces = [(a, i * 20 * SAMPLE_RATE) for i, a in enumerate(audios)]
    checks = {"logprob_threshold": None, "no_speech_threshold": None, "without_timestamps": True}
    first = [runner.transcribe_pieces([p], batch=1, **GREEDY, **checks) for p in pieces]
    ratios = sorted(r["segments"][0]["compression_ratio"] for r in first)
    assert ratios[0] < ratios[-1]
    threshold = (ratios[0] + ratios[-1]) / 2
    ladder = {"language": "en", "temperature": (0.0, 0.5), "best_of": 2}
    ladder |= checks | {"compression_ratio_threshold": threshold}
    together = runner.transcribe_pieces(pieces, batch=8, **ladder)
    alone = [runner.transcribe_pieces([p], batch=1, **ladder)["segments"] for p in pieces]
    assert [s["tokens"] for s in together["segments"]] == [s["tokens"] for a in alone for s in a]
    temperatures = [s["temperature"] for s in together["segments"]]
    expected = [0.5 if r["segments"][0]["compression_ratio"] > threshold else 0.0 for r in first]
    assert temperatures == expected and 0.0 in temperatures and 0.5 in temperatures


def test_no_pieces_is_empty_text(runner: SpeechRunner) -> None:
    result = runner.transcribe_pieces([], batch=8, **GREEDY)
    assert result == {"text": "", "segments": [], "language": "en"}


def test_a_long_piece_is_cut_in_its_quietest_moment() -> None:
    speech = _noise(60.0, 7)
    quiet = int(29.5 * SAMPLE_RATE)
    speech[quiet : quiet + SAMPLE_RATE // 5] = 0.0  # 0.2 s of silence near the middle
    pieces = split_pieces([(speech, 1000)], batch=2)
    assert [start for _, start in pieces] == [1000, pieces[1][1]]
    assert 1000 + quiet <= pieces[1][1] <= 1000 + quiet + SAMPLE_RATE // 5
    assert sum(len(a) for a, _ in pieces) == len(speech)
    many = split_pieces([(speech, 0)], batch=8)
    assert len(many) == 4 and all(len(a) <= MAX_PIECE_S * SAMPLE_RATE for a, _ in many)
    short = [(_noise(20.0, 1), 0)]
    assert len(split_pieces(short, batch=8)) == 1


def test_speech_spans_are_packed_into_pieces_of_whole_spans() -> None:
    from engine.speech.vad import Splice

    audio = np.arange(100 * SAMPLE_RATE, dtype=np.float32)
    seconds = [(0, 10), (12.5, 22.5), (25, 35), (37.5, 87.5), (93.75, 96.875)]
    spans = [(int(a * SAMPLE_RATE), int(b * SAMPLE_RATE)) for a, b in seconds]
    splice = Splice.join(audio, spans, overlap_s=0.1)
    pieces = splice.pieces(max_s=28.0)
    lengths = [round(len(a) / SAMPLE_RATE, 3) for a, _ in pieces]
    assert lengths == [20.4, 10.2, 50.2, 3.125]  # 10 + 10 s together; 50 s alone
    assert [start for _, start in pieces] == [0, *np.cumsum([len(a) for a, _ in pieces[:-1]])]
    assert np.array_equal(np.concatenate([a for a, _ in pieces]), splice.audio)


@pytest.mark.parametrize(
    ("options", "batch", "expected"),
    [
        (Options(), 8, False),  # conditions on previous text: sequential
        (Options(condition_on_previous_text=False), 8, True),  # max_context 0
        (Options(condition_on_previous_text=False), 1, False),  # --stt-batch 1
        (Options(condition_on_previous_text=False, beam_size=5), 8, False),  # beam search
        (Options(vad=VadParams()), 8, True),  # speech spans are independent
    ],
)
def test_which_requests_are_batched(options: Options, batch: int, expected: bool) -> None:
    vad_dir = Path("silero-vad") if options.vad is not None else None
    job = SttJob(np.zeros(10, np.float32), options, None, vad_dir=vad_dir, batch=batch)
    assert batched(job) is expected


# ---- the real Whisper base on espeak-ng speech ----------------------------------------------


@pytest.fixture(scope="module")
def whisper_base() -> Path:
    from tests.real_weights import whisper_base_mlx

    return whisper_base_mlx()


def _sentences(texts: list[str], gap_s: float) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """espeak-ng's reading of each text with `gap_s` of silence around each; their spans."""
    from engine.audio import decode_audio
    from tests.engine.speech.test_real_weights import speech

    gap = np.zeros(int(gap_s * SAMPLE_RATE), np.float32)
    parts, spans, at = [gap], [], len(gap)
    for text in texts:
        clip = decode_audio(speech(text).read_bytes(), filename="s.wav")
        parts += [clip, gap]
        spans.append((at / SAMPLE_RATE, (at + len(clip)) / SAMPLE_RATE))
        at += len(clip) + len(gap)
    return np.concatenate(parts), spans


def test_vad_chunks_batched_give_each_chunks_sequential_text(
    whisper_base: Path, tmp_path: Path
) -> None:
    from conversions.silero import convert
    from engine.speech.vad import speech_splice
    from tests.engine.speech.test_real_weights import SENTENCES
    from tests.real_weights import silero_vad_16k

    convert(silero_vad_16k(), tmp_path / "silero-vad")
    audio, _ = _sentences(SENTENCES[:3], gap_s=2.0)
    splice = speech_splice(tmp_path / "silero-vad", audio, VadParams())
    assert splice is not None
    pieces = splice.pieces(max_s=1.0)  # one span a piece (the service packs up to 28 s)
    assert len(pieces) == 3
    runner = SpeechRunner.load(whisper_base, "whisper-base")
    together = runner.transcribe_pieces(pieces, batch=8, language="en")
    alone = [
        runner.transcribe(a, language="en", condition_on_previous_text=False) for a, _ in pieces
    ]
    assert together["text"] == "".join(r["text"] for r in alone)
    assert [s["tokens"] for s in together["segments"]] == [
        s["tokens"] for r in alone for s in r["segments"]
    ]


def test_max_context_0_on_70_seconds_keeps_words_in_order_and_times_inside(
    whisper_base: Path, tmp_path: Path
) -> None:
    import httpx

    from tests.engine.speech.test_real_weights import SENTENCES, normalise, word_errors
    from tests.serving import serve_one
    from tests.wav_files import float_wav

    audio, spans = _sentences(SENTENCES * 2, gap_s=0.3)
    seconds = len(audio) / SAMPLE_RATE
    assert seconds > 60
    reference = " ".join(SENTENCES * 2)
    fields = {"language": "en", "max_context": "0", "response_format": "verbose_json"}
    files = {"file": ("long.wav", float_wav(audio, SAMPLE_RATE), "audio/wav")}
    with contextmanager(serve_one)(tmp_path, "stt", whisper_base) as server:
        body = httpx.post(server.url("stt") + "/inference", files=files, data=fields, timeout=900)
    assert body.status_code == 200, body.text
    result = body.json()
    errors, words = word_errors(reference, result["text"])
    assert errors / words <= 0.15, result["text"]
    timed = [w for seg in result["segments"] for w in seg["words"] if normalise(w["word"])]
    assert len(timed) >= words - errors
    assert all(0 <= w["start"] <= w["end"] <= seconds for w in timed)
    starts = [w["start"] for w in timed]
    assert starts == sorted(starts)
    # "quick" opens the first sentence, "music" the last: each read twice, each in its span.
    for word, sentence in (("quick", 0), ("music", len(SENTENCES) - 1)):
        found = [w["start"] for w in timed if normalise(w["word"]) == [word]]
        own = [spans[sentence], spans[sentence + len(SENTENCES)]]
        assert len(found) == 2, (word, result["text"])
        for start, (a, b) in zip(found, own, strict=True):
            assert a - 0.5 <= start <= b, (word, start, a, b)
