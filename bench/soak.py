"""Soak: mixed traffic on all three ports of a local mlxd for a fixed time, then a tally.

    python bench/soak.py [--duration 600] [--clients 6] [--tiny | --chat-port 8080 ...]

Loopback only. With --tiny it builds the test suite's tiny random models and starts its own
`mlxd serve` on free ports (stopped at the end); otherwise it drives a running mlxd. Each client
loops until the time is up, picking at random: a chat completion (plain or streamed), an
embeddings request, a transcription of a one-second clip, or one of those abandoned by its
client before the answer. It prints, per service: sent, answered (2xx with the right shape),
refused (503 with Retry-After), abandoned (left on purpose), lost (connection failed or a
timeout), wrong (a 2xx of the wrong shape, or any other status: 5xx included), and each
worker's RSS after warm-up and at the end. Stops by itself. Asserts nothing.
"""

from __future__ import annotations

import argparse
import io
import json
import random
import sys
import tempfile
import threading
import time
import wave
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import Server, start_server  # noqa: E402

SERVICES = ("chat", "embeddings", "stt")
TIMEOUT = 120.0
ABANDON_AFTER = 0.3


def one_second_wav(seed: int) -> bytes:
    samples = 0.1 * np.random.default_rng(seed).standard_normal(16_000)
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16_000)
        out.writeframes((samples * 32767).astype("<i2").tobytes())
    return buffer.getvalue()


class Soak:
    def __init__(self, urls: dict[str, str]) -> None:
        self.urls = urls
        self.tally: dict[str, Counter] = {s: Counter() for s in SERVICES}
        self.lock = threading.Lock()
        self.clip = one_second_wav(0)

    def count(self, service: str, outcome: str) -> None:
        with self.lock:
            self.tally[service]["sent"] += 1
            self.tally[service][outcome] += 1

    def request(self, service: str, abandon: bool) -> str:
        url = self.urls[service]
        timeout = ABANDON_AFTER if abandon else TIMEOUT
        try:
            if service == "stt":
                files = {"file": ("clip.wav", self.clip)}
                data = {"temperature": "0", "response_format": "json"}
                response = httpx.post(
                    url + "/v1/audio/transcriptions", files=files, data=data, timeout=timeout
                )
            else:
                path, body = _json_request(service)
                response = httpx.post(url + path, json=body, timeout=timeout)
        except httpx.TimeoutException:
            return "abandoned" if abandon else "lost"
        except httpx.HTTPError:
            return "lost"
        return _outcome(service, response)

    def client(self, deadline: float, seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            service = rng.choice(SERVICES)
            self.count(service, self.request(service, abandon=rng.random() < 0.1))

    def rss(self) -> dict[str, int]:
        return {
            s: httpx.get(u + "/mlxd/ps", timeout=30).json()["rss_bytes"]
            for s, u in self.urls.items()
        }


def _json_request(service: str) -> tuple[str, dict]:
    if service == "embeddings":
        words = random.choice(["hello", "a longer sentence to embed " * 8])
        return "/v1/embeddings", {"input": [words, "second input"]}
    body = {"messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 8}
    return "/v1/chat/completions", {**body, "stream": random.random() < 0.5}


def _outcome(service: str, response: httpx.Response) -> str:
    if response.status_code == 503 and "retry-after" in response.headers:
        return "refused"
    if response.status_code != 200:
        return "wrong"
    return "answered" if CHECKS[service](response) else "wrong"


def _chat_ok(response: httpx.Response) -> bool:
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        lines = [ln[6:] for ln in response.text.splitlines() if ln.startswith("data: ")]
        return bool(lines) and lines[-1] == "[DONE]" and all(json.loads(ln) for ln in lines[:-1])
    choice = response.json()["choices"][0]
    return choice["finish_reason"] in ("stop", "length") and "content" in choice["message"]


def _embeddings_ok(response: httpx.Response) -> bool:
    data = response.json()["data"]
    vectors = [np.asarray(d["embedding"]) for d in data]
    return len(data) == 2 and all(v.size and np.isfinite(v).all() for v in vectors)


CHECKS: dict[str, Callable[[httpx.Response], bool]] = {
    "chat": _chat_ok,
    "embeddings": _embeddings_ok,
    "stt": lambda r: isinstance(r.json().get("text"), str),
}


def report(soak: Soak, start: dict[str, int], end: dict[str, int], seconds: float) -> None:
    columns = ("sent", "answered", "refused", "abandoned", "lost", "wrong")
    print(f"soak: {seconds:.0f} s")
    print(f"{'service':<11}" + "".join(f"{c:>10}" for c in columns) + "  RSS start -> end (MB)")
    for service in SERVICES:
        tally = soak.tally[service]
        change = (end[service] - start[service]) / start[service] * 100
        print(
            f"{service:<11}"
            + "".join(f"{tally[c]:>10}" for c in columns)
            + f"  {start[service] / 1e6:.0f} -> {end[service] / 1e6:.0f} ({change:+.1f}%)"
        )


def run(urls: dict[str, str], duration: float, clients: int) -> None:
    soak = Soak(urls)
    for service in SERVICES:  # warm-up: every path once before RSS is read
        soak.request(service, abandon=False)
    soak.tally = {s: Counter() for s in SERVICES}
    start = soak.rss()
    began = time.monotonic()
    deadline = began + duration
    threads = [threading.Thread(target=soak.client, args=(deadline, i)) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    report(soak, start, soak.rss(), time.monotonic() - began)


def tiny_server(tmp: Path) -> Server:
    from tests.tiny.bert import build_bge_mlx
    from tests.tiny.gemma4 import build_gemma4_mlx
    from tests.tiny.whisper import build_whisper_mlx

    models = {
        "chat": build_gemma4_mlx(tmp / "gemma4"),
        "embeddings": build_bge_mlx(tmp / "bge"),
        "stt": build_whisper_mlx(tmp / "whisper"),
    }
    flags = [arg for s, path in models.items() for arg in (f"--{s}-model", str(path))]
    server = start_server(tmp, *flags)
    server.wait_healthy(timeout=300)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of traffic")
    parser.add_argument("--clients", type=int, default=6)
    parser.add_argument("--tiny", action="store_true", help="start mlxd on tiny random models")
    for service, port in zip(SERVICES, (8080, 8081, 8082), strict=True):
        parser.add_argument(f"--{service}-port", type=int, default=port)
    args = parser.parse_args()
    if not args.tiny:
        ports = {s: getattr(args, f"{s}_port") for s in SERVICES}
        run({s: f"http://127.0.0.1:{p}" for s, p in ports.items()}, args.duration, args.clients)
        return
    with tempfile.TemporaryDirectory(prefix="mlxd-soak-") as tmp:
        server = tiny_server(Path(tmp))
        try:
            run({s: server.url(s) for s in SERVICES}, args.duration, args.clients)
        finally:
            print(f"mlxd exit status: {server.stop()}")


if __name__ == "__main__":
    main()
