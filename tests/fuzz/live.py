"""A service with fake runners served on a real port, for clients that speak HTTP themselves
(the OpenAI and Anthropic SDKs, schemathesis, raw sockets)."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from tests.engine.test_app import serving

SERVICES = ("chat", "embeddings", "stt")


@contextlib.contextmanager
def live(tmp_path: Path, service: str, runner: Any = None, **settings: Any) -> Iterator[str]:
    """The service's base URL while its event loop runs in a thread."""
    with serving(tmp_path, service, runner, **settings) as (client, _):
        thread = threading.Thread(target=client._loop.run_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{client.port}"
        finally:
            client._loop.call_soon_threadsafe(client._loop.stop)
            thread.join()
