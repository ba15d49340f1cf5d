"""Parse and validate an OpenAI embeddings body (event-loop side; no MLX)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from engine.errors import InvalidRequest


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str] | None  # either texts or token id lists
    token_lists: list[list[int]] | None
    truncate: bool

    @property
    def count(self) -> int:
        return len(self.texts if self.texts is not None else self.token_lists or [])


@dataclass(frozen=True)
class EmbedResult:
    vectors: np.ndarray
    token_counts: list[int]
    truncated: list[int]


def parse_input(value: Any, limit: int) -> tuple[list[str] | None, list[list[int]] | None]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise InvalidRequest(
            "'input' must be a string, an array of strings, an array of token ids or an array "
            "of token-id arrays",
            param="input",
            code="invalid_type",
        )
    if not value:
        raise InvalidRequest("'input' must not be empty", param="input", code="empty_input")
    if len(value) > limit:
        raise InvalidRequest(f"'input' has {len(value)} items; the limit is {limit}", param="input")
    if all(_is_token(item) for item in value):
        return None, [value]
    if all(isinstance(item, list) for item in value):
        return None, [_token_list(item, i) for i, item in enumerate(value)]
    return [_text(item, i) for i, item in enumerate(value)], None


def _is_token(item: Any) -> bool:
    return isinstance(item, int) and not isinstance(item, bool)


def _token_list(item: list, index: int) -> list[int]:
    if not item:
        raise InvalidRequest(f"input[{index}] is an empty token list", param=f"input[{index}]")
    if not all(_is_token(t) for t in item):
        raise InvalidRequest(
            f"input[{index}] must contain only integer token ids", param=f"input[{index}]"
        )
    return item


def _text(item: Any, index: int) -> str:
    if not isinstance(item, str):
        raise InvalidRequest(
            f"input[{index}] must be a string (or every item a token id / token-id array)",
            param=f"input[{index}]",
            code="invalid_type",
        )
    if not item:
        raise InvalidRequest(f"input[{index}] is an empty string", param=f"input[{index}]")
    return item
