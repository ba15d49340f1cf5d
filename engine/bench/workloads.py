"""What `mlxd bench` sends: chat streams, embeddings batches and speech files, against a running
mlxd or any server with the same API, timed on the client. Each function returns table rows."""

from __future__ import annotations

import asyncio
import json
import statistics
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx

from engine.bench.audio import speech_wav

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
Tick = Callable[[], None]


class BenchError(Exception):
    """A server that cannot be reached or that refused a request."""


@dataclass(frozen=True)
class Target:
    service: str
    url: str  # the base URL, without /v1
    headers: dict[str, str]
    model: str | None = None


@dataclass
class Stream:
    started: float
    stamps: list[float] = field(default_factory=list)  # arrival of each chunk with text
    prompt_tokens: int = 0
    completion_tokens: int = 0


def filler(words: int, seed: int = 0) -> str:
    """Text of `words` words, a different order for each seed."""
    return " ".join(WORDS[(i * 7 + seed) % len(WORDS)] for i in range(words))


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def check(response: httpx.Response) -> httpx.Response:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text[:300]
        raise BenchError(f"{response.request.url} answered {response.status_code}: {message}")
    return response


async def served_model(client: httpx.AsyncClient, target: Target) -> str | None:
    """The first model `/v1/models` lists (servers that need `model` get it), else None."""
    try:
        data = check(await client.get(f"{target.url}/v1/models")).json()["data"]
    except (BenchError, ValueError, KeyError, TypeError):
        return None
    return data[0]["id"] if data else None


async def levels(
    concurrency: list[int], rounds: int, one: Callable[[int], Awaitable[Any]]
) -> list[tuple[int, float, list[Any]]]:
    """For each level: `level` clients, each making `rounds` requests in turn; the level's
    wall time and every request's result."""
    out = []
    for level in concurrency:

        async def client(worker: int, level: int = level) -> list[Any]:
            return [await one(worker * rounds + i) for i in range(rounds)]

        started = time.perf_counter()
        results = await asyncio.gather(*(client(w) for w in range(level)))
        out.append((level, time.perf_counter() - started, [r for rs in results for r in rs]))
    return out


# ---- chat ------------------------------------------------------------------------------------


async def chat_stream(
    client: httpx.AsyncClient, target: Target, seed: int, max_tokens: int, words: int
) -> Stream:
    # A fresh text per request: a prefix cache cannot serve it.
    text = f"[{uuid.uuid4().hex[:8]}] Continue this list of words: {filler(words, seed)}"
    body: dict[str, Any] = {
        "messages": [{"role": "user", "content": text}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.model:
        body["model"] = target.model
    out = Stream(time.perf_counter())
    async with client.stream("POST", f"{target.url}/v1/chat/completions", json=body) as response:
        if response.status_code >= 400:
            await response.aread()
            check(response)
        async for line in response.aiter_lines():
            _read_event(out, line)
    out.completion_tokens = out.completion_tokens or len(out.stamps)
    return out


def _read_event(out: Stream, line: str) -> None:
    if not line.startswith("data: {"):
        return
    chunk = json.loads(line[6:])
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        if any(delta.get(k) for k in ("content", "reasoning_content", "reasoning")):
            out.stamps.append(time.perf_counter())
    if usage := chunk.get("usage"):
        out.prompt_tokens = usage.get("prompt_tokens", 0)
        out.completion_tokens = usage.get("completion_tokens", 0)


def chat_row(level: int, wall: float, streams: list[Stream]) -> dict[str, Any]:
    timed = [s for s in streams if s.stamps]
    ttfts = [s.stamps[0] - s.started for s in timed]
    gaps = [b - a for s in timed for a, b in zip(s.stamps, s.stamps[1:], strict=False)]
    decode = [
        (s.completion_tokens - 1) / (s.stamps[-1] - s.stamps[0])
        for s in timed
        if s.completion_tokens > 1 and s.stamps[-1] > s.stamps[0]
    ]
    prefill = [s.prompt_tokens / t for s, t in zip(timed, ttfts, strict=True) if t > 0]
    return {
        "concurrency": level,
        "requests": len(streams),
        "prompt_tokens": statistics.median(s.prompt_tokens for s in streams),
        "completion_tokens": sum(s.completion_tokens for s in streams),
        "ttft_p50_ms": statistics.median(ttfts) * 1000 if ttfts else None,
        "prefill_tok_s": statistics.median(prefill) if prefill else None,
        "decode_tok_s": statistics.median(decode) if decode else None,
        "itl_p50_ms": percentile(gaps, 0.5) * 1000 if gaps else None,
        "itl_p95_ms": percentile(gaps, 0.95) * 1000 if gaps else None,
        "aggregate_tok_s": sum(s.completion_tokens for s in streams) / wall,
    }


async def bench_chat(
    client: httpx.AsyncClient, target: Target, options: Any, tick: Tick
) -> list[dict[str, Any]]:
    async def one(seed: int) -> Stream:
        stream = await chat_stream(client, target, seed, options.max_tokens, options.prompt_words)
        tick()
        return stream

    runs = await levels(options.concurrency, options.rounds, one)
    return [chat_row(level, wall, streams) for level, wall, streams in runs]


# ---- embeddings ------------------------------------------------------------------------------


async def embed(client: httpx.AsyncClient, target: Target, texts: list[str]) -> int:
    body: dict[str, Any] = {"input": texts}
    if target.model:
        body["model"] = target.model
    response = check(await client.post(f"{target.url}/v1/embeddings", json=body))
    return int(response.json().get("usage", {}).get("prompt_tokens", 0))


async def bench_embeddings(
    client: httpx.AsyncClient, target: Target, options: Any, tick: Tick
) -> list[dict[str, Any]]:
    rows = []
    for size in options.batch_sizes:

        async def one(seed: int, size: int = size) -> tuple[int, float]:
            texts = [filler(12 + (seed + i) % 24, seed + i) for i in range(size)]
            started = time.perf_counter()
            tokens = await embed(client, target, texts)
            tick()
            return tokens, time.perf_counter() - started

        for level, wall, done in await levels(options.concurrency, options.rounds, one):
            rows.append(
                {
                    "batch_size": size,
                    "concurrency": level,
                    "requests": len(done),
                    "texts_s": len(done) * size / wall,
                    "tokens_s": sum(tokens for tokens, _ in done) / wall,
                    "latency_p50_ms": statistics.median(s for _, s in done) * 1000,
                }
            )
    return rows


# ---- speech ----------------------------------------------------------------------------------


async def transcribe(client: httpx.AsyncClient, target: Target, wav: bytes) -> float:
    data = {"response_format": "json"}
    if target.model:
        data["model"] = target.model
    started = time.perf_counter()
    files = {"file": ("bench.wav", wav, "audio/wav")}
    check(await client.post(f"{target.url}/v1/audio/transcriptions", data=data, files=files))
    return time.perf_counter() - started


async def bench_stt(
    client: httpx.AsyncClient, target: Target, options: Any, tick: Tick
) -> list[dict[str, Any]]:
    """One file at a time (a speech service transcribes one at a time): the real-time factor
    per file length."""
    rows = []
    for seconds in options.audio_seconds:
        wav, source = speech_wav(seconds)
        times = []
        for _ in range(options.rounds):
            times.append(await transcribe(client, target, wav))
            tick()
        median = statistics.median(times)
        rows.append(
            {
                "audio_s": seconds,
                "audio": source,
                "requests": len(times),
                "seconds_p50": median,
                "real_time_factor": median / seconds,
                "x_real_time": seconds / median,
            }
        )
    return rows


BENCHES = {"chat": bench_chat, "embeddings": bench_embeddings, "stt": bench_stt}


def request_count(service: str, options: Any) -> int:
    per_level = sum(options.concurrency) * options.rounds
    if service == "chat":
        return per_level
    if service == "embeddings":
        return per_level * len(options.batch_sizes)
    return len(options.audio_seconds) * options.rounds
