"""engine.validation's body parsing through an app: a large JSON body is parsed off the event
loop, with the same answers as a small one."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sanic_testing.reusable import ReusableClient

from engine import validation
from engine.app import create_app
from engine.config import build_config
from tests.engine.fakes import fake_model_dir, fake_spec
from tests.serving import free_port


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReusableClient]:
    home = tmp_path_factory.mktemp("validation")
    config = build_config(
        {"home": str(home), "embeddings_model": str(fake_model_dir(Path(home), "embeddings"))}
    )
    spec, _ = fake_spec("embeddings")
    with ReusableClient(create_app(spec, config), port=free_port()) as running:
        for _ in range(200):
            if running.get("/health")[1].status == 200:
                break
            time.sleep(0.05)
        yield running


@pytest.fixture
def loops(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """For each body parsed: whether it was parsed on the event loop."""
    seen: list[bool] = []
    parse = validation._parse_json_body

    def recording(request):
        seen.append(asyncio._get_running_loop() is not None)
        return parse(request)

    monkeypatch.setattr(validation, "_parse_json_body", recording)
    return seen


def post(client: ReusableClient, body: bytes) -> tuple[int, dict]:
    headers = {"content-type": "application/json"}
    _, response = client.post("/v1/embeddings", content=body, headers=headers)
    return response.status, response.json


def test_a_large_body_is_parsed_off_the_event_loop(client, loops: list[bool]) -> None:
    small = json.dumps({"input": "hi"}).encode()
    large = json.dumps({"input": ["x" * 1000] * 1100, "truncate": True}).encode()
    assert len(large) > validation.LARGE_BODY_BYTES
    assert post(client, small)[0] == 200
    status, body = post(client, large)
    assert status == 200 and len(body["data"]) == 1100
    assert loops == [True, False]


def test_a_large_bad_body_gets_the_same_400(client, loops: list[bool]) -> None:
    pad = b" " * (validation.LARGE_BODY_BYTES + 1)
    for bad, what in ((b"[" * 100_000, "nested too deeply"), (b"{'a': 1}", "not valid JSON")):
        status, body = post(client, bad + pad)
        assert status == 400 and what in body["error"]["message"]
        assert body["error"]["code"] == "invalid_json"
    assert loops == [False, False]
