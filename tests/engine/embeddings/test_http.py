"""Port 8081 through a running `mlxd serve` with the tiny random BERT: abandoned requests leave
the queue and the running batch, and a large response is built off the event loop."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.serving import Server, serve_one

LARGE = {"input": [" ".join(f"word{i}" for i in range(120))] * 2048}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bge: Path) -> Iterator[Server]:
    yield from serve_one(tmp_path_factory.mktemp("embeddings"), "embeddings", tiny_bge)


def _texts_embedded(server: Server) -> float:
    metrics = server.get("embeddings", "/metrics").text
    return float(re.search(r"^mlxd_embeddings_texts_total (\S+)$", metrics, re.M).group(1))


def _abandon(server: Server) -> None:
    """Send the large request and leave before the answer."""
    try:
        httpx.post(server.url("embeddings") + "/v1/embeddings", json=LARGE, timeout=1.5)
    except httpx.TimeoutException:
        return
    raise AssertionError("the large request was answered before its client left")


def test_abandoned_requests_do_not_delay_the_next_one(server: Server) -> None:
    before = _texts_embedded(server)
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        list(pool.map(lambda _: _abandon(server), range(20)))
    server.wait_for(lambda: server.log().count("POST /v1/embeddings 499") == 20, 30, "20 499s")
    response = server.post("embeddings", "/v1/embeddings", json={"input": "hello"})
    assert response.status_code == 200 and len(response.json()["data"]) == 1
    # Answered with nothing left in flight: the abandoned work was dropped, not finished.
    assert server.get("embeddings", "/mlxd/ps").json()["requests_pending"] == 0
    assert _texts_embedded(server) - before < 2048


def test_a_large_response_is_whole(server: Server) -> None:
    body = {"input": ["a b c", "d e"] * 1024, "encoding_format": "float"}  # past 64 Ki floats
    data = server.post("embeddings", "/v1/embeddings", json=body).json()["data"]
    assert [d["index"] for d in data] == list(range(2048))
    assert data[0]["embedding"] == data[2]["embedding"] != data[1]["embedding"]
    base64 = server.post("embeddings", "/v1/embeddings", json={**body, "encoding_format": "base64"})
    assert len(base64.json()["data"]) == 2048
