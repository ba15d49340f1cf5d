"""`mlxd bench`: measures a running mlxd, or any server with the same API, from the client.

Chat: prefill and decode tokens/s, time to first token, inter-token p50/p95 and aggregate
tokens/s per concurrency; embeddings: texts/s per batch size and concurrency; speech: the
real-time factor per file length; each service's peak memory from its /metrics (mlxd only).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from engine.config import Config

SERVICES = ("chat", "embeddings", "stt")


def _numbers(kind: type) -> Any:
    def parse(text: str) -> list:
        try:
            values = [kind(part) for part in text.split(",") if part.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected numbers like 1,4,8: {text!r}") from None
        if not values or min(values) <= 0:
            raise argparse.ArgumentTypeError(f"expected positive numbers: {text!r}")
        return values

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--service", choices=SERVICES, help="the service to measure (default: each one running)"
    )
    parser.add_argument(
        "--url", help="base URL of the server (default: this configuration's port; needs --service)"
    )
    parser.add_argument(
        "--concurrency", type=_numbers(int), default="1,4,8", help="concurrent clients"
    )
    parser.add_argument("--rounds", type=int, default=2, help="requests per client per level")
    parser.add_argument("--max-tokens", type=int, default=64, help="chat tokens per reply")
    parser.add_argument("--prompt-words", type=int, default=200, help="chat prompt length, words")
    parser.add_argument(
        "--batch-sizes", type=_numbers(int), default="1,8,32", help="embeddings texts/request"
    )
    parser.add_argument(
        "--audio-seconds", type=_numbers(float), default="5,15,30", help="speech file lengths, s"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument(
        "--plot", type=Path, metavar="FILE.png", help="draw the results (default: no plot)"
    )


ARGUMENTS = frozenset(
    {"service", "url", "concurrency", "rounds", "max_tokens", "prompt_words", "batch_sizes"}
    | {"audio_seconds", "json", "plot"}
)


def run(config: Config, args: argparse.Namespace) -> int:
    from engine.bench.measure import BenchError, measure
    from engine.bench.report import plot, text

    try:
        _check(args)
        results = asyncio.run(measure(config, args))
        if args.plot is not None:
            plot(results, args.plot, "mlxd bench")
    except (BenchError, ImportError, ValueError) as exc:
        print(f"mlxd bench: error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(results, indent=2) if args.json else text(results))
    return 0


def _check(args: argparse.Namespace) -> None:
    if args.url and not args.service:
        raise ValueError("--url needs --service (chat, embeddings or stt)")
    if args.rounds < 1 or args.max_tokens < 1 or args.prompt_words < 1:
        raise ValueError("--rounds, --max-tokens and --prompt-words must be positive")
