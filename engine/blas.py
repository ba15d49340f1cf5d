"""The BLAS under MLX's CPU backend in the service processes, and how fast it is.

MLX's Linux wheel links a reference BLAS. The system's OpenBLAS, preloaded into each service
process (`LD_PRELOAD`), multiplies float32 matrices about ten times faster and changes no
result. On macOS the models run on Metal and nothing is preloaded.

`python -m engine.blas` prints, as JSON, the BLAS this process loaded and a matmul's speed:
`mlxd doctor` runs it with the services' environment.
"""

from __future__ import annotations

import glob
import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from engine.config import CONFIG_ENV

AUTO, BUNDLED = "auto", "bundled"
OPENBLAS_CANDIDATES = (
    "/usr/lib/*-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/*-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas*.so.0",
    "/usr/lib/libopenblas.so.0",
    "/usr/local/lib/libopenblas.so.0",
)
MATMUL_SIZE = 512


def find_openblas() -> Path | None:
    """The system's OpenBLAS (Debian/Ubuntu `libopenblas0-pthread`, Fedora `openblas`), if any."""
    for pattern in OPENBLAS_CANDIDATES:
        for match in sorted(glob.glob(pattern)):
            return Path(match)
    return None


def preload_library(choice: str, platform: str = sys.platform) -> Path | None:
    """The library to preload into the services for `--blas CHOICE`: `auto` (the system's
    OpenBLAS on Linux, if present), `bundled` (none: MLX's own) or a library's path."""
    if choice == BUNDLED or not platform.startswith("linux"):
        return None
    if choice == AUTO:
        return find_openblas()
    return Path(choice).expanduser()


def _preloaded(env: Mapping[str, str]) -> list[str]:
    return env.get("LD_PRELOAD", "").replace(":", " ").split()


def worker_environment(
    env: Mapping[str, str], choice: str, platform: str = sys.platform
) -> dict[str, str]:
    """`env` for a service process: the chosen BLAS first in `LD_PRELOAD` (`bundled`: no BLAS
    preloaded at all, so MLX's own is measured)."""
    out = dict(env)
    if not platform.startswith("linux"):
        return out
    library = preload_library(choice, platform)
    others = [p for p in _preloaded(env) if "blas" not in Path(p).name.lower()]
    chosen = [str(library)] if library is not None else []
    if chosen or others:
        out["LD_PRELOAD"] = " ".join(chosen + others)
    else:
        out.pop("LD_PRELOAD", None)
    return out


def describe(libraries: list[str]) -> str:
    """Name the BLAS among a process's mapped libraries (the first one wins the symbols)."""
    for path in libraries:
        name = Path(path).name.lower()
        if "openblas" in name:
            return f"OpenBLAS ({path})"
        if "mkl" in name:
            return f"MKL ({path})"
    for path in libraries:
        if "libblas" in Path(path).name.lower():
            where = "MLX's bundled reference BLAS" if "mlx" in path else "reference BLAS"
            return f"{where} ({path})"
    return "unknown"


def mapped_libraries(pid: int | str = "self") -> list[str] | None:
    """Shared libraries mapped into a process, in load order (None without /proc)."""
    try:
        text = Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return None
    seen: dict[str, None] = {}
    for line in text.splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and ".so" in parts[5]:
            seen.setdefault(parts[5].strip(), None)
    return list(seen)


def matmul_gflops(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """float32 GFLOP/s of a square matmul on MLX's default device (best of `repeats`)."""
    import mlx.core as mx

    a = mx.random.normal((size, size))
    b = mx.random.normal((size, size))
    mx.eval(a, b, a @ b)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - started)
    return 2 * size**3 / best / 1e9


@dataclass(frozen=True)
class Worker:
    """A running service process of some `mlxd serve`, and the BLAS it loaded."""

    pid: int
    service: str
    port: int
    blas: str


def running_workers() -> list[Worker]:
    """Every `python -m engine.worker` process this user can inspect (Linux /proc only)."""
    workers = []
    for proc in sorted(Path("/proc").glob("[0-9]*")):
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            if b"engine.worker" not in argv:
                continue
            service = argv[argv.index(b"engine.worker") + 1].decode()
            config = _worker_config((proc / "environ").read_bytes())
            libraries = mapped_libraries(proc.name) or []
        except (OSError, IndexError, ValueError):
            continue  # gone, or not ours to read
        port = int(config.get(f"{service}_port", 0))
        workers.append(Worker(int(proc.name), service, port, describe(libraries)))
    return workers


def _worker_config(environ: bytes) -> dict:
    for item in environ.split(b"\0"):
        key, _, value = item.partition(b"=")
        if key == CONFIG_ENV.encode():
            return json.loads(value)
    return {}


def report() -> dict[str, object]:
    import mlx.core as mx

    gflops = matmul_gflops()  # MLX is loaded now, its libraries mapped
    libraries = mapped_libraries()
    if mx.metal.is_available():
        blas = "Metal (GPU)"
    else:
        blas = describe(libraries) if libraries is not None else "unknown"
    return {"blas": blas, "gflops": round(gflops, 2)}


if __name__ == "__main__":
    print(json.dumps(report()))
