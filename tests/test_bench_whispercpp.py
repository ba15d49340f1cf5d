"""bench/whispercpp.py: Whisper base converted from its MLX directory to whisper.cpp's ggml file
reads espeak-ng's English through pywhispercpp, which proves the converter (header, mel filters,
vocabulary, tensor names, layouts and types as whisper.cpp's loader wants them)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import whispercpp
from tests.conftest import IN_CI
from tests.engine.speech.test_real_weights import normalise, speech, word_errors
from tests.real_weights import whisper_base_mlx

SENTENCE = "The quick brown fox jumps over the lazy dog."


@pytest.fixture(scope="session")
def ggml_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not whispercpp.available():
        message = "pip install pywhispercpp for whisper.cpp"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    out = tmp_path_factory.mktemp("whispercpp") / "ggml-base.bin"
    return whispercpp.ggml_from_mlx(whisper_base_mlx(), out)


def test_whisper_cpp_transcribes_espeak_with_the_converted_base(ggml_base: Path) -> None:
    text, seconds = whispercpp.transcribe(ggml_base, speech(SENTENCE))
    errors, _ = word_errors(SENTENCE, text)
    assert {"quick", "brown", "fox", "over", "lazy", "dog"} <= set(normalise(text)), text
    assert errors <= 1, text  # Whisper base hears espeak's "jumps" as "jump", MLX too
    assert seconds > 0


def test_a_quantized_directory_is_refused(tmp_path: Path) -> None:
    config = {name: 1 for name in whispercpp.HPARAMS}
    config["quantization"] = {"group_size": 64, "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="quantized"):
        whispercpp.ggml_from_mlx(tmp_path, tmp_path / "ggml.bin")
