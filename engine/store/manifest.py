"""`manifest.json`: where a model came from and the sha256 of every file (one schema for all)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from engine.jsonfile import read_json

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1

# Told the number of bytes hashed since its last call (a progress reporter's update).
OnBytes = Callable[[int], None]


def sha256_file(path: Path, on_bytes: OnBytes | None = None) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
            if on_bytes is not None:
                on_bytes(len(block))
    return digest.hexdigest()


def _files(directory: Path) -> list[tuple[str, Path]]:
    """Every file below `directory` by relative name, except the manifest itself."""
    paths = sorted(directory.rglob("*"))
    named = [(path.relative_to(directory).as_posix(), path) for path in paths if path.is_file()]
    return [(rel, path) for rel, path in named if rel != MANIFEST]


def hashed_bytes(directory: Path) -> int:
    """How many bytes file_table reads: the total to report its progress against."""
    return sum(path.stat().st_size for _, path in _files(directory))


def file_table(directory: Path, on_bytes: OnBytes | None = None) -> dict[str, dict[str, Any]]:
    """sha256 and size of every file below `directory`, except the manifest itself."""
    return {
        rel: {"sha256": sha256_file(path, on_bytes), "size": path.stat().st_size}
        for rel, path in _files(directory)
    }


def write_manifest(
    directory: Path, on_bytes: OnBytes | None = None, **fields: Any
) -> dict[str, Any]:
    files = file_table(directory, on_bytes)
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


def source_digest(source: Path, on_bytes: OnBytes | None = None) -> str:
    """sha256 of a source file, or of the file table of a source directory."""
    if source.is_file():
        return sha256_file(source, on_bytes)
    table = json.dumps(file_table(source, on_bytes), sort_keys=True).encode()
    return hashlib.sha256(table).hexdigest()
