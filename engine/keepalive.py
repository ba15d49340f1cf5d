"""Keep-alive durations, as Ollama writes them: how long a model stays loaded after its last
request. `None` is forever; 0 unloads as soon as the queue is empty."""

from __future__ import annotations

import math
import re

FOREVER_WORDS = ("forever", "inf", "infinite", "never")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h|d)")


def parse_keep_alive(value: object) -> float | None:
    """Seconds, or None for forever. Accepts a number of seconds (negative: forever), a Go-style
    duration ("5m", "30s", "1h30m", "250ms"), "0", "-1" or "forever"; anything else is a
    ValueError saying what is accepted."""
    if isinstance(value, bool):
        raise ValueError(_expected(value))
    if isinstance(value, int | float):
        return _seconds(float(value), value)
    if not isinstance(value, str):
        raise ValueError(_expected(value))
    text = value.strip().lower()
    if text in FOREVER_WORDS:
        return None
    try:
        return _seconds(float(text), value)
    except ValueError:
        pass
    negative = text.startswith("-")
    body = text.lstrip("+-")
    parts = _PART.findall(body)
    if not body or "".join(number + unit for number, unit in parts) != body:
        raise ValueError(_expected(value))
    seconds = sum(float(number) * _UNITS[unit] for number, unit in parts)
    return None if negative else seconds


def _seconds(number: float, original: object) -> float | None:
    if math.isnan(number):
        raise ValueError(_expected(original))
    return None if number < 0 or math.isinf(number) else number


def _expected(value: object) -> str:
    return (
        f"expected a duration such as 5m, 30s, 1h, 0 (unload after each request) or -1 / "
        f"forever (stay loaded), got {value!r}"
    )


def format_duration(seconds: float | None) -> str:
    """3725 -> "1h2m5s"; None -> "forever"."""
    if seconds is None:
        return "forever"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms" if seconds else "0s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    text = (f"{hours}h" if hours else "") + (f"{minutes}m" if minutes else "")
    return text + (f"{secs}s" if secs or not text else "")


# A request that names no keep_alive: the service's setting applies.
SERVICE_KEEP_ALIVE: object = object()
