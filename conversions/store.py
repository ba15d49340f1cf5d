"""The model store: `$MLXD_HOME/models/<id>/`, each model with a `manifest.json`.

The manifest records where a model came from and the sha256 of every file, so an installed model
can be traced to its source and checked. The server only reads the store; it never downloads.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

Kind = Literal["chat", "embeddings", "stt"]
KINDS: tuple[Kind, ...] = ("chat", "embeddings", "stt")

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")

# The ids `mlxd pull` knows; every service also answers to its default id.
DEFAULT_IDS: dict[Kind, str] = {
    "chat": "gemma-4-e4b",
    "embeddings": "bge-base-zh",
    "stt": "whisper-large-v3-turbo",
}


class ModelMissing(LookupError):
    """The model is not installed; the message names the command that installs it."""


class StoreError(ValueError):
    """The store or a model directory is malformed."""


class ConversionError(ValueError):
    """A source cannot be converted; the message says why and what to do instead."""


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
        config = read_json(self.path / "config.json") or {}
        quant = (self.manifest or {}).get("quantization") or config.get("quantization")
        if quant:
            return f"q{quant.get('bits')} (group {quant.get('group_size')})"
        return (self.manifest or {}).get("dtype") or _weights_dtype(config)


def read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, NotADirectoryError):
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise StoreError(f"{path} is not valid JSON: {exc}") from exc


def _weights_dtype(config: dict[str, Any]) -> str:
    return str(config.get("torch_dtype") or config.get("dtype") or "unknown")


def install_hint(model_id: str, kind: Kind | None) -> str:
    kind_flag = "" if model_id in DEFAULT_IDS.values() or kind is None else f" --kind {kind}"
    return f"mlxd pull {model_id}{kind_flag}"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_table(directory: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below `directory`, except the manifest itself."""
    table = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory).as_posix()
        if path.is_file() and rel != MANIFEST:
            table[rel] = {"sha256": sha256_file(path), "size": path.stat().st_size}
    return table


def detect_kind(directory: Path) -> Kind | None:
    """Which service a model directory is for, from its config.json."""
    config = read_json(directory / "config.json") or {}
    model_type = str(config.get("model_type", "")).lower()
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
        manifest = read_json(directory / MANIFEST)
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


def write_manifest(directory: Path, **fields: Any) -> dict[str, Any]:
    files = file_table(directory)
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        **fields,
        "size_bytes": sum(entry["size"] for entry in files.values()),
        "files": files,
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


def verify(directory: Path) -> list[str]:
    """Every difference between the files on disk and the manifest; empty when they match."""
    manifest = read_json(directory / MANIFEST)
    if manifest is None:
        return [f"{directory} has no {MANIFEST}"]
    expected: dict[str, dict[str, Any]] = manifest.get("files", {})
    actual = file_table(directory)
    problems = [f"missing file: {name}" for name in sorted(set(expected) - set(actual))]
    problems += [f"unexpected file: {name}" for name in sorted(set(actual) - set(expected))]
    for name in sorted(set(expected) & set(actual)):
        if expected[name]["sha256"] != actual[name]["sha256"]:
            problems.append(f"checksum mismatch: {name}")
    return problems


FAMILIES: dict[Kind, str] = {
    "chat": "conversions.gemma",
    "embeddings": "conversions.bert",
    "stt": "conversions.whisper",
}
TMP_PREFIX = ".tmp-"


@dataclass(frozen=True)
class ConvertOptions:
    quantization: int | None
    group_size: int
    dtype: str


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(store: Store) -> None:
    """Drop half-written models left by conversions that were killed."""
    if not store.models_dir.is_dir():
        return
    for path in store.models_dir.glob(f"{TMP_PREFIX}*"):
        pid = path.name.rsplit("-", 1)[-1]
        if not pid.isdigit() or not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def _check_disk(store: Store, source: Path) -> None:
    need = (
        sum(f.stat().st_size for f in source.rglob("*") if f.is_file())
        if source.is_dir()
        else (source.stat().st_size)
    )
    free = shutil.disk_usage(store.models_dir).free
    if free < need:
        raise ConversionError(
            f"not enough disk space in {store.models_dir}: the conversion needs about "
            f"{need / 1e9:.1f} GB and {free / 1e9:.1f} GB is free"
        )


def install(
    store: Store,
    model_id: str,
    kind: Kind,
    source: Path,
    *,
    source_info: dict[str, Any],
    options: ConvertOptions,
    force: bool = False,
) -> ModelInfo:
    """Convert `source` into the store as `model_id`: all of it, verified, or nothing."""
    final = store.path(model_id)
    if final.exists() and not force:
        raise StoreError(f"model {model_id!r} is already installed; pass --force to replace it")
    store.models_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(store)
    _check_disk(store, source)
    family = importlib.import_module(FAMILIES[kind])
    work = store.models_dir / f"{TMP_PREFIX}{model_id}-{os.getpid()}"
    try:
        fields = family.convert(
            source,
            work,
            quantization=options.quantization,
            group_size=options.group_size,
            dtype=options.dtype,
        )
        family.smoke_test(work)
        write_manifest(
            work,
            id=model_id,
            kind=kind,
            source=source_info,
            converter={"module": family.__name__, "version": family.CONVERTER_VERSION},
            created=datetime.now(UTC).isoformat(timespec="seconds"),
            **fields,
        )
        _replace(work, final)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return store.info(final, model_id)


def _replace(work: Path, final: Path) -> None:
    if not final.exists():
        work.rename(final)
        return
    old = final.with_name(f"{TMP_PREFIX}old-{final.name}-{os.getpid()}")
    final.rename(old)
    work.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def remove(store: Store, model_id: str) -> Path:
    directory = store.path(model_id)
    if not directory.is_dir():
        raise ModelMissing(f"model {model_id!r} is not installed in {store.models_dir}")
    shutil.rmtree(directory)
    return directory


def source_digest(source: Path) -> str:
    """sha256 of a source file, or of the file table of a source directory."""
    if source.is_file():
        return sha256_file(source)
    table = json.dumps(file_table(source), sort_keys=True).encode()
    return hashlib.sha256(table).hexdigest()
