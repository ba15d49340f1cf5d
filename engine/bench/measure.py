"""Runs the chosen benchmarks against their servers, with a progress bar, and reads each
server's peak memory from its /metrics."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import httpx
from tqdm import tqdm

from engine.bench.workloads import BENCHES, BenchError, Target, request_count, served_model
from engine.config import Config

__all__ = ["BenchError", "measure"]
TIMEOUT = httpx.Timeout(600.0, connect=5.0)


def targets(config: Config, args: argparse.Namespace) -> list[Target]:
    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    if args.url:
        return [Target(args.service, args.url.rstrip("/"), headers)]
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else config.host
    host = f"[{host}]" if ":" in host else host
    services = [args.service] if args.service else list(config.only)
    return [Target(s, f"http://{host}:{config.port(s)}", headers) for s in services]


async def reachable(client: httpx.AsyncClient, target: Target) -> bool:
    try:
        await client.get(f"{target.url}/v1/models")
    except httpx.HTTPError:
        return False
    return True


async def measure(config: Config, args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    results: dict[str, dict[str, Any]] = {}
    async with httpx.AsyncClient(timeout=TIMEOUT) as probe:
        chosen = [t for t in targets(config, args) if await reachable(probe, t)]
    if not chosen:
        wanted = ", ".join(t.url for t in targets(config, args))
        raise BenchError(f"no server answers at {wanted}: start one with `mlxd serve`")
    total = sum(request_count(t.service, args) for t in chosen)
    with tqdm(total=total, desc="mlxd bench", unit="req", file=sys.stderr, disable=None) as bar:
        for target in chosen:
            results[target.service] = await _one(target, args, lambda: bar.update(1))
    return results


async def _one(target: Target, args: argparse.Namespace, tick: Any) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=max(args.concurrency) + 2)
    async with httpx.AsyncClient(timeout=TIMEOUT, headers=target.headers, limits=limits) as client:
        model = await served_model(client, target)
        target = Target(target.service, target.url, target.headers, model)
        try:
            rows = await BENCHES[target.service](client, target, args, tick)
        except httpx.HTTPError as exc:
            raise BenchError(f"{target.url}: {type(exc).__name__}: {exc}") from None
        memory = await peak_memory(client, target)
    return {"url": target.url, "model": model, "rows": rows, "memory": memory}


async def peak_memory(client: httpx.AsyncClient, target: Target) -> dict[str, int] | None:
    """The service's peak RSS and MLX peak memory from mlxd's /metrics; None elsewhere."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        response = await client.get(f"{target.url}/metrics")
        families = list(text_string_to_metric_families(response.text))
    except (httpx.HTTPError, ValueError):
        return None
    values = {s.name: s.value for f in families for s in f.samples}
    if response.status_code != 200 or "mlxd_process_peak_resident_memory_bytes" not in values:
        return None
    memory = {"rss_peak_bytes": int(values["mlxd_process_peak_resident_memory_bytes"])}
    if "mlxd_mlx_peak_memory_bytes" in values:
        memory["mlx_peak_bytes"] = int(values["mlxd_mlx_peak_memory_bytes"])
    return memory
