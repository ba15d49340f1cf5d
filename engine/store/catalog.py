"""The services, their default model ids, and the models `mlxd pull` knows by a short id."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

Service = Literal["chat", "embeddings", "stt"]
SERVICES: tuple[Service, ...] = get_args(Service)
# What a store model is for: a service, or the speech service's voice activity detector.
Kind = Literal["chat", "embeddings", "stt", "vad"]
KINDS: tuple[Kind, ...] = get_args(Kind)
VAD_ID = "silero-vad"  # the detector the speech service uses unless told otherwise

# Each service serves this id unless told otherwise, and also answers to it as an alias.
DEFAULT_IDS: dict[Service, str] = {
    "chat": "gemma-4-e4b",
    "embeddings": "bge-base-zh",
    "stt": "whisper-large-v3-turbo",
}


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    kind: Kind
    repo: str
    quantization: int | None
    dtype: str
    note: str


CATALOG: dict[str, CatalogEntry] = {
    entry.id: entry
    for entry in [
        CatalogEntry(
            DEFAULT_IDS["chat"],
            "chat",
            "google/gemma-4-E4B-it",
            4,
            "bfloat16",
            "Gemma 4 E4B instruct, vision + thinking (language model 4-bit)",
        ),
        CatalogEntry(
            DEFAULT_IDS["embeddings"],
            "embeddings",
            "BAAI/bge-base-zh-v1.5",
            None,
            "float16",
            "BGE base zh v1.5, 768-dim, CLS pooling",
        ),
        CatalogEntry(
            "bge-small-zh",
            "embeddings",
            "BAAI/bge-small-zh-v1.5",
            None,
            "float16",
            "BGE small zh v1.5, 512-dim, CLS pooling",
        ),
        CatalogEntry(
            "all-minilm-l6-v2",
            "embeddings",
            "sentence-transformers/all-MiniLM-L6-v2",
            None,
            "float16",
            "all-MiniLM-L6-v2, 384-dim, mean pooling",
        ),
        CatalogEntry(
            DEFAULT_IDS["stt"],
            "stt",
            "openai/whisper-large-v3-turbo",
            None,
            "float16",
            "Whisper large-v3 turbo, multilingual",
        ),
        CatalogEntry(
            "whisper-large-v3",
            "stt",
            "openai/whisper-large-v3",
            None,
            "float16",
            "Whisper large-v3, multilingual",
        ),
        CatalogEntry(
            "whisper-medium",
            "stt",
            "openai/whisper-medium",
            None,
            "float16",
            "Whisper medium, multilingual",
        ),
        CatalogEntry(
            "whisper-small",
            "stt",
            "openai/whisper-small",
            None,
            "float16",
            "Whisper small, multilingual",
        ),
        CatalogEntry(
            "whisper-base",
            "stt",
            "openai/whisper-base",
            None,
            "float16",
            "Whisper base, multilingual",
        ),
        CatalogEntry(
            "whisper-tiny",
            "stt",
            "openai/whisper-tiny",
            None,
            "float16",
            "Whisper tiny, multilingual",
        ),
        CatalogEntry(
            VAD_ID,
            "vad",
            "pypi:silero-vad==6.2.3",
            None,
            "float32",
            "Silero VAD v6 16 kHz, the speech service's voice activity detector",
        ),
    ]
}

DEFAULT_QUANTIZATION: dict[Kind, int | None] = {
    "chat": 4,
    "embeddings": None,
    "stt": None,
    "vad": None,
}
# On a GPU (Metal, CUDA). MLX's CPU backend runs half-precision weights and quantization
# scales several times slower than float32 (a Gemma 3 270M at q8: 0.19 vs 2.1 tokens/s).
GPU_DTYPE: dict[Kind, str] = {
    "chat": "bfloat16",
    "embeddings": "float16",
    "stt": "float16",
    "vad": "float32",
}
HALF_DTYPES = ("float16", "bfloat16")
CPU_DTYPE = "float32"


def runs_on_cpu() -> bool:
    """Whether MLX has neither a Metal nor a CUDA GPU here (e.g. Linux with mlx[cpu])."""
    import mlx.core as mx

    cuda = getattr(mx, "cuda", None)
    return not (mx.metal.is_available() or (cuda is not None and cuda.is_available()))


def default_dtype(service: Kind, entry: CatalogEntry | None = None) -> str:
    """The float dtype to convert to here: the catalog entry's, else the service's; a half
    type becomes float32 where MLX runs on the CPU."""
    dtype = entry.dtype if entry else GPU_DTYPE[service]
    return CPU_DTYPE if dtype in HALF_DTYPES and runs_on_cpu() else dtype
