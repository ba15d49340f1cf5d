"""`vad` on port 8082 with the real Whisper base and the real Silero VAD: silence and noise
transcribe to nothing; sentences between long silences keep their words, each word timed
inside its sentence in the uploaded audio; without the VAD model a vad request is a 400."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from conversions.silero import convert
from engine.audio import SAMPLE_RATE, decode_audio
from tests.engine.speech.test_real_weights import SENTENCES, normalise, speech, word_errors
from tests.real_weights import silero_vad_16k, whisper_base_mlx
from tests.serving import Server, serve_one
from tests.wav_files import float_wav

GAP_S = 12.0  # silence before, between and after the sentences
TOLERANCE_S = 0.3  # word timing slack (DTW alignment), seconds


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("stt-vad")
    convert(silero_vad_16k(), tmp / "silero-vad")
    model = whisper_base_mlx()
    yield from serve_one(tmp, "stt", model, "--stt-vad-model", str(tmp / "silero-vad"))


def post(server: Server, audio: np.ndarray, path: str = "/inference", **fields: str):
    files = {"file": ("a.wav", float_wav(audio, SAMPLE_RATE), "audio/wav")}
    return httpx.post(server.url("stt") + path, files=files, data=fields, timeout=600)


@pytest.mark.parametrize("kind", ["silence", "noise"])
def test_no_speech_is_empty_text(server: Server, kind: str) -> None:
    seconds = 60 * SAMPLE_RATE
    rng = np.random.default_rng(5)
    audio = np.zeros(seconds) if kind == "silence" else rng.normal(0, 0.1, seconds)
    audio = audio.astype(np.float32)
    inference = post(server, audio, vad="true", response_format="verbose_json")
    assert inference.status_code == 200, inference.text
    assert inference.json()["text"] == "" and inference.json()["segments"] == []
    openai = post(server, audio, "/v1/audio/transcriptions", vad="true")
    assert openai.status_code == 200 and openai.json()["text"] == ""


def test_sentences_between_silences_keep_words_and_times(server: Server) -> None:
    gap = np.zeros(int(GAP_S * SAMPLE_RATE), np.float32)
    parts, spans, at = [gap], [], len(gap)
    for text in SENTENCES[:3]:
        clip = decode_audio(speech(text).read_bytes(), filename="s.wav")
        parts += [clip, gap]
        spans.append((at / SAMPLE_RATE, (at + len(clip)) / SAMPLE_RATE))
        at += len(clip) + len(gap)
    audio = np.concatenate(parts)
    body = post(server, audio, vad="true", response_format="verbose_json", language="en").json()
    errors, words = word_errors(" ".join(SENTENCES[:3]), body["text"])
    assert errors / words <= 0.15, body["text"]
    timed = [w for seg in body["segments"] for w in seg["words"] if normalise(w["word"])]
    assert len(timed) >= words - errors
    for word in timed:
        inside = [
            a - TOLERANCE_S <= word["start"] <= word["end"] <= b + TOLERANCE_S for a, b in spans
        ]
        assert any(inside), (word, spans)
    # Each sentence's words fall in that sentence's own span, in order.
    firsts = [normalise(s)[0] for s in SENTENCES[:3]]
    starts = [next(w["start"] for w in timed if normalise(w["word"]) == [f]) for f in firsts]
    for start, (a, b) in zip(starts, spans, strict=True):
        assert a - TOLERANCE_S <= start <= b


def test_vad_without_the_model_is_a_400_naming_the_install_command(tmp_path: Path) -> None:
    from engine.config import Config
    from engine.errors import InvalidRequest
    from engine.speech.http import _vad_model

    with pytest.raises(InvalidRequest) as caught:
        _vad_model(Config(home=tmp_path))
    assert caught.value.status == 400 and caught.value.param == "vad"
    assert "mlxd pull silero-vad" in str(caught.value)
