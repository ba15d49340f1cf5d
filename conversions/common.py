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
