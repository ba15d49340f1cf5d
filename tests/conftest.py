"""Shared fixtures: tiny random models of the real architectures, built once per session."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

IN_CI = bool(os.environ.get("CI"))
# Tests build or install their weights locally; nothing may come from the model hub.
os.environ["HF_HUB_OFFLINE"] = "1"
HUB_LOADERS = (
    "mlx_whisper.load_models",
    "mlx_vlm.utils",
    "mlx_lm.utils",
    "mlx_embeddings.utils",
)


@pytest.fixture(scope="session", autouse=True)
def no_model_hub():
    """A library asked for a model by hub id (a path that does not exist) fails the test."""

    def refuse(repo_id: str, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"a test asked the hub for {repo_id!r}: build or convert it locally")

    with pytest.MonkeyPatch.context() as patch:
        for module in HUB_LOADERS:
            patch.setattr(f"{module}.snapshot_download", refuse)
        yield


def require_tool(name: str) -> str:
    """The tool's path; skip without it on a developer's machine, fail in CI."""
    path = shutil.which(name)
    if path is None:
        if IN_CI:
            pytest.fail(f"{name} is required in CI but is not installed")
        pytest.skip(f"{name} is not installed")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


@pytest.fixture(scope="session")
def tiny_gemma4(tiny_dir: Path) -> Path:
    from tests.tiny.gemma4 import build_gemma4_mlx

    return build_gemma4_mlx(tiny_dir / "tiny-gemma4")


@pytest.fixture(scope="session")
def tiny_gemma4_audio(tiny_dir: Path) -> Path:
    from tests.tiny.gemma4 import build_gemma4_mlx

    return build_gemma4_mlx(tiny_dir / "tiny-gemma4-audio", audio=True)


@pytest.fixture(scope="session")
def tiny_bge(tiny_dir: Path) -> Path:
    from tests.tiny.bert import build_bge_mlx

    return build_bge_mlx(tiny_dir / "tiny-bge")


@pytest.fixture(scope="session")
def tiny_whisper(tiny_dir: Path) -> Path:
    from tests.tiny.whisper import build_whisper_mlx

    return build_whisper_mlx(tiny_dir / "tiny-whisper")


@pytest.fixture(scope="session")
def tiny_models(tiny_gemma4: Path, tiny_bge: Path, tiny_whisper: Path) -> dict[str, Path]:
    return {"chat": tiny_gemma4, "embeddings": tiny_bge, "stt": tiny_whisper}


def model_flags(models: dict[str, Path]) -> list[str]:
    flags = []
    for service, path in models.items():
        flags += [f"--{service}-model", str(path)]
    return flags


NODE_DIR = Path(__file__).parent / "node"


@pytest.fixture(scope="session")
def node_client():
    """Run tests/node/client.mjs (the official OpenAI Node SDK) against a base URL."""
    import json
    import subprocess

    node, npm = require_tool("node"), require_tool("npm")
    if not (NODE_DIR / "node_modules" / "openai").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300
        )

    def run(base_url: str, request: dict) -> dict:
        result = subprocess.run(
            [node, str(NODE_DIR / "client.mjs"), base_url, json.dumps(request)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    return run
