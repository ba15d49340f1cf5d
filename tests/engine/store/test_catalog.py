"""The conversion dtype by platform: float32 on MLX's CPU backend, half types on a GPU."""

from __future__ import annotations

import mlx.core as mx
import pytest

from engine.store.catalog import CATALOG, CatalogEntry, default_dtype


def platform(monkeypatch: pytest.MonkeyPatch, *, metal: bool, cuda: bool) -> None:
    monkeypatch.setattr(mx.metal, "is_available", lambda: metal)
    if hasattr(mx, "cuda"):
        monkeypatch.setattr(mx.cuda, "is_available", lambda: cuda)


def test_cpu_converts_to_float32(monkeypatch: pytest.MonkeyPatch) -> None:
    platform(monkeypatch, metal=False, cuda=False)
    assert {default_dtype(kind) for kind in ("chat", "embeddings", "stt")} == {"float32"}
    assert {default_dtype(e.kind, e) for e in CATALOG.values()} == {"float32"}


def test_metal_keeps_the_half_types(monkeypatch: pytest.MonkeyPatch) -> None:
    platform(monkeypatch, metal=True, cuda=False)
    assert default_dtype("chat") == "bfloat16" and default_dtype("stt") == "float16"
    assert default_dtype("chat", CATALOG["gemma-4-e4b"]) == "bfloat16"
    assert default_dtype("embeddings", CATALOG["bge-base-zh"]) == "float16"


def test_cuda_keeps_the_half_types(monkeypatch: pytest.MonkeyPatch) -> None:
    if not hasattr(mx, "cuda"):
        pytest.skip("this MLX has no mx.cuda")
    platform(monkeypatch, metal=False, cuda=True)
    assert default_dtype("embeddings") == "float16"


def test_a_float32_entry_stays_float32_everywhere(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = CatalogEntry("m", "embeddings", "org/m", None, "float32", "")
    for metal in (False, True):
        platform(monkeypatch, metal=metal, cuda=False)
        assert default_dtype("embeddings", entry) == "float32"
