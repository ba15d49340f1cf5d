"""The suite runs offline: models come from the tests' own builds, never the hub."""

from __future__ import annotations

import os

import pytest


@pytest.mark.parametrize(
    ("module", "loader"),
    [("mlx_whisper.load_models", "load_model"), ("mlx_embeddings.utils", "load")],
)
def test_a_model_asked_for_by_hub_id_fails_the_test(module: str, loader: str) -> None:
    import importlib

    load = getattr(importlib.import_module(module), loader)
    with pytest.raises(AssertionError, match="asked the hub for 'mlx-community/not-local'"):
        load("mlx-community/not-local")


def test_huggingface_hub_is_offline() -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
