"""The hostile corpus (tests/fuzz/corpus.py) replayed on each service's socket: each entry is
its 4xx in the error shape (bytes that are not HTTP at once, then a closed connection), and
afterwards the service still answers."""

from __future__ import annotations

import contextlib
import json
import socket
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.engine.fakes import FakeChat, FakeEmbeddings
from tests.engine.test_app import serving
from tests.fuzz.corpus import (
    FORM_ROUTE,
    JSON_ROUTES,
    VALID,
    Hostile,
    form_corpus,
    json_corpus,
    transport_corpus,
)
from tests.fuzz.live import SERVICES, live
from tests.serving import poll_until
from tests.wav_files import int_wav

WAV = int_wav(np.zeros(1600, dtype=np.int16), 16000)


def exchange(url: str, request: bytes) -> bytes:
    """Everything the server sends back before it closes the connection (each request says
    Connection: close; bytes that are not HTTP are closed on)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # the server may answer and close before reading it all
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
    return received


def status_and_body(answer: bytes) -> tuple[int, bytes]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def corpus(service: str) -> list[Hostile]:
    if service == "stt":
        return form_corpus(WAV) + transport_corpus(FORM_ROUTE)
    return json_corpus(service) + transport_corpus(JSON_ROUTES[service])


def check_answer(entry: Hostile, answer: bytes) -> None:
    status, body = status_and_body(answer)
    assert status == entry.status, (entry.name, answer[:300])
    error = json.loads(body)["error"]
    assert set(error) >= {"message", "type", "param", "code"} and error["message"]
    assert entry.code is None or error["code"] == entry.code, (entry.name, error)


@pytest.mark.parametrize("service", SERVICES)
def test_each_hostile_request_is_refused_and_the_service_stays_up(
    tmp_path: Path, service: str
) -> None:
    with live(tmp_path, service) as url:
        for entry in corpus(service):
            check_answer(entry, exchange(url, entry.request))
            assert httpx.get(f"{url}/health").status_code == 200, entry.name
        assert served(url, service).status_code == 200


def served(url: str, service: str) -> httpx.Response:
    """A good request, answered after the corpus."""
    if service == "stt":
        files = {"file": ("a.wav", WAV)}
        return httpx.post(f"{url}{FORM_ROUTE}", files=files, timeout=60)
    body = VALID[service] + b"}"
    return httpx.post(f"{url}{JSON_ROUTES[service]}", content=body, timeout=60)


class FailingEmbeddings(FakeEmbeddings):
    """Fails on one text, as a bug in the model code would."""

    def embed(self, token_lists: list[list[int]]) -> np.ndarray:
        if [101, *[ord(c) % 200 + 1 for c in "boom"], 102] in token_lists:
            raise RuntimeError("the model broke")
        return super().embed(token_lists)


def test_an_internal_error_is_a_500_logged_with_the_request_id(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with serving(tmp_path, "embeddings", FailingEmbeddings()) as (client, _):
        headers = {"x-request-id": "fuzz-500"}
        response = client.post("/v1/embeddings", json={"input": "boom"}, headers=headers)[1]
        assert response.status == 500 and response.json["error"]["type"] == "server_error"
        assert "RuntimeError: the model broke" in response.json["error"]["message"]
        lines = [r.getMessage() for r in caplog.records if r.name == "mlxd.server"]
        assert any("POST /v1/embeddings id=fuzz-500" in line for line in lines), lines
        assert client.post("/v1/embeddings", json={"input": "fine"})[1].status == 200


def test_a_request_in_flight_is_answered_through_the_corpus(tmp_path: Path) -> None:
    gate = threading.Event()
    fake = FakeChat(gate=gate, script=("All", " fine", "."))
    answers: list[httpx.Response] = []
    body = {"messages": [{"role": "user", "content": "hi"}]}
    with live(tmp_path, "chat", fake) as url:
        post = threading.Thread(
            target=lambda: answers.append(
                httpx.post(f"{url}/v1/chat/completions", json=body, timeout=120)
            )
        )
        post.start()
        poll_until(lambda: any("params" in call for call in fake.calls), "the reply started")
        for entry in corpus("chat"):
            check_answer(entry, exchange(url, entry.request))
        gate.set()
        post.join()
    assert answers[0].status_code == 200
    assert answers[0].json()["choices"][0]["message"]["content"] == "All fine."
