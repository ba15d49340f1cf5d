"""`mlxd pull/convert/rm/verify` and atomic installs, with a fake converter family."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.store.catalog import default_dtype
from engine.store.manifest import verify
from tests.fake_hub import FakeHub

ROOT = Path(__file__).resolve().parents[2]
FAKE_CLI = (
    "import sys, conversions.install as s, engine.services as e, tests.fake_family as f; "
    "s.FAMILIES.update(dict.fromkeys(s.FAMILIES, 'tests.fake_family')); "
    "e.smoke_test = lambda kind: f.smoke_test; "
    "from engine.cli import main; raise SystemExit(main(sys.argv[1:]))"
)


def mlxd(home: Path, *args: str, env: dict | None = None, wait: bool = True):
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("MLXD_", "HF_"))}
    # The real hub is unreachable (a closed loopback port) unless a test names a fake one.
    environment.update({"MLXD_HOME": str(home), "HF_HOME": str(home / "hf")})
    environment.update({"HF_ENDPOINT": "http://127.0.0.1:9", **(env or {})})
    command = [sys.executable, "-c", FAKE_CLI, *args]
    if not wait:
        return subprocess.Popen(command, cwd=ROOT, env=environment, stderr=subprocess.PIPE)
    return subprocess.run(
        command, cwd=ROOT, env=environment, capture_output=True, text=True, timeout=120
    )


@pytest.fixture
def source(tmp_path: Path) -> Path:
    directory = tmp_path / "src"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"model_type": "bert"}))
    (directory / "model.safetensors").write_bytes(os.urandom(24_000_000))
    (directory / "tokenizer.json").write_text("{}")
    return directory


def test_convert_installs_with_a_complete_manifest(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    result = mlxd(home, "convert", "embeddings", str(source), "--as", "my-bge", "-q", "8")
    assert result.returncode == 0, result.stderr
    model = home / "models" / "my-bge"
    manifest = json.loads((model / "manifest.json").read_text())
    assert manifest["id"] == "my-bge" and manifest["kind"] == "embeddings"
    assert manifest["source"]["type"] == "local" and manifest["source"]["path"] == str(source)
    assert len(manifest["source"]["sha256"]) == 64
    assert manifest["converter"] == {"module": "tests.fake_family", "version": "fake-1"}
    assert manifest["quantization"] == {"bits": 8, "group_size": 64}
    dtype = default_dtype("embeddings")
    assert manifest["dtype"] == dtype
    assert f"Installed my-bge (embeddings, 8-bit, {dtype}) from {source}" in result.stdout
    assert "convert: sha256 of the source 24.0/24.0 MB" in result.stderr.splitlines()
    assert (
        "convert: smoke test done" in result.stderr
        and "convert: sha256 0.0/0.0 MB" in result.stderr
    )
    assert set(manifest["files"]) == {"config.json", "weights.bin"}
    assert manifest["size_bytes"] == 1000 + (model / "config.json").stat().st_size
    assert verify(model) == []
    listed = mlxd(home, "models")
    row = next(line for line in listed.stdout.splitlines() if line.startswith("my-bge"))
    assert row.split()[4:] == [dtype, "q8", "(group", "64)"]


def test_existing_model_needs_force(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    assert mlxd(home, "convert", "stt", str(source), "--as", "m").returncode == 0
    again = mlxd(home, "convert", "stt", str(source), "--as", "m", "-q", "4")
    assert again.returncode == 1 and "--force" in again.stderr
    forced = mlxd(home, "convert", "stt", str(source), "--as", "m", "-q", "4", "--force")
    assert forced.returncode == 0
    manifest = json.loads((home / "models" / "m" / "manifest.json").read_text())
    assert manifest["quantization"]["bits"] == 4
    assert [p.name for p in (home / "models").iterdir()] == ["m"]


def test_failed_smoke_test_installs_nothing(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    result = mlxd(
        home, "convert", "chat", str(source), "--as", "bad", env={"FAKE_FAMILY_BROKEN": "1"}
    )
    assert result.returncode != 0
    assert list((home / "models").iterdir()) == []


def test_killed_conversion_leaves_the_store_unchanged(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    assert mlxd(home, "convert", "stt", str(source), "--as", "keep").returncode == 0
    before = (home / "models" / "keep" / "manifest.json").read_bytes()
    process = mlxd(
        home,
        "convert",
        "stt",
        str(source),
        "--as",
        "keep",
        "--force",
        env={"FAKE_FAMILY_HANG": "1"},
        wait=False,
    )
    deadline = time.monotonic() + 60
    while not list((home / "models").glob(".tmp-*/started")) and time.monotonic() < deadline:
        time.sleep(0.1)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert (home / "models" / "keep" / "manifest.json").read_bytes() == before
    assert verify(home / "models" / "keep") == []
    assert [m.split()[0] for m in mlxd(home, "models").stdout.splitlines()[1:]] == ["keep"]
    assert mlxd(home, "convert", "stt", str(source), "--as", "other").returncode == 0
    assert not list((home / "models").glob(".tmp-*")), "the stale temporary was not cleaned"


def test_verify_and_rm(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    assert mlxd(home, "convert", "stt", str(source), "--as", "w").returncode == 0
    assert mlxd(home, "verify", "w").returncode == 0
    weights = home / "models" / "w" / "weights.bin"
    data = bytearray(weights.read_bytes())
    data[10] ^= 0x80
    weights.write_bytes(bytes(data))
    result = mlxd(home, "verify", "w")
    assert result.returncode == 1 and "checksum mismatch: weights.bin" in result.stdout
    assert mlxd(home, "rm", "w").returncode == 0
    assert not (home / "models" / "w").exists()
    missing = mlxd(home, "rm", "w")
    assert missing.returncode == 1 and "not installed" in missing.stderr
    assert mlxd(home, "verify", "w").returncode == 1


def test_convert_errors_are_clear(tmp_path: Path) -> None:
    home = tmp_path / "home"
    result = mlxd(home, "convert", "stt", str(tmp_path / "nope"), "--as", "x")
    assert result.returncode == 1 and "does not exist" in result.stderr
    empty = tmp_path / "empty"
    empty.mkdir()
    result = mlxd(home, "convert", "stt", str(empty), "--as", "x")
    assert result.returncode == 1 and "no config.json" in result.stderr


def wait_for_blob(hf_home: Path, size: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if any(p.stat().st_size == size for p in hf_home.rglob("blobs/*") if p.is_file()):
            return
        time.sleep(0.05)
    raise AssertionError("the first shard never completed")


def gets(hub: FakeHub, name: str) -> list[str | None]:
    return [r for m, p, r in hub.requests if m == "GET" and p.endswith("/" + name)]


def test_pull_resumes_a_dropped_download_by_range(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    with FakeHub({"BAAI/bge-base-zh-v1.5": source}, cut_once={"model.safetensors"}) as hub:
        result = mlxd(home, "pull", "bge-base-zh", env={"HF_ENDPOINT": hub.url})
        assert result.returncode == 0, result.stderr
        ranges = [r for r in gets(hub, "model.safetensors") if r]
        assert ranges and int(ranges[-1].split("=")[1].split("-")[0]) > 0, hub.requests
    manifest = json.loads((home / "models" / "bge-base-zh" / "manifest.json").read_text())
    assert manifest["source"] == {
        "type": "huggingface",
        "repo": "BAAI/bge-base-zh-v1.5",
        "revision": hub.commit,
    }
    assert manifest["dtype"] == default_dtype("embeddings") and manifest["quantization"] is None
    assert manifest["kind"] == "embeddings"
    assert "convert: download" in result.stderr
    assert f"Installed bge-base-zh (embeddings, {manifest['dtype']}) from" in result.stdout


def test_killed_pull_keeps_finished_files_and_installs_nothing(
    tmp_path: Path, source: Path
) -> None:
    home = tmp_path / "home"
    (source / "model-00002.safetensors").write_bytes(os.urandom(24_000_000))
    shard = (source / "model.safetensors").stat().st_size
    with FakeHub({"BAAI/bge-base-zh-v1.5": source}, stall_once={"model-00002.safetensors"}) as hub:
        env = {"HF_ENDPOINT": hub.url}
        process = mlxd(home, "pull", "bge-base-zh", env=env, wait=False)
        assert hub.half_sent.wait(60), "the download never started"
        wait_for_blob(home / "hf", shard)
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert not (home / "models" / "bge-base-zh").exists()
        result = mlxd(home, "pull", "bge-base-zh", env=env)
        assert result.returncode == 0, result.stderr
        assert len(gets(hub, "model.safetensors")) == 1  # not fetched again
        assert len(gets(hub, "model-00002.safetensors")) == 2


def test_pull_any_repo_with_kind(tmp_path: Path, source: Path) -> None:
    home = tmp_path / "home"
    with FakeHub({"someone/My-Model": source}) as hub:
        env = {"HF_ENDPOINT": hub.url}
        result = mlxd(home, "pull", "someone/My-Model", env=env)
        assert result.returncode == 1 and "--kind" in result.stderr
        result = mlxd(home, "pull", "someone/My-Model", "--kind", "stt", env=env)
        assert result.returncode == 0, result.stderr
        assert (home / "models" / "my-model" / "manifest.json").is_file()
        missing = mlxd(home, "pull", "someone/other", "--kind", "stt", env=env)
        assert missing.returncode == 1 and "no such model repository" in missing.stderr


def test_pull_errors(tmp_path: Path) -> None:
    home = tmp_path / "home"
    unknown = mlxd(home, "pull", "gpt-5")
    assert unknown.returncode == 1 and "unknown model id" in unknown.stderr
    offline = mlxd(home, "pull", "whisper-small", env={"HF_ENDPOINT": "http://127.0.0.1:9"})
    assert offline.returncode == 1
    assert "mlxd convert stt" in offline.stderr and "openai/whisper-small" in offline.stderr


def test_disk_full_is_a_clear_error(tmp_path: Path, source: Path, monkeypatch) -> None:
    import shutil as shutil_module
    from collections import namedtuple

    from conversions.common import ConversionError
    from conversions.install import ConvertOptions, install
    from engine.store import Store

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil_module, "disk_usage", lambda path: usage(10**9, 10**9, 1000))
    options = ConvertOptions(quantization=None, group_size=64, dtype="float16")
    with pytest.raises(ConversionError, match="not enough disk space"):
        install(Store(tmp_path), "m", "stt", source, source_info={}, options=options)
    assert not list((tmp_path / "models").iterdir())


def test_converted_real_family_is_served_by_id(tmp_path: Path) -> None:
    """`mlxd convert` with the real BERT converter, then `mlxd serve --embeddings-model ID`."""
    from tests.serving import start_server
    from tests.tiny.bert import build_bge_hf

    hf = build_bge_hf(tmp_path / "hf-bge")
    home = tmp_path / "home"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "engine",
            "convert",
            "embeddings",
            str(hf),
            "--as",
            "my-bge",
            "--dtype",
            "float32",
            "--home",
            str(home),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    manifest = json.loads((home / "models" / "my-bge" / "manifest.json").read_text())
    assert manifest["pooling"] == "cls" and manifest["converter"]["module"] == "conversions.bert"
    # start_server uses tmp_path / "home" as the store, where the model was just installed
    server = start_server(tmp_path, "--embeddings-model", "my-bge", services=("embeddings",))
    try:
        server.wait_healthy(timeout=120)
        response = server.post("embeddings", "/v1/embeddings", json={"input": "你好"})
        assert response.status_code == 200 and response.json()["model"] == "my-bge"
    finally:
        server.stop()
