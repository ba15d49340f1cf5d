"""A converter family for store tests: copies a source directory, no MLX involved.

Environment knobs (read in the converting process): FAKE_FAMILY_HANG=1 stops half-way through
a conversion until killed; FAKE_FAMILY_BROKEN=1 writes a model that fails its smoke test.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

from conversions.common import ConversionError

CONVERTER_VERSION = "fake-1"


def convert(source: Path, dest: Path, *, quantization=None, group_size=64, dtype="float16") -> dict:
    if not (source / "config.json").is_file():
        raise ConversionError(f"{source} has no config.json")
    dest.mkdir(parents=True)
    shutil.copy(source / "config.json", dest / "config.json")
    (dest / "weights.bin").write_bytes(b"\1" * 1000)
    if os.environ.get("FAKE_FAMILY_HANG"):
        (dest / "started").write_text("1")
        time.sleep(600)
    if os.environ.get("FAKE_FAMILY_BROKEN"):
        (dest / "config.json").write_text("not json")
    quant = {"bits": quantization, "group_size": group_size} if quantization else None
    return {"source_format": "hf", "dtype": dtype, "quantization": quant}


def smoke_test(model_dir: Path) -> None:
    json.loads((model_dir / "config.json").read_text())
