"""What every converter family shares: its error type and how it reads JSON files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engine.jsonfile import JsonFileError, read_json


class ConversionError(ValueError):
    """A source cannot be converted; the message says why and what to do instead."""


def read_source_json(path: Path) -> Any | None:
    """A JSON file of the source or output (None when absent); malformed JSON is refused."""
    try:
        return read_json(path)
    except JsonFileError as exc:
        raise ConversionError(str(exc)) from exc


DTYPES = ("float16", "bfloat16", "float32")
BITS = (4, 8)
GROUP_SIZES = (32, 64, 128)


def check_options(quantization: int | None, group_size: int, dtype: str) -> None:
    """The quantization and dtype options every family takes; a bad one is refused."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    if quantization is not None and quantization not in BITS:
        raise ConversionError(f"quantization must be 4, 8 or none, not {quantization!r}")
    if quantization is not None and group_size not in GROUP_SIZES:
        raise ConversionError(f"group size must be 32, 64 or 128, not {group_size!r}")
