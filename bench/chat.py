"""Chat at scale: concurrent streaming clients, the prefix cache and long prefills, side by side
with mlx_lm.server on the same weights. Prints tables and ratios (no thresholds).

    python bench/chat.py                       # tiny Gemma 4 and Gemma 3 270M (fp32), mlx_lm.server
    python bench/chat.py --model tiny --concurrency 1,4,8

Per model and concurrency: aggregate completion tokens/s, p50/p95 time to first token, p50 and
max gap between tokens, ratio to one client. Then: second-turn time to first token with a
~2,000-token shared prefix, prefix cache on and off; the largest gap of running streams while a
~4,000-token prompt arrives, against their steady p50 gap. Absolute numbers from a shared CPU
mean little: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.serving import free_port, start_server  # noqa: E402

WORDS = [
    "river",
    "mountain",
    "window",
    "garden",
    "letter",
    "music",
    "winter",
    "silver",
    "candle",
    "forest",
    "harbor",
    "lantern",
    "meadow",
    "orchard",
    "pepper",
    "quartz",
    "ribbon",
    "saddle",
    "thunder",
    "velvet",
    "whistle",
    "yellow",
    "anchor",
    "bridge",
]


def filler(n_words: int, seed: int = 0) -> str:
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(n_words))


@dataclass
class Stream:
    ttft: float | None = None
    stamps: list[float] = field(default_factory=list)
    tokens: int = 0

    @property
    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:], strict=False)]


async def stream_chat(client: httpx.AsyncClient, url: str, body: dict) -> Stream:
    out = Stream()
    started = time.perf_counter()
    payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", url + "/v1/chat/completions", json=payload) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                out.tokens = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                delta = choice.get("delta", {})
                if delta.get("content") or delta.get("reasoning_content") or delta.get("reasoning"):
                    now = time.perf_counter()
                    out.ttft = out.ttft if out.ttft is not None else now - started
                    out.stamps.append(now)
    return out


def request(text: str, max_tokens: int, **extra: object) -> dict:
    messages = [{"role": "user", "content": text}]
    return {
        "model": "m",
        "messages": messages,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        **extra,
    }


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def concurrent(url: str, clients: int, max_tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as client:
        await stream_chat(client, url, request("warm up", 4))
        started = time.perf_counter()
        bodies = [
            request(f"Tell me a story, number {i}. " + filler(8, i), max_tokens)
            for i in range(clients)
        ]
        streams = await asyncio.gather(*(stream_chat(client, url, b) for b in bodies))
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


async def second_turn_ttft(url: str, prefix_words: int) -> float:
    """Turn 1 with a long system prompt, then turn 2 on the same conversation: its TTFT."""
    system = {"role": "system", "content": "Context: " + filler(prefix_words, 3)}
    first = [system, {"role": "user", "content": "Summarise the context in a word."}]
    async with httpx.AsyncClient(timeout=600) as client:
        body = {"model": "m", "messages": first, "max_tokens": 8, "temperature": 0.0}
        reply = (await client.post(url + "/v1/chat/completions", json=body)).json()
        answer = reply["choices"][0]["message"].get("content") or ""
        second = [*first, {"role": "assistant", "content": answer}]
        second.append({"role": "user", "content": "And in two words?"})
        body = {"model": "m", "messages": second, "max_tokens": 4, "temperature": 0.0}
        return (await stream_chat(client, url, body)).ttft or float("nan")


async def gap_during_long_prefill(url: str, running: int, prompt_words: int) -> tuple[float, float]:
    """(steady p50 gap, largest gap) of `running` streams while a long prompt is prefilled."""
    async with httpx.AsyncClient(timeout=900, limits=httpx.Limits(max_connections=64)) as client:
        await stream_chat(client, url, request("warm up", 4))
        bodies = [request(f"Count slowly {i}.", 160) for i in range(running)]
        tasks = [asyncio.create_task(stream_chat(client, url, b)) for b in bodies]
        await asyncio.sleep(1.5)  # let them reach steady decoding
        arrived = time.perf_counter()
        long = asyncio.create_task(stream_chat(client, url, request(filler(prompt_words, 5), 2)))
        streams = await asyncio.gather(*tasks)
        done = await long
    first_token_at = arrived + (done.ttft or 0.0)
    steady = [g for s in streams for a, g in zip(s.stamps, s.gaps, strict=False) if a < arrived]
    during = [
        b - a
        for s in streams
        for a, b in zip(s.stamps, s.stamps[1:], strict=False)
        if b >= arrived and a <= first_token_at
    ]
    return pct(steady, 0.5), max(during, default=float("nan"))


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


def sweep(url: str, levels: list[int], max_tokens: int) -> dict[int, dict[str, float]]:
    return {n: asyncio.run(concurrent(url, n, max_tokens)) for n in levels}


def bench_model(name: str, model: Path, tmp: Path, args: argparse.Namespace) -> None:
    levels = [int(x) for x in args.concurrency.split(",")]
    print(f"\n=== {name}: {model}")
    server = Mlxd(model, tmp, "--chat-batch", str(max(levels)))
    try:
        ours = sweep(server.url, levels, args.max_tokens)
        table(f"mlxd, {name}: {args.max_tokens} tokens a client", ours)
        cached = asyncio.run(second_turn_ttft(server.url, args.prefix_words))
        steady, worst = asyncio.run(gap_during_long_prefill(server.url, 4, args.long_words))
    finally:
        server.close()
    nocache = Mlxd(model, tmp, "--chat-cache-bytes", "0")
    try:
        uncached = asyncio.run(second_turn_ttft(nocache.url, args.prefix_words))
    finally:
        nocache.close()
    top = 8 if 8 in ours else max(ours)
    print(
        f"\naggregate at {top} clients / 1 client: "
        f"{ours[top]['tok/s'] / ours[min(ours)]['tok/s']:.2f}x"
    )
    print(
        f"second turn TTFT, ~{args.prefix_words}-word shared prefix: cache on {cached:.3f}s, "
        f"off {uncached:.3f}s, ratio {cached / uncached:.2f}x"
    )
    print(
        f"running streams while a ~{args.long_words}-word prompt arrives: steady p50 gap "
        f"{steady:.3f}s, largest gap {worst:.3f}s, ratio {worst / steady:.2f}x"
    )
    if args.peer and name != "tiny":
        peer = MlxLmServer(model, tmp, max(levels))
        try:
            theirs = sweep(peer.url, levels, args.max_tokens)
        finally:
            peer.close()
        table(f"mlx_lm.server, {name}", theirs)
        print(
            f"\nmlxd / mlx_lm.server aggregate at {top} clients: "
            f"{ours[top]['tok/s'] / theirs[top]['tok/s']:.2f}x"
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
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--prefix-words", type=int, default=1400, help="~2,000 tokens")
    parser.add_argument("--long-words", type=int, default=2800, help="~4,000 tokens")
    parser.add_argument("--no-peer", dest="peer", action="store_false", help="skip mlx_lm.server")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.model or ["tiny", "gemma3"]:
            bench_model(name, resolve(name, Path(scratch)), Path(scratch), args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
