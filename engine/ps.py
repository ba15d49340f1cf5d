"""`mlxd ps`: what each service of a running engine holds, asked of its port (`GET /mlxd/ps`),
found through the same flags, environment and TOML file as `mlxd serve`."""

from __future__ import annotations

import json
from typing import Any

import httpx

from engine.config import Config
from engine.keepalive import format_duration
from engine.lifecycle import STATUS_PATH
from engine.store.catalog import Service

NOT_RUNNING = "not running"
COLUMNS = (
    ("SERVICE", "service"),
    ("PORT", "port"),
    ("MODEL", "model"),
    ("STATE", "state"),
    ("RSS", "rss_bytes"),
    ("MLX ACTIVE", "mlx_active_bytes"),
    ("MLX PEAK", "mlx_peak_bytes"),
    ("REQUESTS", "requests_served"),
    ("IDLE", "idle_s"),
    ("UNLOADS IN", "unload_in_s"),
)


def connect_host(host: str) -> str:
    """Where a local client reaches a server bound to `host` (any address: loopback)."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    bare = host.strip("[]")
    if bare == "::":
        return "[::1]"
    return f"[{bare}]" if ":" in bare else host


def service_status(config: Config, service: Service, timeout: float = 5.0) -> dict[str, Any]:
    port = config.port(service)
    url = f"http://{connect_host(config.host)}:{port}{STATUS_PATH}"
    headers = {"authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError:
        return {"service": service, "port": port, "state": NOT_RUNNING}
    try:
        body = response.json()
    except ValueError:
        body = {}
    if response.status_code != 200:
        message = (body.get("error") or {}).get("message") if isinstance(body, dict) else None
        text = message or f"HTTP {response.status_code} (is this an mlxd port?)"
        return {"service": service, "port": port, "state": "error", "message": text}
    return {**body, "service": service, "port": port}


def _size(value: int | None) -> str:
    if value is None:
        return "-"
    return f"{value / 1e9:.1f} GB" if value >= 10**9 else f"{value / 1e6:.0f} MB"


def _cell(row: dict[str, Any], key: str) -> str:
    value = row.get(key)
    if key.endswith("_bytes"):
        return _size(value)
    if key == "unload_in_s" and row.get("state") == "loaded" and row.get("keep_alive_s") is None:
        return "never"
    if key.endswith("_s"):
        return "-" if value is None else format_duration(value)
    return "-" if value is None else str(value)


def table(rows: list[dict[str, Any]]) -> str:
    cells = [[title for title, _ in COLUMNS]]
    cells += [[_cell(row, key) for _, key in COLUMNS] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    lines = [
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
        for line in cells
    ]
    notes = [
        f"{row['service']}: {row['message']}"
        for row in rows
        if row.get("state") in ("failed", "missing", "error")
    ]
    return "\n".join([line.rstrip() for line in lines] + notes)


def cmd_ps(config: Config, as_json: bool) -> int:
    rows = [service_status(config, service) for service in config.only]
    print(json.dumps(rows, indent=2) if as_json else table(rows))
    return 0
