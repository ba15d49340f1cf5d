"""`mlxd bench`'s output: a table per service, JSON, and a matplotlib figure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLUMNS = {
    "chat": (
        ("concurrency", "clients"),
        ("requests", "requests"),
        ("prompt_tokens", "prompt tok"),
        ("ttft_p50_ms", "TTFT p50 ms"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("itl_p50_ms", "ITL p50 ms"),
        ("itl_p95_ms", "ITL p95 ms"),
        ("aggregate_tok_s", "aggregate tok/s"),
    ),
    "embeddings": (
        ("batch_size", "texts/request"),
        ("concurrency", "clients"),
        ("requests", "requests"),
        ("texts_s", "texts/s"),
        ("tokens_s", "tokens/s"),
        ("latency_p50_ms", "latency p50 ms"),
    ),
    "stt": (
        ("audio_s", "audio s"),
        ("audio", "audio"),
        ("requests", "requests"),
        ("seconds_p50", "seconds p50"),
        ("real_time_factor", "real-time factor"),
        ("x_real_time", "x real time"),
    ),
}
TITLES = {"chat": "Chat", "embeddings": "Embeddings", "stt": "Speech-to-text"}


def _cell(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def table(service: str, rows: list[dict[str, Any]]) -> str:
    columns = COLUMNS[service]
    cells = [[title for _, title in columns]]
    cells += [[_cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(cell.rjust(width) for cell, width in zip(line, widths, strict=True))
        for line in cells
    )


def memory_line(memory: dict[str, int] | None) -> str:
    if not memory:
        return "peak memory: n/a (the server serves no mlxd /metrics)"
    parts = [f"process RSS peak {memory['rss_peak_bytes'] / 1e6:.0f} MB"]
    if "mlx_peak_bytes" in memory:
        parts.append(f"MLX peak {memory['mlx_peak_bytes'] / 1e6:.0f} MB")
    return "peak memory: " + ", ".join(parts)


def text(results: dict[str, dict[str, Any]]) -> str:
    blocks = []
    for service, result in results.items():
        model = f", model {result['model']}" if result.get("model") else ""
        blocks.append(
            f"{TITLES[service]} ({result['url']}{model})\n"
            f"{table(service, result['rows'])}\n{memory_line(result.get('memory'))}"
        )
    return "\n\n".join(blocks)


def plot(results: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError(
            "--plot needs matplotlib: pip install matplotlib (or pip install 'mlxd[plot]')"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.4), squeeze=False)
    for ax, (service, result) in zip(axes[0], results.items(), strict=True):
        DRAW[service](ax, result["rows"])
        ax.set_title(TITLES[service], fontsize=10)
        ax.grid(alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _draw_chat(ax: Any, rows: list[dict[str, Any]]) -> None:
    levels = [row["concurrency"] for row in rows]
    ax.plot(levels, [row["aggregate_tok_s"] for row in rows], "o-", label="aggregate")
    decode = [row["decode_tok_s"] or 0 for row in rows]
    ax.plot(levels, decode, "s--", label="per stream")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("generated tokens/s")
    ax.legend(fontsize=8)


def _draw_embeddings(ax: Any, rows: list[dict[str, Any]]) -> None:
    for size in sorted({row["batch_size"] for row in rows}):
        mine = [row for row in rows if row["batch_size"] == size]
        ax.plot([r["concurrency"] for r in mine], [r["texts_s"] for r in mine], "o-", label=size)
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("texts/s")
    ax.legend(title="texts/request", fontsize=8, title_fontsize=8)


def _draw_stt(ax: Any, rows: list[dict[str, Any]]) -> None:
    labels = [f"{row['audio_s']:g} s" for row in rows]
    ax.bar(labels, [row["x_real_time"] for row in rows])
    ax.set_xlabel("file length")
    ax.set_ylabel("x real time (audio s / wall s)")


DRAW = {"chat": _draw_chat, "embeddings": _draw_embeddings, "stt": _draw_stt}
