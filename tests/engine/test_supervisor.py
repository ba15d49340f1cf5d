"""Process supervision: missing models, crashes, taken ports, signals, API keys, queue limits."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from engine.config import build_config
from engine.supervisor import PortInUse, Supervisor
from tests.conftest import model_flags
from tests.serving import free_port, start_server


def worker_pid(parent: int, service: str) -> int | None:
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == parent and b"engine.worker" in cmdline and service.encode() in cmdline:
            return int(entry)
    return None


def test_missing_model_is_503_with_install_hint_while_others_serve(tmp_path, tiny_models) -> None:
    models = {"embeddings": tiny_models["embeddings"], "stt": tiny_models["stt"]}
    server = start_server(tmp_path, *model_flags(models), "--chat-model", "gemma-4-e4b")
    try:
        server.wait_healthy(["embeddings", "stt"])
        server.wait_for(lambda: server.health("chat") == 503, 30, "chat up")
        health = server.get("chat", "/health")
        assert "mlxd pull gemma-4-e4b" in health.json()["message"]
        body = {"messages": [{"role": "user", "content": "hi"}]}
        response = server.post("chat", "/v1/chat/completions", json=body)
        assert response.status_code == 503
        assert "mlxd pull gemma-4-e4b" in response.json()["error"]["message"]
        assert server.post("embeddings", "/v1/embeddings", json={"input": "ok"}).status_code == 200
    finally:
        assert server.stop() == 0


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="finds worker processes through /proc")
def test_sigkill_of_one_service_leaves_the_others_up_and_it_comes_back(tmp_path, tiny_models):
    models = {"embeddings": tiny_models["embeddings"], "stt": tiny_models["stt"]}
    server = start_server(tmp_path, *model_flags(models), services=("embeddings", "stt"))
    try:
        server.wait_healthy()
        victim = worker_pid(server.process.pid, "embeddings")
        assert victim is not None
        os.kill(victim, signal.SIGKILL)
        server.wait_for(lambda: server.health("embeddings") != 200, 10, "embeddings down")
        assert server.health("stt") == 200
        server.wait_for(lambda: server.health("embeddings") == 200, 60, "embeddings back")
        assert worker_pid(server.process.pid, "embeddings") not in (None, victim)
        assert server.post("embeddings", "/v1/embeddings", json={"input": "ok"}).status_code == 200
        assert "embeddings: process exited with code -9; restarting" in server.log()
    finally:
        assert server.stop() == 0


def test_a_taken_port_exits_non_zero_naming_it(tmp_path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "engine", "serve", "--home", str(tmp_path)]
            + ["--chat-port", str(free_port()), "--embeddings-port", str(port)]
            + ["--stt-port", str(free_port())],
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert result.returncode != 0
    assert "started process" not in result.stderr  # refused before any service was started
    assert str(port) in result.stderr and "already in use" in result.stderr


def test_every_taken_port_is_named_with_the_flags_that_move_it(tmp_path) -> None:
    with socket.socket() as chat, socket.socket() as stt:
        for blocker in (chat, stt):
            blocker.bind(("127.0.0.1", 0))
            blocker.listen()
        taken = {"chat_port": chat.getsockname()[1], "stt_port": stt.getsockname()[1]}
        free = free_port()
        config = build_config({"home": str(tmp_path), "embeddings_port": free, **taken})
        supervisor = Supervisor(config)
        with pytest.raises(PortInUse) as raised:
            supervisor.bind_all()
    message = str(raised.value)
    for port in taken.values():
        assert f"127.0.0.1:{port}" in message
    assert "--chat-port PORT, --stt-port PORT" in message and "--only embeddings" in message
    assert "embeddings" not in {failure.service for failure in raised.value.failures}
    assert supervisor.services == []
    with socket.socket() as again:
        again.bind(("127.0.0.1", free))  # the port that was bound is closed again


def test_sigterm_exits_zero_promptly_even_with_work_in_flight(tmp_path, tiny_models) -> None:
    server = start_server(tmp_path, *model_flags({"chat": tiny_models["chat"]}), services=("chat",))
    server.wait_healthy()
    body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 3000}
    thread = threading.Thread(
        target=lambda: _ignore(lambda: server.post("chat", "/v1/chat/completions", json=body))
    )
    thread.start()
    time.sleep(0.5)
    assert server.stop(timeout=20) == 0  # by itself: stop() kills only after the timeout
    thread.join(5)
    assert worker_pid(server.process.pid, "chat") is None


def _ignore(call) -> None:
    with contextlib.suppress(httpx.HTTPError):
        call()


def test_api_key_is_required_except_for_health(tmp_path, tiny_models) -> None:
    models = {"embeddings": tiny_models["embeddings"]}
    server = start_server(
        tmp_path, *model_flags(models), services=("embeddings",), env={"MLXD_API_KEY": "s3cret"}
    )
    try:
        server.wait_healthy()
        response = server.post("embeddings", "/v1/embeddings", json={"input": "x"})
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
        assert server.get("embeddings", "/v1/models").status_code == 401
        headers = {"authorization": "Bearer s3cret"}
        ok = server.post("embeddings", "/v1/embeddings", json={"input": "x"}, headers=headers)
        assert ok.status_code == 200
    finally:
        server.stop()


def test_non_loopback_host_without_key_is_refused(tmp_path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--home", str(tmp_path), "--host", "0.0.0.0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "API key" in result.stderr


def test_queue_limit_answers_503_with_retry_after(tmp_path, tiny_models) -> None:
    flags = [*model_flags({"chat": tiny_models["chat"]}), "--queue-size", "1"]
    server = start_server(tmp_path, *flags, services=("chat",))
    try:
        server.wait_healthy()
        body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 1500}
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    server.post("chat", "/v1/chat/completions", json=body)
                )
            )
            for _ in range(4)
        ]
        for thread in threads:
            thread.start()
            time.sleep(0.1)
        for thread in threads:
            thread.join(120)
        statuses = sorted(r.status_code for r in results)
        assert statuses[0] == 200 and 503 in statuses
        busy = next(r for r in results if r.status_code == 503)
        assert busy.headers["retry-after"] == "1"
        assert busy.json()["error"]["code"] == "queue_full"
    finally:
        server.stop()
