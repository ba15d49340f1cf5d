"""Embeddings throughput: the server under 1/8/32 concurrent clients, with and without dynamic
batching, against one batched request and the library called directly.

    python bench/embeddings.py --model DIR [--model DIR ...] [--requests 256]

DIR is an MLX embeddings model (as `mlxd convert embeddings` writes it), or `tiny` for the tiny
random bge the tests build. Prints a table and the ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import Server, start_server  # noqa: E402

SENTENCES = [
    "The weather is lovely today.",
    "今天天气很好。",
    "A quick brown fox jumps over the lazy dog.",
    "机器学习模型需要大量的数据。",
    "Where is the nearest train station?",
    "我喜欢在周末读书和散步。",
    "Embeddings map text to vectors.",
    "Apple Silicon has unified memory 🍎",
]


@dataclass
class Row:
    name: str
    texts_per_s: float
    p50_ms: float | None = None
    p95_ms: float | None = None


def texts(count: int) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} #{i}" for i in range(count)]


class Connection:
    """A minimal keep-alive HTTP/1.1 client for JSON POSTs. httpx's pool costs more CPU than the
    server itself at 32 connections; on a 2-core machine that would measure the client."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host, self.port, self.path = parts.hostname, parts.port, parts.path
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, body: dict) -> bytes:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        data = json.dumps(body).encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
        )
        self.writer.write(head.encode() + data)
        status = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        payload = await self.reader.readexactly(length)
        if b" 200 " not in status:
            raise RuntimeError(f"{status.decode().strip()}: {payload[:300]!r}")
        return payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


async def concurrent(url: str, clients: int, items: list[str]) -> Row:
    latencies: list[float] = []
    queue = list(items)

    async def client(connection: Connection) -> None:
        while queue:
            text = queue.pop()
            started = time.perf_counter()
            await connection.post({"input": text})
            latencies.append((time.perf_counter() - started) * 1000)

    connections = [Connection(url) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.post({"input": "warm up"}) for c in connections))
        started = time.perf_counter()
        await asyncio.gather(*(client(c) for c in connections))
        elapsed = time.perf_counter() - started
    finally:
        for connection in connections:
            connection.close()
    latencies.sort()
    p95 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.95))]
    return Row("", len(items) / elapsed, statistics.median(latencies), p95)


def one_request(url: str, items: list[str]) -> Row:
    httpx.post(url, json={"input": items[:8]}, timeout=600).raise_for_status()
    started = time.perf_counter()
    httpx.post(url, json={"input": items}, timeout=600).raise_for_status()
    return Row("", len(items) / (time.perf_counter() - started))


def library(model: Path, items: list[str]) -> Row:
    from engine.embeddings.runner import EmbeddingsRunner

    runner = EmbeddingsRunner.load(model, model.name)
    tokens = runner.tokenize(items)
    runner.embed(tokens[:8])
    started = time.perf_counter()
    runner.embed(tokens)
    return Row("library, one batch", len(items) / (time.perf_counter() - started))


def serve(model: Path, tmp: Path, *flags: str) -> Server:
    tmp.mkdir(parents=True, exist_ok=True)
    server = start_server(
        tmp,
        "--embeddings-model",
        str(model),
        "--queue-size",
        "256",
        *flags,
        services=("embeddings",),
    )
    server.wait_healthy(timeout=300)
    return server


def measure_server(model: Path, tmp: Path, items: list[str], batching: bool) -> list[Row]:
    flags = () if batching else ("--embeddings-no-batching",)
    label = "batching" if batching else "no batching"
    server = serve(model, tmp / label.replace(" ", "-"), *flags)
    url = server.url("embeddings") + "/v1/embeddings"
    rows = []
    try:
        for clients in (1, 8, 32):
            row = asyncio.run(concurrent(url, clients, items))
            row.name = f"server ({label}), {clients} clients"
            rows.append(row)
        if batching:
            row = one_request(url, items)
            row.name = "server, one request with all texts"
            rows.append(row)
    finally:
        server.stop()
    return rows


def print_table(model: str, rows: list[Row]) -> None:
    print(f"\n## {model}\n")
    print(f"| {'case':42} | {'texts/s':>9} | {'p50 ms':>8} | {'p95 ms':>8} |")
    print(f"|{'-' * 44}|{'-' * 11}|{'-' * 10}|{'-' * 10}|")
    for row in rows:
        p50 = f"{row.p50_ms:8.1f}" if row.p50_ms is not None else " " * 8
        p95 = f"{row.p95_ms:8.1f}" if row.p95_ms is not None else " " * 8
        print(f"| {row.name:42} | {row.texts_per_s:9.1f} | {p50} | {p95} |")
    rate = {row.name: row.texts_per_s for row in rows}
    c32 = rate["server (batching), 32 clients"]
    ratios = {
        "32 clients (batching) / library one batch": c32 / rate["library, one batch"],
        "32 clients: batching / no batching": c32 / rate["server (no batching), 32 clients"],
        "batching: 32 clients / 1 client": c32 / rate["server (batching), 1 clients"],
    }
    print()
    for name, value in ratios.items():
        print(f"{name}: {value:.2f}x")


def resolve(model: str, tmp: Path) -> Path:
    if model != "tiny":
        return Path(model).expanduser().resolve()
    from tests.tiny.bert import build_bge_mlx

    return build_bge_mlx(tmp / "tiny-bge")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="model dir or 'tiny'")
    parser.add_argument("--requests", type=int, default=256, help="texts per measurement")
    args = parser.parse_args(argv)
    items = texts(args.requests)
    with tempfile.TemporaryDirectory() as scratch:
        tmp = Path(scratch)
        for name in args.model:
            model = resolve(name, tmp)
            rows = measure_server(model, tmp, items, batching=True)
            rows += measure_server(model, tmp, items, batching=False)
            rows.append(_library_in_subprocess(model, items))
            print_table(model.name, rows)
    return 0


def _library_in_subprocess(model: Path, items: list[str]) -> Row:
    """The direct library call, in a fresh process so that no server competes for the CPU."""
    code = (
        f"import sys, json; sys.path.insert(0, {str(ROOT)!r}); "
        "from bench.embeddings import library; from pathlib import Path; "
        f"r = library(Path({str(model)!r}), json.loads(sys.argv[1])); print(r.texts_per_s)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(items)], capture_output=True, text=True, check=True
    )
    return Row("library, one batch", float(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    raise SystemExit(main())
