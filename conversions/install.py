"""Install a converted model into the store: all of it, smoke-tested and with a manifest, or
nothing. The one entry point behind `mlxd convert` and `mlxd pull` for every family."""

from __future__ import annotations

import importlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conversions.common import ConversionError
from conversions.progress import progress, stage
from engine.store import ModelInfo, ModelMissing, Store, StoreError
from engine.store.catalog import Kind
from engine.store.manifest import hashed_bytes, source_digest, write_manifest

FAMILIES: dict[Kind, str] = {
    "chat": "conversions.gemma",
    "embeddings": "conversions.bert",
    "stt": "conversions.whisper",
    "vad": "conversions.silero",
}
TMP_PREFIX = ".tmp-"

# Loads a converted model directory as its service will and runs it once; raises if it cannot.
SmokeTest = Callable[[Path], None]


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
    smoke_test: SmokeTest | None = None,
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
        if smoke_test is not None:
            with stage("smoke test"):
                _smoke(smoke_test, work)
        with progress("sha256", hashed_bytes(work), unit="B") as bar:
            write_manifest(
                work,
                on_bytes=bar.update,
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


def source_sha256(source: Path) -> str:
    """source_digest of a local source, with progress: a large source takes a while."""
    total = source.stat().st_size if source.is_file() else hashed_bytes(source)
    with progress("sha256 of the source", total, unit="B") as bar:
        return source_digest(source, bar.update)


def _smoke(smoke_test: SmokeTest, directory: Path) -> None:
    try:
        smoke_test(directory)
    except ConversionError:
        raise
    except Exception as exc:  # whatever the loader raises: the conversion is not usable
        raise ConversionError(
            f"the converted model does not load and run: {type(exc).__name__}: {exc}"
        ) from exc


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
