"""`make serve`'s install (`make install`) holds no torch, and the speech service still works.

mlx-whisper declares torch, which only its conversion helper imports: the Makefile installs it
with `pip install --no-deps -r requirements/mlx-whisper.txt`, and pyproject.toml declares what
its run time imports. The fresh-venv tests run the Makefile's own recipe, which downloads every
run-time dependency (minutes; pip's cache helps): they run under CI or with
MLXD_TEST_INSTALL=1 and are skipped elsewhere.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from packaging.requirements import Requirement

from engine.speech.runner import SpeechRunner
from tests.conftest import require_tool
from tests.serving import Server, free_port
from tests.wav_files import int_wav

ROOT = Path(__file__).resolve().parent.parent
WHISPER_REQUIREMENTS = ROOT / "requirements" / "mlx-whisper.txt"
FRESH = bool(os.environ.get("CI")) or os.environ.get("MLXD_TEST_INSTALL") == "1"
# What an enclosing `make test` exports (ARGS=..., -j) or the caller's venv must not reach the
# inner make or the fresh venv.
DROPPED = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "VIRTUAL_ENV", "PYTHONPATH")
# mlx-whisper's declared requirements that its run time never imports.
NOT_IMPORTED = {"torch", "more-itertools"}


def whisper_requirement() -> str:
    lines = (line.strip() for line in WHISPER_REQUIREMENTS.read_text().splitlines())
    (requirement,) = [line for line in lines if line and not line.startswith("#")]
    return requirement


def names(requirements: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in requirements}


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k not in DROPPED and not k.startswith("MLXD_")}


def make(venv: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    command = [require_tool("make"), "--no-print-directory", *args, f"VENV={venv}"]
    return subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=clean_env()
    )


# -- what is declared where (no network) -----------------------------------------------------


def test_pyproject_declares_mlx_whispers_run_time_needs_not_mlx_whisper() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    main = names(project["dependencies"])
    assert not main & {"mlx-whisper", "torch"}
    declared = importlib.metadata.requires("mlx-whisper") or []
    needs = names([r for r in declared if "extra ==" not in r])
    assert needs - main == NOT_IMPORTED
    assert "torch" in names(project["optional-dependencies"]["test"])


def test_mlx_whisper_imports_torch_only_in_its_conversion_helper() -> None:
    spec = importlib.util.find_spec("mlx_whisper")
    assert spec and spec.origin
    pattern = re.compile(r"^\s*(import|from)\s+(torch|more_itertools)\b", re.M)
    package = Path(spec.origin).parent
    importing = {p.name for p in package.rglob("*.py") if pattern.search(p.read_text())}
    assert importing <= {"torch_whisper.py"}


def test_the_pinned_mlx_whisper_is_the_tested_one() -> None:
    installed = importlib.metadata.version("mlx-whisper")
    assert Requirement(whisper_requirement()).specifier.contains(installed)


def test_without_mlx_whisper_the_speech_model_names_the_install_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "mlx_whisper.load_models", None)
    with pytest.raises(ModuleNotFoundError) as caught:
        SpeechRunner.load(tmp_path, "whisper")
    assert f"pip install --no-deps '{whisper_requirement()}'" in str(caught.value)


# -- the Makefile (a stand-in venv, nothing installed) ---------------------------------------


def stand_in_venv(tmp_path: Path, *stamps: str) -> Path:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    for name in ("bin/python", *stamps):
        (venv / name).touch()
    return venv


def test_make_install_installs_mlx_whisper_without_torch(tmp_path: Path) -> None:
    venv = stand_in_venv(tmp_path)
    planned = make(venv, "-n", "install")
    assert planned.returncode == 0, planned.stderr
    pip = [line for line in planned.stdout.splitlines() if "/pip " in line]
    assert pip == [
        f"{venv}/bin/pip install --quiet -e .",
        f"{venv}/bin/pip install --quiet --no-deps -r requirements/mlx-whisper.txt",
    ]
    assert "torch" not in planned.stdout


def test_make_install_test_adds_torch_and_mlx_whisper(tmp_path: Path) -> None:
    planned = make(stand_in_venv(tmp_path), "-n", "install-test")
    assert planned.returncode == 0, planned.stderr
    assert "pip install --quiet -e '.[test]'" in planned.stdout
    assert "--no-deps -r requirements/mlx-whisper.txt" in planned.stdout
    assert "torch==2.13.0" in planned.stdout


def test_make_install_is_a_no_op_after_the_test_install(tmp_path: Path) -> None:
    venv = stand_in_venv(tmp_path, ".torch", ".installed-test")
    assert make(venv, "-q", "install").returncode == 0
    (venv / ".installed-test").unlink()
    assert make(venv, "-q", "install").returncode == 1


# -- a fresh venv built by `make install` (downloads: CI or MLXD_TEST_INSTALL=1) --------------


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not FRESH:
        pytest.skip("builds a venv from the package registry: set CI or MLXD_TEST_INSTALL=1")
    venv = tmp_path_factory.mktemp("make-install") / "venv"
    built = make(venv, "install", timeout=1500)
    assert built.returncode == 0, built.stdout[-4000:] + built.stderr[-4000:]
    return venv


def run_in(venv: Path, program: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [str(venv / "bin" / program), *args]
    return subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=300, env=clean_env()
    )


@pytest.mark.timeout(1800)
def test_fresh_install_has_no_torch(fresh_venv: Path, tmp_path: Path) -> None:
    shown = run_in(fresh_venv, "pip", "show", "torch", cwd=tmp_path)
    assert shown.returncode != 0 and "not found" in shown.stderr, shown.stdout
    code = "import importlib.util, mlx_whisper.transcribe, engine.speech.runner\n"
    code += "print(importlib.util.find_spec('torch'))"
    imported = run_in(fresh_venv, "python", "-c", code, cwd=tmp_path)
    assert imported.returncode == 0, imported.stderr
    assert imported.stdout.strip() == "None"


@pytest.mark.timeout(1800)
def test_fresh_install_transcribes(fresh_venv: Path, tiny_whisper: Path, tmp_path: Path) -> None:
    """`mlxd serve --only stt` from the fresh venv answers /inference on the tiny Whisper."""
    port, log = free_port(), tmp_path / "mlxd.log"
    command = [str(fresh_venv / "bin" / "mlxd"), "serve", "--home", str(tmp_path / "home")]
    command += ["--only", "stt", "--stt-port", str(port), "--stt-model", str(tiny_whisper)]
    process = subprocess.Popen(
        command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=clean_env(),
        cwd=tmp_path, start_new_session=True,
    )  # fmt: skip
    server = Server(process, {"stt": port}, log)
    tone = 0.3 * np.sin(2 * np.pi * 440 * np.arange(16_000) / 16_000)
    try:
        server.wait_healthy(timeout=300)
        files = {"file": ("tone.wav", int_wav(tone, 16_000), "audio/wav")}
        response = server.post("stt", "/inference", files=files, data={"temperature": "0.0"})
    finally:
        code = server.stop()
    assert response.status_code == 200, response.text
    assert isinstance(response.json()["text"], str)
    assert code == 0, server.log()
