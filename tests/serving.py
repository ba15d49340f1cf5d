"""Start `mlxd serve` as a real subprocess on free ports, for end-to-end tests."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx

PORT_FLAGS = {"chat": "--chat-port", "embeddings": "--embeddings-port", "stt": "--stt-port"}


def poll_until(
    predicate: Callable[[], bool], what: str, tries: int = 1200, interval: float = 0.05
) -> None:
    """Wait for ``predicate``, checking it ``tries`` times; only a guard against a hang (the
    wait is not timed: on a loaded machine each sleep just lasts longer)."""
    for _ in range(tries):
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"{what}: not seen after {tries} checks")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    ports: dict[str, int]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    def url(self, service: str) -> str:
        return f"http://127.0.0.1:{self.ports[service]}"

    def get(self, service: str, path: str, **kwargs) -> httpx.Response:
        return httpx.get(self.url(service) + path, timeout=60, **kwargs)

    def post(self, service: str, path: str, **kwargs) -> httpx.Response:
        return httpx.post(self.url(service) + path, timeout=120, **kwargs)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def health(self, service: str) -> int | None:
        try:
            return httpx.get(self.url(service) + "/health", timeout=2).status_code
        except httpx.HTTPError:
            return None

    def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            if self.process.poll() is not None:
                raise AssertionError(
                    f"mlxd exited ({self.process.returncode}) waiting for {what}:\n{self.log()}"
                )
            time.sleep(0.2)
        raise AssertionError(
            f"timed out after {timeout} s waiting for {what}:\n{self.log()[-4000:]}"
        )

    def wait_healthy(self, services: list[str] | None = None, timeout: float = 120) -> None:
        names = services or list(self.ports)
        self.wait_for(lambda: all(self.health(s) == 200 for s in names), timeout, f"{names} ready")

    def stop(self, timeout: float = 20) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


def start_server(
    tmp: Path, *args: str, services: tuple[str, ...] = ("chat", "embeddings", "stt"), env=None
) -> Server:
    ports = {service: free_port() for service in services}
    command = [sys.executable, "-m", "engine", "serve", "--home", str(tmp / "home")]
    command += ["--only", ",".join(services)]
    for service, port in ports.items():
        command += [PORT_FLAGS[service], str(port)]
    command += list(args)
    log_path = tmp / f"mlxd-{'-'.join(map(str, ports.values()))}.log"
    environment = {k: v for k, v in os.environ.items() if not k.startswith("MLXD_")}
    environment.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    process = subprocess.Popen(
        command,
        stdout=log_path.open("w"),
        stderr=subprocess.STDOUT,
        env=environment,
        start_new_session=True,
    )
    return Server(process, ports, log_path, environment)


def serve_one(
    tmp: Path, service: str, model: Path, *args: str, env=None, timeout: float = 300
) -> Iterator[Server]:
    """For a fixture: `service` alone on `model`, healthy; on teardown it must exit 0."""
    running = start_server(
        tmp, f"--{service}-model", str(model), *args, services=(service,), env=env
    )
    try:
        running.wait_healthy(timeout=timeout)
        yield running
    finally:
        code = running.stop()
    assert code == 0, running.log()
