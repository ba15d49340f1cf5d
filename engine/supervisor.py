"""`mlxd serve`: bind every port, then run and watch one process per service.

The supervisor touches no MLX. It binds the listening sockets itself (so a taken port fails fast,
before anything starts, and a restarted service reuses the same socket with no gap in which
another program could take the port), spawns each service as a fresh interpreter, and restarts a
service that dies, with backoff. A service that keeps dying makes the whole engine exit non-zero,
so that launchd's KeepAlive restarts it.
"""

from __future__ import annotations

import errno
import http.client
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from engine.blas import worker_environment
from engine.config import CONFIG_ENV, PROBE_AGENT, Config, Service, serve_flags
from engine.logfile import RotatingLog

log = logging.getLogger("mlxd.supervisor")

BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0  # seconds of uptime after which the backoff resets
MAX_CRASHES = 5  # within CRASH_WINDOW seconds, then give up and exit non-zero
CRASH_WINDOW = 120.0
PROBE_TIMEOUT = 2.0
PROBE_EVERY_MAX = 15.0
STALL_PROBES = 2  # consecutive "stalled" answers before the process is restarted


@dataclass(frozen=True)
class BindFailure:
    service: Service
    host: str
    port: int
    reason: str

    def __str__(self) -> str:
        return f"{_url_host(self.host)}:{self.port} for {self.service}: {self.reason}"


class PortInUse(OSError):
    """Ports that could not be bound: the message names each and the flags that move them."""

    def __init__(self, failures: list[BindFailure], services: tuple[Service, ...] = ()) -> None:
        self.failures = failures
        super().__init__(_port_message(failures, services))


def _port_message(failures: list[BindFailure], services: tuple[Service, ...]) -> str:
    flags = {f.dest: f.name for f in serve_flags()}
    taken = [f.service for f in failures]
    moves = ", ".join(f"{flags[f'{service}_port']} PORT" for service in taken)
    others = ",".join(s for s in services if s not in taken)
    one = len(failures) == 1
    hint = f"Stop what holds {'it' if one else 'them'}, or choose "
    hint += f"{'another port' if one else 'other ports'} ({moves})"
    if others:
        hint += f" or leave {'it' if one else 'them'} out (--only {others})"
    if one:
        return f"cannot listen on {failures[0]}.\n{hint}."
    listed = "".join(f"\n  {failure}" for failure in failures)
    return f"cannot listen on {len(failures)} ports:{listed}\n{hint}."


def bind(service: Service, host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
        sock.listen(512)
    except OSError as exc:
        sock.close()
        reason = "the port is already in use" if exc.errno == errno.EADDRINUSE else str(exc)
        raise PortInUse([BindFailure(service, host, port, reason)], (service,)) from exc
    sock.set_inheritable(True)
    return sock


@dataclass
class ServiceProcess:
    service: Service
    sock: socket.socket
    process: subprocess.Popen | None = None
    started_at: float = 0.0
    backoff: float = BACKOFF_START
    restart_at: float | None = None
    crashes: list[float] = field(default_factory=list)
    next_probe: float = 0.0
    stalled_probes: int = 0
    kill_at: float | None = None  # a stalled process told to stop is killed at this time


class Supervisor:
    def __init__(self, config: Config, log: RotatingLog | None = None) -> None:
        self.config = config
        self.log = log  # --log-file: the services' output is copied into it
        self.services: list[ServiceProcess] = []
        self._stopping = False
        self._relays: list[threading.Thread] = []

    def bind_all(self) -> None:
        """Bind every service's port; if any is taken, close them all and name every one."""
        failures: list[BindFailure] = []
        for service in self.config.only:
            try:
                sock = bind(service, self.config.host, self.config.port(service))
            except PortInUse as exc:
                failures += exc.failures
            else:
                self.services.append(ServiceProcess(service, sock))
        if failures:
            self.close_sockets()
            self.services.clear()
            raise PortInUse(failures, self.config.only)

    def close_sockets(self) -> None:
        for entry in self.services:
            entry.sock.close()

    def spawn(self, entry: ServiceProcess) -> None:
        env = worker_environment(os.environ, self.config.blas)
        env |= {CONFIG_ENV: self.config.to_json(), "PYTHONUNBUFFERED": "1"}
        fd = entry.sock.fileno()
        output = subprocess.PIPE if self.log is not None else None
        entry.process = subprocess.Popen(
            self.worker_command(entry.service, fd),
            pass_fds=(fd,),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT if output else None,
        )
        if self.log is not None and entry.process.stdout is not None:
            self._relays.append(self.log.relay(entry.process.stdout))
        entry.started_at = time.monotonic()
        entry.restart_at = None
        entry.next_probe = entry.started_at + self.probe_every()
        entry.stalled_probes, entry.kill_at = 0, None
        log.info("%s: started process %d", entry.service, entry.process.pid)

    def worker_command(self, service: Service, fd: int) -> list[str]:
        return [sys.executable, "-m", "engine.worker", service, str(fd)]

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (exit 0) or until a service keeps crashing (exit 1)."""
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for entry in self.services:
            self.spawn(entry)
        self._announce()
        code = 0
        while not self._stopping:
            for entry in self.services:
                if not self._check(entry):
                    code = 1
                    self._stopping = True
                    break
            time.sleep(0.2)
        self.shutdown()
        return code

    def _announce(self) -> None:
        for entry in self.services:
            host, port = entry.sock.getsockname()[:2]
            model = self.config.model(entry.service)
            print(
                f"mlxd: {entry.service} listening on http://{_url_host(host)}:{port} "
                f"(model {model})",
                file=sys.stderr,
                flush=True,
            )

    def _check(self, entry: ServiceProcess) -> bool:
        """Restart a dead service when its backoff has passed; False means give up."""
        now = time.monotonic()
        if entry.restart_at is not None:
            if now >= entry.restart_at:
                self.spawn(entry)
            return True
        assert entry.process is not None
        code = entry.process.poll()
        if code is None and not self._stopping:
            self._watch_stall(entry, now)
        if code is None or self._stopping:
            return True
        if now - entry.started_at > STABLE_AFTER:
            entry.backoff = BACKOFF_START
        entry.crashes = [t for t in entry.crashes if now - t < CRASH_WINDOW] + [now]
        if len(entry.crashes) > MAX_CRASHES:
            log.error(
                "%s: exited %d times within %.0f s; stopping mlxd so that its supervisor "
                "(launchd) restarts it",
                entry.service,
                len(entry.crashes),
                CRASH_WINDOW,
            )
            return False
        log.warning(
            "%s: process exited with code %s; restarting in %.1f s",
            entry.service,
            code,
            entry.backoff,
        )
        entry.restart_at = now + entry.backoff
        entry.backoff = min(entry.backoff * 2, BACKOFF_MAX)
        return True

    def probe_every(self) -> float:
        return min(PROBE_EVERY_MAX, max(0.5, self.config.stall_seconds / 4))

    def _watch_stall(self, entry: ServiceProcess, now: float) -> None:
        """Ask a running service's /health now and then; one whose model thread stays
        stalled is told to stop (its requests are answered 503), killed if it does not, and
        restarted like a crashed one."""
        assert entry.process is not None
        if entry.kill_at is not None:
            if now >= entry.kill_at:
                log.warning(
                    "%s: stalled process %d did not stop; killing it",
                    entry.service,
                    entry.process.pid,
                )
                entry.process.kill()
            return
        if self.config.stall_seconds <= 0 or now < entry.next_probe:
            return
        entry.next_probe = now + self.probe_every()
        stalled = health_status(entry.sock, self.config.host) == "stalled"
        entry.stalled_probes = entry.stalled_probes + 1 if stalled else 0
        if entry.stalled_probes >= STALL_PROBES:
            log.error(
                "%s: the model thread has made no progress on a job for %g s (--stall-seconds); "
                "restarting the process",
                entry.service,
                self.config.stall_seconds,
            )
            entry.process.send_signal(signal.SIGTERM)
            entry.kill_at = now + self.config.shutdown_timeout

    def _on_signal(self, signum: int, frame: object) -> None:
        self._stopping = True

    def shutdown(self) -> None:
        """Each service drains within the shutdown timeout (engine/shutdown.py); one that has
        not exited by then is killed."""
        running = [e.process for e in self.services if e.process and e.process.poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.config.shutdown_timeout
        for process in running:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("process %d did not stop in time; killing it", process.pid)
                process.kill()
                process.wait()
        self.close_sockets()
        for relay in self._relays:
            relay.join(1.0)


def _url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def health_status(sock: socket.socket, host: str) -> str | None:
    """The `status` a service's /health answers (None: no answer in time)."""
    address, port = sock.getsockname()[:2]
    if address in ("0.0.0.0", "::"):
        address = "127.0.0.1" if address == "0.0.0.0" else "::1"
    connection = http.client.HTTPConnection(address, port, timeout=PROBE_TIMEOUT)
    try:
        connection.request("GET", "/health", headers={"User-Agent": PROBE_AGENT})
        return json.loads(connection.getresponse().read()).get("status")
    except (OSError, ValueError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def serve(config: Config, log_file: RotatingLog | None = None) -> int:
    supervisor = Supervisor(config, log_file)
    try:
        supervisor.bind_all()
    except PortInUse as exc:
        print(f"mlxd: error: {exc}", file=sys.stderr)
        return 3
    return supervisor.run()
