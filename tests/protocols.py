"""Check that a class implements a typing.Protocol's methods with the same parameters."""

from __future__ import annotations

import inspect
from typing import Any


def _methods(protocol: type) -> list[str]:
    return [
        name
        for name, value in vars(protocol).items()
        if callable(value) and not name.startswith("_")
    ]


def _shape(function: Any) -> list[tuple[str, Any, bool]]:
    params = list(inspect.signature(function).parameters.values())[1:]  # drop self
    return [(p.name, p.kind, p.default is inspect.Parameter.empty) for p in params]


def mismatches(implementation: type, protocol: type) -> list[str]:
    """One line per protocol method that the implementation lacks or declares differently
    (parameter names, kinds, and which ones are required)."""
    out = []
    for name in _methods(protocol):
        method = getattr(implementation, name, None)
        if method is None:
            out.append(f"{implementation.__name__}.{name} is missing")
        elif _shape(method) != _shape(getattr(protocol, name)):
            out.append(
                f"{implementation.__name__}.{name}{inspect.signature(method)} differs from "
                f"{protocol.__name__}.{name}{inspect.signature(getattr(protocol, name))}"
            )
    return out
