"""A service process's memory: the MLX limits it runs under, whether a model fits them, and what
it holds (RSS; MLX's active, peak and cache memory).

Functions that touch `mlx.core` say so and run on the model thread only; `mx.metal` is asked
only where Metal is available, so Linux runs the same code.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
from dataclasses import dataclass
from typing import Any

AUTO = "auto"
# Without Metal (Linux) there is no recommended working set: take this share of the RAM, about
# what macOS recommends for the GPU of a large Mac.
CPU_WORKING_SET_SHARE = 0.75
AUTO_CACHE_SHARE = 0.25  # of the memory limit: MLX's buffer cache, freed memory kept for reuse
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(i?)b?|b)?", re.IGNORECASE)


class ModelTooLarge(RuntimeError):
    """The model's weights alone exceed the memory limit: loading it would swap the machine."""


def parse_size(value: str) -> int | None:
    """Bytes, or None for auto: "auto", "16GB", "512MB", "1.5GiB", "1048576"."""
    text = value.strip()
    if text.lower() == AUTO:
        return None
    match = _SIZE.fullmatch(text)
    if not match:
        raise ValueError(f"expected a size such as 16GB, 512MB or auto, got {value!r}")
    number, prefix, binary = match.groups()
    power = "kmgt".index(prefix.lower()) + 1 if prefix else 0
    return int(float(number) * (1024 if binary else 1000) ** power)


def gigabytes(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size < 10**10 else f"{size / 1e9:.1f} GB"


@dataclass(frozen=True)
class Limits:
    memory: int  # bytes MLX may use; a model whose weights exceed it is refused
    cache: int  # bytes of freed buffers MLX keeps for reuse
    working_set: int  # the machine's recommended working set
    source: str  # where `memory` came from, for messages


def recommended_working_set() -> int:
    """Metal's recommended working set; without Metal a share of the RAM (mlx.core)."""
    import mlx.core as mx

    if mx.metal.is_available():
        info: dict[str, Any] = mx.device_info() if hasattr(mx, "device_info") else {}
        if not info.get("max_recommended_working_set_size"):
            info = mx.metal.device_info()
        return int(info["max_recommended_working_set_size"])
    return int(physical_memory() * CPU_WORKING_SET_SHARE)


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def apply_limits(memory_limit: str, cache_limit: str) -> Limits:
    """Set MLX's memory and cache limits from the configured sizes, "auto" meaning the
    machine's recommended working set (and a quarter of the limit for the cache) (mlx.core)."""
    import mlx.core as mx

    working_set = recommended_working_set()
    memory = parse_size(memory_limit)
    source = f"--mlx-memory-limit {memory_limit}" if memory else "the recommended working set"
    memory = memory or working_set
    cache = parse_size(cache_limit)
    cache = int(memory * AUTO_CACHE_SHARE) if cache is None else min(cache, memory)
    mx.set_memory_limit(memory)
    mx.set_cache_limit(cache)
    return Limits(memory, cache, working_set, source)


def check_fits(model_id: str, weights_bytes: int, limits: Limits) -> None:
    if weights_bytes > limits.memory:
        raise ModelTooLarge(
            f"model {model_id} does not fit: its files take {gigabytes(weights_bytes)} on disk, "
            f"over this service's memory limit of {gigabytes(limits.memory)} ({limits.source}; "
            f"the machine's recommended working set is {gigabytes(limits.working_set)}); "
            "choose a smaller or more quantized model, or raise --mlx-memory-limit"
        )


@dataclass(frozen=True)
class MlxMemory:
    active: int = 0
    peak: int = 0
    cache: int = 0


def mlx_memory() -> MlxMemory:
    """MLX's allocator counters (mlx.core)."""
    import mlx.core as mx

    return MlxMemory(mx.get_active_memory(), mx.get_peak_memory(), mx.get_cache_memory())


def release_mlx_memory() -> None:
    """Return MLX's cached buffers to the system (mlx.core), and on Linux the C heap's free
    pages, which glibc otherwise keeps after a model's many small arrays are freed."""
    import mlx.core as mx

    mx.clear_cache()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").malloc_trim(0)


def rss_bytes() -> int:
    """This process's resident memory."""
    import psutil

    return psutil.Process().memory_info().rss
