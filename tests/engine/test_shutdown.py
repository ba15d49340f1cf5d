"""SIGTERM with work in flight on all three services: every request is answered, either in full
or with a 503 shutting_down, and mlxd exits 0 by itself. A model thread that stalls turns
/health to 503 and its process is restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from tests.conftest import model_flags
from tests.engine.fakes import fake_model_dir
from tests.serving import Server, free_port, start_server
from tests.wav_files import int_wav

SHUTDOWN_TIMEOUT = 6


def _noise_wav(seconds: float) -> bytes:
    samples = np.random.default_rng(0).normal(0, 3000, int(16000 * seconds))
    return int_wav(samples.astype(np.int16), 16000)


def _chat_stream(server: Server, body: dict[str, Any]) -> dict[str, Any]:
    """The stream's status, its data frames and whether it ended with [DONE]."""
    frames: list[Any] = []
    url = server.url("chat") + "/v1/chat/completions"
    with httpx.stream("POST", url, json={**body, "stream": True}, timeout=120) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data = line[len("data: ") :]
                frames.append(data if data == "[DONE]" else json.loads(data))
    return {"status": response.status_code, "frames": frames}


def _in_thread(results: dict[str, Any], name: str, call: Callable[[], Any]) -> threading.Thread:
    def run() -> None:
        try:
            results[name] = call()
        except httpx.HTTPError as exc:  # no answer at all: the test fails on it
            results[name] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _assert_finished_or_refused(name: str, response: Any) -> None:
    assert isinstance(response, httpx.Response), f"{name}: no answer ({response!r})"
    if response.status_code == 503:
        assert response.json()["error"]["code"] == "shutting_down", response.text
        assert response.headers["retry-after"], name
        return
    assert response.status_code == 200, f"{name}: {response.status_code} {response.text[:300]}"
    for choice in response.json().get("choices", []):
        assert choice["finish_reason"] in ("stop", "length"), choice["finish_reason"]


def _assert_stream_whole_or_refused(stream: Any) -> None:
    assert isinstance(stream, dict), f"stream: no answer ({stream!r})"
    frames = stream["frames"]
    assert stream["status"] == 200, stream
    if frames[-1] == "[DONE]":
        reasons = [c["finish_reason"] for f in frames[:-1] for c in f.get("choices", [])]
        assert {r for r in reasons if r} <= {"stop", "length"}, reasons[-5:]
        return
    assert frames[-1]["error"]["code"] == "shutting_down", frames[-1]
    reasons = [c.get("finish_reason") for f in frames[:-1] for c in f.get("choices", [])]
    assert "cancelled" not in reasons, reasons[-5:]


def test_sigterm_with_chat_embeddings_and_speech_in_flight(tmp_path, tiny_models) -> None:
    timeout = ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT), "--queue-size", "200"]
    server = start_server(tmp_path, *model_flags(tiny_models), *timeout)
    server.wait_healthy()
    # On the seeded tiny model this seed samples no end of turn for hundreds of tokens; four
    # choices of up to 4000 tokens each outlast the drain on this machine (or finish: both pass).
    long_chat = {
        "messages": [{"role": "user", "content": "Go"}],
        "max_tokens": 4000,
        "seed": 2,
        "n": 4,
    }
    texts = ["a long sentence of words to embed " * 15] * 256
    audio = _noise_wav(600)
    results: dict[str, Any] = {}
    threads = [
        _in_thread(results, "stream", lambda: _chat_stream(server, long_chat)),
        _in_thread(
            results,
            "chat",
            lambda: server.post("chat", "/v1/chat/completions", json=long_chat),
        ),
    ]
    for i in range(12):
        threads.append(
            _in_thread(
                results,
                f"embeddings-{i}",
                lambda: server.post("embeddings", "/v1/embeddings", json={"input": texts}),
            )
        )
    for i in range(2):
        threads.append(
            _in_thread(
                results,
                f"speech-{i}",
                lambda: server.post("stt", "/inference", files={"file": ("a.wav", audio)}),
            )
        )
    server.wait_for(
        lambda: _busy(server, "chat") and _busy(server, "embeddings") and _busy(server, "stt"),
        120,
        "work in flight on every service",
    )
    code = server.stop(timeout=SHUTDOWN_TIMEOUT + 60)  # kills only after that
    for thread in threads:
        thread.join(60)
    assert code == 0, server.log()[-3000:]
    assert "did not stop in time" not in server.log()
    _assert_stream_whole_or_refused(results["stream"])
    whole = results["stream"]["frames"][-1] == "[DONE]"
    outcome = "stream=completed" if whole else "stream=failed:shutting_down"
    assert outcome in server.log()  # the access line tells how the stream ended
    for name, response in results.items():
        if name != "stream":
            _assert_finished_or_refused(name, response)
    assert "Traceback" not in server.log()


def _busy(server: Server, service: str) -> bool:
    """The service has requests in flight (its /metrics in-flight or queue gauge is above 0)."""
    try:
        ps = server.get(service, "/mlxd/ps").json()
    except (httpx.HTTPError, ValueError):
        return False
    return ps["requests_pending"] > 0


def test_a_stalled_model_thread_is_503_stalled_and_its_process_is_restarted(tmp_path) -> None:
    model = fake_model_dir(tmp_path, "embeddings")
    port = free_port()
    command = [sys.executable, "-m", "tests.engine.stall_serve", "--home", str(tmp_path)]
    command += ["--only", "embeddings", "--embeddings-port", str(port)]
    command += ["--embeddings-model", str(model), "--stall-seconds", "1"]
    command += ["--shutdown-timeout", "5"]
    log_path = tmp_path / "mlxd.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
    process = subprocess.Popen(
        command, stdout=log_path.open("w"), stderr=subprocess.STDOUT, env=env
    )
    server = Server(process, {"embeddings": port}, log_path)
    try:
        server.wait_healthy()
        first = server.get("embeddings", "/mlxd/ps").json()["pid"]
        results: dict[str, Any] = {}
        hung = _in_thread(
            results,
            "hung",
            lambda: server.post("embeddings", "/v1/embeddings", json={"input": "hang"}),
        )
        bodies: list[dict] = []

        def stalled() -> bool:
            response = server.get("embeddings", "/health")
            bodies.append(response.json())
            return response.status_code == 503 and response.json()["status"] == "stalled"

        server.wait_for(stalled, 60, "/health 503 stalled")
        assert "--stall-seconds 1" in bodies[-1]["message"]
        hung.join(60)
        _assert_finished_or_refused("hung", results["hung"])
        assert results["hung"].status_code == 503
        server.wait_healthy(timeout=60)
        assert server.get("embeddings", "/mlxd/ps").json()["pid"] != first
        ok = server.post("embeddings", "/v1/embeddings", json={"input": "fine"})
        assert ok.status_code == 200
        assert "no progress on a job" in server.log() and "restarting" in server.log()
    finally:
        assert server.stop() == 0, server.log()[-3000:]
