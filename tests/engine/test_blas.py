"""The services' BLAS: `mlxd serve` preloads the system's OpenBLAS into its service processes on
Linux (no preload needed in the user's environment), `--blas bundled` keeps MLX's own, and
`mlxd doctor` reports what the services load and what each running one has loaded."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engine import blas
from tests.conftest import IN_CI
from tests.serving import start_server

OPENBLAS = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


def test_auto_preloads_the_system_openblas_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "find_openblas", lambda: Path(OPENBLAS))
    env = blas.worker_environment({"LD_PRELOAD": "/opt/other.so", "HOME": "/h"}, "auto", "linux")
    assert env["LD_PRELOAD"] == f"{OPENBLAS} /opt/other.so" and env["HOME"] == "/h"
    again = blas.worker_environment(env, "auto", "linux")
    assert again["LD_PRELOAD"] == env["LD_PRELOAD"]  # no second copy


def test_bundled_removes_a_preloaded_blas(monkeypatch: pytest.MonkeyPatch) -> None:
    env = blas.worker_environment({"LD_PRELOAD": f"{OPENBLAS}:/opt/x.so"}, "bundled", "linux")
    assert env["LD_PRELOAD"] == "/opt/x.so"
    assert "LD_PRELOAD" not in blas.worker_environment({"LD_PRELOAD": OPENBLAS}, "bundled")


def test_a_library_path_is_preloaded_as_given() -> None:
    env = blas.worker_environment({}, "/opt/lib/libmkl_rt.so", "linux")
    assert env["LD_PRELOAD"] == "/opt/lib/libmkl_rt.so"


def test_nothing_changes_on_macos(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(blas, "find_openblas", lambda: Path(OPENBLAS))
    assert blas.worker_environment({"A": "1"}, "auto", "darwin") == {"A": "1"}
    assert blas.preload_library("auto", "darwin") is None


def test_describe_names_the_blas_that_wins() -> None:
    bundled = "/venv/site-packages/mlx_cpu.libs/libblas-bd8a282c.so.3.10.0"
    openblas = "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblasp-r0.3.21.so"
    assert blas.describe([openblas, bundled]).startswith("OpenBLAS")
    assert blas.describe([bundled]).startswith("MLX's bundled reference BLAS")
    assert blas.describe(["/lib/libc.so.6"]) == "unknown"


def _system_openblas() -> Path:
    found = blas.find_openblas()
    if found is None or not sys.platform.startswith("linux"):
        if IN_CI:
            pytest.fail("CI installs libopenblas0-pthread; no system OpenBLAS was found")
        pytest.skip("no system OpenBLAS on this machine")
    return found


def _doctor(env: dict[str, str], *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "engine", "doctor", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return done.stdout + done.stderr


def test_served_workers_use_openblas_with_no_preload_in_the_environment(
    tmp_path: Path, tiny_gemma4: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _system_openblas()
    monkeypatch.delenv("LD_PRELOAD", raising=False)  # `mlxd serve` as the README runs it
    plain = dict(os.environ)
    server = start_server(tmp_path, "--chat-model", str(tiny_gemma4), services=("chat",))
    try:
        server.wait_healthy(timeout=300)
        port = server.ports["chat"]
        out = _doctor(plain, "--only", "chat", "--chat-port", str(port))
    finally:
        assert server.stop() == 0, server.log()
    running = [line for line in out.splitlines() if line.startswith("Running chat service")]
    assert running and f"port {port}" in running[0], out
    assert "OpenBLAS" in running[0], out
    assert "BLAS for the services (--blas auto): OpenBLAS" in out


def test_doctor_measures_the_bundled_blas_when_asked() -> None:
    _system_openblas()
    plain = {k: v for k, v in os.environ.items() if k != "LD_PRELOAD"}
    out = _doctor(plain, "--only", "chat", "--blas", "bundled")
    assert "BLAS for the services (--blas bundled): MLX's bundled reference BLAS" in out, out


def test_doctor_says_when_the_probe_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    from engine import cli

    monkeypatch.setattr(cli.sys, "executable", "/bin/false")
    assert cli._probe_blas(dict(os.environ)) == {"blas": "probe failed: no output", "gflops": 0.0}
