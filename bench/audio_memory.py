"""Peak memory of decoding a long, small upload through engine.audio.decode_audio, against the
float32 PCM size of what it admits (16 kHz mono, 4 bytes a sample): an Opus file of an hour of
tone (about 1.4 MB at 3 kb/s: ffmpeg's path) and an MP3 of the same hour at 44.1 kHz stereo
(decoded and resampled in-process).

    python bench/audio_memory.py [--seconds 3600] [--bitrate 3k] [--mp3-bitrate 32k]

Each measurement runs in a fresh process (the high-water mark of its RSS, ru_maxrss, minus its
RSS just before decoding). Also prints the refusal under a lower --stt-max-audio-seconds (from
the header, nothing decoded). Needs ffmpeg. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_MEASURE = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from engine.audio import AudioTooLong, decode_audio, find_ffmpeg
from engine.memory import rss_bytes
data = open({path!r}, "rb").read()
before = rss_bytes()
start = time.monotonic()
try:
    samples = decode_audio(data, ffmpeg=find_ffmpeg(), max_seconds={limit!r})
    out = {{"samples": int(samples.size), "pcm_bytes": int(samples.nbytes)}}
except AudioTooLong as exc:
    out = {{"refused": str(exc)}}
out["seconds"] = time.monotonic() - start
out["peak_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
print(json.dumps(out))
"""


def make_tone(path: Path, seconds: float, codec: str, bitrate: str, channels: int) -> None:
    rate = 48000 if codec == "libopus" else 44100
    cmd = [
        "ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-f", "lavfi",
        "-i", f"sine=f=440:r={rate}", "-t", str(seconds), "-ac", str(channels),
        "-c:a", codec, "-b:a", bitrate, str(path),
    ]  # fmt: skip
    subprocess.run(cmd, check=True)


def measure(path: Path, limit: float | None) -> dict:
    code = _MEASURE.format(root=str(ROOT), path=str(path), limit=limit)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def report(path: Path, seconds: float) -> None:
    size = path.stat().st_size
    print(f"\n{path.suffix[1:]} file: {size / 1e6:.2f} MB, {seconds:.0f} s of audio")
    admitted = measure(path, None)
    pcm = admitted["pcm_bytes"]
    peak = admitted["peak_bytes"]
    print(f"decoded: {admitted['samples']} samples, float32 PCM {pcm / 1e6:.1f} MB")
    print(
        f"peak RSS over the start: {peak / 1e6:.1f} MB = {peak / pcm:.2f} x the PCM size "
        f"({admitted['seconds']:.1f} s)"
    )
    refused = measure(path, seconds / 2)
    print(
        f"with a {seconds / 2:.0f} s limit: {refused['refused']} "
        f"(peak {refused['peak_bytes'] / 1e6:.1f} MB, {refused['seconds']:.2f} s)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3600.0)
    parser.add_argument("--bitrate", default="3k")
    parser.add_argument("--mp3-bitrate", default="32k")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        opus, mp3 = Path(tmp) / "long.opus", Path(tmp) / "long.mp3"
        make_tone(opus, args.seconds, "libopus", args.bitrate, 1)
        make_tone(mp3, args.seconds, "libmp3lame", args.mp3_bitrate, 2)
        report(opus, args.seconds)
        report(mp3, args.seconds)


if __name__ == "__main__":
    main()
