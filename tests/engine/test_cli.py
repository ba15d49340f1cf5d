import argparse
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine import __version__
from engine.cli import build_parser, main
from engine.config import serve_flags
from engine.store.catalog import CATALOG


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "engine", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={"MLXD_HOME": str(home), "PATH": "/usr/bin:/bin"},
    )


def test_version(tmp_path: Path) -> None:
    result = run_cli("--version", home=tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"mlxd {__version__}"


def test_no_command_prints_help(capsys) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().out


def test_models_lists_the_store(tmp_path: Path) -> None:
    empty = run_cli("models", home=tmp_path)
    assert empty.returncode == 0 and "mlxd pull" in empty.stdout
    model = tmp_path / "models" / "my-bge"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (model / "model.safetensors").write_bytes(b"\0" * 2_000_000)
    manifest = {"kind": "embeddings", "quantization": {"bits": 8, "group_size": 64}}
    (model / "manifest.json").write_text(json.dumps(manifest))
    listed = run_cli("models", home=tmp_path)
    row = next(line for line in listed.stdout.splitlines() if line.startswith("my-bge"))
    assert "embeddings" in row and "2.0 MB" in row and "q8 (group 64)" in row


def test_doctor_reports_ports_models_and_ffmpeg(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        result = run_cli("doctor", "--chat-port", str(port), home=tmp_path)
    assert result.returncode == 1  # a port is taken and no model is installed
    out = result.stdout
    assert f"Port {port} (chat): IN USE" in out
    assert "Model for chat: MISSING" in out and "mlxd pull gemma-4-e4b" in out
    assert "MLX: " in out and "Platform: " in out and "ffmpeg: " in out


def test_bad_configuration_exits_2_with_a_message(tmp_path: Path) -> None:
    result = run_cli("serve", "--only", "video", home=tmp_path)
    assert result.returncode == 2 and "--only" in result.stderr


def help_text(capsys, *command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_serve_help_shows_the_defaults(capsys) -> None:
    text = help_text(capsys, "serve")
    defaults = {flag.dest: flag.default_text() for flag in serve_flags()}
    for dest in ("shutdown_timeout", "embeddings_batch_tokens"):
        assert f"(default: {defaults[dest]}; env MLXD_{dest.upper()})" in text


def test_pull_help_lists_every_known_id(capsys) -> None:
    text = help_text(capsys, "pull")
    for entry in CATALOG.values():
        assert f"{entry.id} {entry.kind} {entry.repo}" in text
    assert "README" not in text


def parsers(
    parser: argparse.ArgumentParser, name: str = "mlxd"
) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub in action.choices.items():
                yield from parsers(sub, f"{name} {sub_name}")


def test_every_option_that_takes_a_value_shows_its_default() -> None:
    for name, parser in parsers(build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            takes_value = action.option_strings and action.nargs != 0 and not action.required
            if takes_value:
                assert "default" in formatter._get_help_string(action), (name, action.dest)


def test_dtype_defaults_to_the_platform_and_the_flag_overrides(monkeypatch) -> None:
    import mlx.core as mx

    from engine.cli import _options, build_parser

    def options(*flags: str):
        args = build_parser().parse_args(["convert", "chat", "src", "--as", "m", *flags])
        return _options(args, "chat")

    monkeypatch.setattr(mx.metal, "is_available", lambda: False)
    if hasattr(mx, "cuda"):
        monkeypatch.setattr(mx.cuda, "is_available", lambda: False)
    assert options().dtype == "float32"
    assert options("--dtype", "bfloat16").dtype == "bfloat16"
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert options().dtype == "bfloat16"
    assert options("--dtype", "float32").dtype == "float32"


def test_models_shows_the_dtype(tmp_path: Path, capsys) -> None:
    for name, manifest in (("new", {"kind": "chat", "dtype": "float32"}), ("old", None)):
        model = tmp_path / "models" / name
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps({"model_type": "gemma3_text"}))
        if manifest:
            (model / "manifest.json").write_text(json.dumps(manifest))
    assert main(["models", "--home", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["ID", "KIND", "SIZE", "DTYPE", "QUANTIZATION"]
    assert lines[1].split()[:5] == ["new", "chat", "0.0", "MB", "float32"]
    assert lines[2].split()[:5] == ["old", "chat", "0.0", "MB", "?"]
