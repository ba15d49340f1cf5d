"""The model store: `$MLXD_HOME/models/<id>/`, each model with a `manifest.json`.

The engine reads the store; the converters (`conversions/`) write into it. The server never
downloads: a missing model is a `ModelMissing` naming the command that installs it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.jsonfile import JsonFileError, read_json
from engine.store.catalog import DEFAULT_IDS, Kind
from engine.store.manifest import MANIFEST

ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class ModelMissing(LookupError):
    """The model is not installed; the message names the command that installs it."""


class StoreError(ValueError):
    """The store or a model directory is malformed."""


def read_model_json(path: Path) -> dict[str, Any] | None:
    """A JSON file of a model directory; malformed JSON is a StoreError."""
    try:
        return read_json(path)
    except JsonFileError as exc:
        raise StoreError(str(exc)) from exc


@dataclass(frozen=True)
class ModelInfo:
    id: str
    path: Path
    kind: Kind | None
    manifest: dict[str, Any] | None

    @property
    def size_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())

    @property
    def quantization(self) -> str:
        config = read_model_json(self.path / "config.json") or {}
        quant = (self.manifest or {}).get("quantization") or config.get("quantization")
        if quant:
            return f"q{quant.get('bits')} (group {quant.get('group_size')})"
        return (self.manifest or {}).get("dtype") or _weights_dtype(config)

    @property
    def dtype(self) -> str:
        """The float dtype it was converted to; "?" for a model without that in its manifest."""
        return str((self.manifest or {}).get("dtype") or "?")


def _weights_dtype(config: dict[str, Any]) -> str:
    return str(config.get("torch_dtype") or config.get("dtype") or "unknown")


def install_hint(model_id: str, kind: Kind | None) -> str:
    kind_flag = "" if model_id in DEFAULT_IDS.values() or kind is None else f" --kind {kind}"
    return f"mlxd pull {model_id}{kind_flag}"


def detect_kind(directory: Path) -> Kind | None:
    """Which service a model directory is for, from its config.json."""
    config = read_model_json(directory / "config.json") or {}
    model_type = str(config.get("model_type", "")).lower()
    if model_type == "silero_vad":
        return "vad"
    if "n_audio_state" in config or model_type == "whisper":
        return "stt"
    if model_type in ("bert", "xlm-roberta", "xlm_roberta", "modernbert"):
        return "embeddings"
    if model_type.startswith("gemma") or "text_config" in config:
        return "chat"
    return None


class Store:
    def __init__(self, home: Path) -> None:
        self.home = Path(home)
        self.models_dir = self.home / "models"

    def path(self, model_id: str) -> Path:
        if not ID_PATTERN.match(model_id):
            raise StoreError(f"invalid model id {model_id!r}: use letters, digits, '.', '_', '-'")
        return self.models_dir / model_id

    def info(self, directory: Path, model_id: str | None = None) -> ModelInfo:
        manifest = read_model_json(directory / MANIFEST)
        kind = (manifest or {}).get("kind") or detect_kind(directory)
        return ModelInfo(model_id or directory.name, directory, kind, manifest)

    def list(self) -> list[ModelInfo]:
        if not self.models_dir.is_dir():
            return []
        dirs = sorted(
            p for p in self.models_dir.iterdir() if p.is_dir() and ID_PATTERN.match(p.name)
        )
        return [self.info(p) for p in dirs]

    def resolve(self, ref: str, kind: Kind | None = None) -> ModelInfo:
        """A store id or a local model directory; raises ModelMissing with the install command."""
        candidate = Path(ref).expanduser()
        looks_like_path = "/" in ref or ref.startswith((".", "~"))
        if looks_like_path or (candidate.is_dir() and not ID_PATTERN.match(ref)):
            if not candidate.is_dir():
                raise ModelMissing(f"model directory {ref} does not exist")
            return self.info(candidate.resolve())
        directory = self.path(ref)
        if not (directory / "config.json").is_file():
            raise ModelMissing(
                f"model {ref!r} is not installed in {self.models_dir}: "
                f"run `{install_hint(ref, kind)}`"
            )
        return self.info(directory, ref)
