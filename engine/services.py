"""The three services by name: the one module that knows them all (the worker builds an app
from a spec; `mlxd convert` and `mlxd pull` smoke-test a conversion with the runner that will
serve it)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from engine.app import ServiceSpec
from engine.store.catalog import Kind, Service


def spec(service: Service) -> ServiceSpec:
    if service == "chat":
        from engine.chat.http import SERVICE
    elif service == "embeddings":
        from engine.embeddings.http import SERVICE
    else:
        from engine.speech.http import SERVICE
    return SERVICE


def smoke_test(service: Kind) -> Callable[[Path], None]:
    """Loads a converted model directory as `service` does and runs it once (MLX; the caller's
    thread becomes that model's one MLX thread for the duration)."""
    if service == "vad":
        from engine.speech.vad import smoke_test
    elif service == "chat":
        from engine.chat.runner import smoke_test
    elif service == "embeddings":
        from engine.embeddings.runner import smoke_test
    else:
        from engine.speech.runner import smoke_test
    return smoke_test
