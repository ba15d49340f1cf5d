"""Chat at scale: concurrent streaming clients, the prefix cache and long prefills, side by side
with mlx_lm.server on the same weights. Prints tables and ratios (no thresholds).

    python bench/chat.py                       # tiny Gemma 4 and Gemma 3 270M (fp32), mlx_lm.server
    python bench/chat.py --model tiny --concurrency 1,4,8

Per model and concurrency: aggregate completion tokens/s, p50/p95 time to first token, p50 and
max gap between tokens, ratio to one client. Then: second-turn time to first token with a
~2,000-token shared prefix, prefix cache on and off; the largest gap of running streams while a
~4,000-token prompt arrives, against their steady p50 gap. Each number is the median of
`--trials` runs (3); mlxd's and mlx_lm.server's runs alternate, both servers loaded, so both see
the same machine. Absolute numbers from a shared CPU mean little: read the ratios.

The client turns its garbage collector off while it measures. The sweep's gaps are between
text chunks (a random model's stray UTF-8 bytes are held back until they decode, so on the
tiny model one gap may span several tokens); the long-prompt streams ask for logprobs and count
only gaps between two tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from engine.bench.workloads import filler  # noqa: E402
from tests.serving import free_port, start_server  # noqa: E402

LONG_LIMIT = {"tiny": 3800}  # the tiny model's context is 4,096 tokens


@dataclass
class Stream:
    ttft: float | None = None
    stamps: list[float] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)  # tokens in each stamped chunk
    tokens: int = 0

    @property
    def pairs(self) -> list[tuple[float, float]]:
        """(previous chunk, chunk) times where the later chunk holds exactly one token: the gap
        between two tokens. Without logprobs a chunk counts as one token; with them, a chunk
        that holds several (text held back until it decodes, e.g. a random model's stray UTF-8
        bytes) is no gap between tokens and is left out."""
        return [
            (a, b)
            for a, b, k in zip(self.stamps, self.stamps[1:], self.counts[1:], strict=False)
            if k == 1
        ]

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in self.pairs]


async def _body(reader: asyncio.StreamReader, chunked: bool):
    """The response body as it arrives (chunked transfer decoded; else until the close)."""
    if not chunked:
        while data := await reader.read(65536):
            yield data
        return
    while size := int((await reader.readline()).strip() or b"0", 16):
        yield await reader.readexactly(size)
        await reader.readexactly(2)


async def stream_chat(url: str, body: dict, out: Stream | None = None) -> Stream:
    """One streamed chat completion over a bare HTTP/1.1 connection: httpx's per-line parsing
    costs as much CPU as a tiny model's server on this 2-core machine, and would be measured.
    Cancelling the task closes the connection (the client leaves); `out` keeps what came."""
    out = out if out is not None else Stream()
    parts = urlsplit(url)
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    data = json.dumps(payload).encode()
    started = time.perf_counter()
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n"
        "Connection: close\r\n\r\n"
    )
    writer.write(head.encode() + data)
    status = await reader.readline()
    if b" 200 " not in status:
        raise RuntimeError(f"{status.decode().strip()}: {(await reader.read(400))!r}")
    chunked = False
    while (line := await reader.readline()) not in (b"\r\n", b""):
        chunked |= line.lower().startswith(b"transfer-encoding: chunked")
    buffer = b""
    try:
        async for piece in _body(reader, chunked):
            buffer += piece
            *lines, buffer = buffer.split(b"\n")
            now = time.perf_counter()
            for line in lines:
                _read_event(out, line, now, started)
    finally:
        writer.close()
    return out


def _read_event(out: Stream, line: bytes, now: float, started: float) -> None:
    if not line.startswith(b"data: {"):
        return
    chunk = json.loads(line[6:])
    if chunk.get("usage"):
        out.tokens = chunk["usage"]["completion_tokens"]
    for choice in chunk.get("choices", []):
        delta = choice.get("delta", {})
        text = delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning")
        logprobs = choice.get("logprobs")
        # With logprobs, a chunk brings as many tokens as it has entries (none: the rest of the
        # previous chunk's text, e.g. reasoning and answer split); without, one if it has text.
        tokens = len(logprobs.get("content") or []) if logprobs else int(bool(text))
        if tokens:
            out.ttft = out.ttft if out.ttft is not None else now - started
            out.stamps.append(now)
            out.counts.append(tokens)


def request(text: str, max_tokens: int, **extra: object) -> dict:
    """A chat body without "model": each server uses its own (mlx_lm.server would try to
    download a model named in the request)."""
    messages = [{"role": "user", "content": text}]
    return {
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


def measured(work: Any) -> Any:
    """Run a coroutine (or call a function) with this client's garbage collector off: a full
    collection of the client's heap takes ~0.1 s here and would show as a gap in the streams
    the server sent on time. Collected before, and again after."""
    gc.collect()
    gc.disable()
    try:
        return asyncio.run(work) if asyncio.iscoroutine(work) else work()
    finally:
        gc.enable()
        gc.collect()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def concurrent(url: str, clients: int, max_tokens: int) -> dict[str, float]:
    await stream_chat(url, request("warm up", 4))
    started = time.perf_counter()
    bodies = [
        request(f"Tell me a story, number {i}. " + filler(8, i), max_tokens) for i in range(clients)
    ]
    streams = await asyncio.gather(*(stream_chat(url, b) for b in bodies))
    wall = time.perf_counter() - started
    tokens = sum(s.tokens or len(s.stamps) for s in streams)
    gaps = [g for s in streams for g in s.gaps]
    ttfts = [s.ttft for s in streams if s.ttft is not None]
    return {
        "tok/s": tokens / wall,
        "ttft p50": pct(ttfts, 0.5),
        "ttft p95": pct(ttfts, 0.95),
        "gap p50": pct(gaps, 0.5),
        "gap max": max(gaps, default=float("nan")),
    }


def words_for(url: str, tokens: int) -> int:
    """How many filler words make a prompt of about `tokens` tokens on this model."""
    probe = request(filler(200, 1), 1)
    used = httpx.post(url + "/v1/chat/completions", json=probe, timeout=600).json()
    per_word = used["usage"]["prompt_tokens"] / 200
    return max(1, int(tokens / per_word))


def second_turn_ttft(url: str, prefix_tokens: int, trial: int = 0) -> tuple[float, int, int]:
    """Turn 1 with a long system prompt, then turn 2 of the same conversation:
    (its time to first token, its prompt tokens, the cached ones). Each trial is a new
    conversation, on one kept-alive connection (httpx.post() would build a client per call)."""
    words = words_for(url, prefix_tokens)
    system = {"role": "system", "content": "Context: " + filler(words, 3 + trial)}
    first = [system, {"role": "user", "content": "Summarise the context in a word."}]
    with httpx.Client(base_url=url, timeout=900) as client:
        body = {"messages": first, "max_tokens": 8, "temperature": 0.0}
        reply = client.post("/v1/chat/completions", json=body).json()
        answer = reply["choices"][0]["message"].get("content") or "Words."
        second = [*first, {"role": "assistant", "content": answer}]
        second.append({"role": "user", "content": "And in two words?"})
        body = {"messages": second, "max_tokens": 1, "temperature": 0.0}
        started = time.perf_counter()
        reply = client.post("/v1/chat/completions", json=body).json()
        seconds = time.perf_counter() - started
    usage = reply["usage"]
    cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
    return seconds, usage["prompt_tokens"], cached


async def gap_during_long_prefill(
    url: str, running: int, prompt_tokens: int, trial: int = 0
) -> tuple[float, float, float]:
    """(steady p50 gap, largest gap while a long prompt is read, largest gap before it) of
    `running` streams. A stream that ends (end of turn) is replaced, so `running` keep
    decoding until the long prompt's first token is out. The streams ask for logprobs, so
    that only gaps between two tokens count (`Stream.pairs`). Each trial's long prompt is a
    new text: an earlier trial's would come from the prefix cache."""
    words = words_for(url, prompt_tokens)
    await stream_chat(url, request("warm up", 4))
    streams: list[Stream] = []
    stop = asyncio.Event()

    async def keep_one_running(i: int) -> None:
        while not stop.is_set():
            streams.append(Stream())
            body = request(
                f"Count slowly {i}.", 3000, temperature=1.0, seed=len(streams), logprobs=True
            )
            await stream_chat(url, body, streams[-1])

    tasks = [asyncio.create_task(keep_one_running(i)) for i in range(running)]
    while sum(len(s.stamps) for s in streams) < 20 * running:  # steady decoding first
        await asyncio.sleep(0.05)
    arrived = time.perf_counter()
    done = await stream_chat(url, request(filler(words, 100 + trial), 2))
    first_token_at = arrived + (done.ttft or 0.0)
    stop.set()
    await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    steady = [b - a for s in streams for a, b in s.pairs if b < arrived]
    during = [b - a for s in streams for a, b in s.pairs if b >= arrived and a <= first_token_at]
    return pct(steady, 0.5), max(during, default=float("nan")), max(steady, default=float("nan"))


# ---------------------------------------------------------------------------- servers


class Mlxd:
    def __init__(self, model: Path, tmp: Path, *flags: str) -> None:
        self.server = start_server(tmp, "--chat-model", str(model), *flags, services=("chat",))
        self.server.wait_healthy(timeout=600)
        self.url = self.server.url("chat")

    def close(self) -> None:
        self.server.stop()


class MlxLmServer:
    def __init__(self, model: Path, tmp: Path, concurrency: int) -> None:
        port = free_port()
        log = (tmp / f"mlx_lm-{port}.log").open("w")
        command = [sys.executable, "-m", "mlx_lm", "server", "--model", str(model)]
        command += ["--port", str(port), "--decode-concurrency", str(max(concurrency, 1))]
        self.process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy()
        )
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/v1/models", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)
        raise RuntimeError("mlx_lm.server did not start")

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(30)


# ---------------------------------------------------------------------------- report


def table(title: str, rows: dict[int, dict[str, float]]) -> None:
    print(f"\n{title}")
    print(
        f"{'clients':>7} {'tok/s':>8} {'x1':>6} {'ttft p50':>9} {'ttft p95':>9} "
        f"{'gap p50':>8} {'gap max':>8}"
    )
    one = rows[min(rows)]["tok/s"]
    for n, r in rows.items():
        print(
            f"{n:>7} {r['tok/s']:>8.1f} {r['tok/s'] / one:>5.2f}x {r['ttft p50']:>8.3f}s "
            f"{r['ttft p95']:>8.3f}s {r['gap p50']:>7.3f}s {r['gap max']:>7.3f}s"
        )


def median_by(runs: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run whose `key` is the median (its other numbers with it)."""
    return sorted(runs, key=lambda r: r[key])[len(runs) // 2]


Table = dict[int, dict[str, float]]


def sweep(urls: list[str], levels: list[int], max_tokens: int, trials: int) -> list[Table]:
    """One table per server. Runs are interleaved, level by level and server by server, so a
    slow spell of the machine hits every level and every server alike."""
    for url in urls:
        measured(concurrent(url, max(levels), max_tokens))  # warm up at the highest level
    runs: list[dict[int, list[dict[str, float]]]] = [{n: [] for n in levels} for _ in urls]
    for _ in range(trials):
        for n in levels:
            for url, by_level in zip(urls, runs, strict=True):
                by_level[n].append(measured(concurrent(url, n, max_tokens)))
    return [{n: median_by(r, "tok/s") for n, r in by_level.items()} for by_level in runs]


def second_turns(url: str, prefix_tokens: int, trials: int) -> tuple[float, int, int]:
    """The median second-turn time to first token over `trials` conversations."""
    runs = [measured(partial(second_turn_ttft, url, prefix_tokens, t)) for t in range(trials)]
    return sorted(runs)[len(runs) // 2]


def long_prefill_gaps(url: str, long_tokens: int, trials: int) -> dict[str, float]:
    """The trial with the median ratio of largest gap during the long prefill to steady p50."""
    runs = []
    for trial in range(trials):
        steady, worst, jitter = measured(gap_during_long_prefill(url, 4, long_tokens, trial))
        runs.append({"steady": steady, "worst": worst, "jitter": jitter, "ratio": worst / steady})
    return median_by(runs, "ratio")


def bench_model(name: str, model: Path, tmp: Path, args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.concurrency.split(",")]
    print(f"\n=== {name}: {model}")
    long_tokens = min(args.long_tokens, LONG_LIMIT.get(name, args.long_tokens))
    server = Mlxd(model, tmp, "--chat-batch", str(max(levels)))
    try:
        peer = MlxLmServer(model, tmp, max(levels)) if args.peer and name != "tiny" else None
        try:
            urls = [server.url] + ([peer.url] if peer else [])
            ours, *theirs = sweep(urls, levels, args.max_tokens, args.trials)
        finally:
            if peer:
                peer.close()
        table(f"mlxd, {name}: {args.max_tokens} tokens a client", ours)
        for other in theirs:
            table(f"mlx_lm.server, {name} (runs interleaved with mlxd's)", other)
        cached, n_prompt, n_cached = second_turns(server.url, args.prefix_tokens, args.trials)
        gaps = long_prefill_gaps(server.url, long_tokens, args.trials)
    finally:
        server.close()
    nocache = Mlxd(model, tmp, "--chat-cache-bytes", "0")
    try:
        uncached, _, _ = second_turns(nocache.url, args.prefix_tokens, args.trials)
    finally:
        nocache.close()
    top = 8 if 8 in ours else max(ours)
    print(
        f"\naggregate at {top} clients / 1 client: "
        f"{ours[top]['tok/s'] / ours[min(ours)]['tok/s']:.2f}x"
    )
    print(
        f"second turn ({n_prompt} prompt tokens, {n_cached} cached) time to first token: "
        f"cache on {cached:.3f}s, off {uncached:.3f}s, ratio {cached / uncached:.2f}x"
    )
    print(
        f"running streams while a ~{long_tokens}-token prompt arrives: steady p50 gap "
        f"{gaps['steady']:.3f}s, largest gap {gaps['worst']:.3f}s, ratio {gaps['ratio']:.2f}x "
        f"(before it arrived, the largest gap was {gaps['jitter']:.3f}s: "
        f"{gaps['jitter'] / gaps['steady']:.2f}x)"
    )
    for other in theirs:
        print(
            f"mlxd / mlx_lm.server aggregate at {top} clients: "
            f"{ours[top]['tok/s'] / other[top]['tok/s']:.2f}x"
        )


def resolve(name: str, tmp: Path) -> Path:
    if name == "tiny":
        from tests.tiny.gemma4 import build_gemma4_mlx

        return build_gemma4_mlx(tmp / "tiny-gemma4")
    if name == "gemma3":
        from tests.real_weights import gemma3_270m_mlx

        return gemma3_270m_mlx()
    return Path(name).expanduser().resolve()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", help="tiny, gemma3 or a model directory")
    parser.add_argument("--concurrency", default="1,2,4,8,16")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prefix-tokens", type=int, default=2000)
    parser.add_argument("--long-tokens", type=int, default=4000)
    parser.add_argument("--trials", type=int, default=3, help="runs per number; the median")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip mlx_lm.server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.model or ["tiny", "gemma3"]:
            bench_model(name, resolve(name, Path(scratch)), Path(scratch), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
