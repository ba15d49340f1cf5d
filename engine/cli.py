"""The `mlxd` command: serve, models, doctor."""

from __future__ import annotations

import argparse
import logging
import platform
import socket
import sys
from typing import Any

from engine import __version__
from engine.config import Config, ConfigError, load_config

SERVE_FLAGS: list[tuple[str, dict[str, Any]]] = [
    ("--host", {"help": "address to bind (default 127.0.0.1; non-loopback needs --api-key)"}),
    ("--chat-port", {"type": int, "help": "chat service port (default 8080)"}),
    ("--embeddings-port", {"type": int, "help": "embeddings service port (default 8081)"}),
    ("--stt-port", {"type": int, "help": "speech-to-text service port (default 8082)"}),
    ("--only", {"help": "comma-separated services to run: chat,embeddings,stt"}),
    ("--chat-model", {"help": "store id or local MLX model directory (default gemma-4-e4b)"}),
    ("--embeddings-model", {"help": "store id or local directory (default bge-base-zh)"}),
    ("--stt-model", {"help": "store id or local directory (default whisper-large-v3-turbo)"}),
    ("--api-key", {"help": "require 'Authorization: Bearer KEY' on every route but /health"}),
    ("--allowed-hosts", {"help": "extra Host header names to accept, comma-separated"}),
    ("--cors-origins", {"help": "origins that get CORS headers, comma-separated ('*' for any)"}),
    ("--strict-model", {"action": "store_const", "const": True, "help": "404 unknown models"}),
    ("--queue-size", {"type": int, "help": "requests queued per service before 503 (default 64)"}),
    ("--shutdown-timeout", {"type": float, "help": "seconds to finish work on SIGTERM"}),
    ("--log-level", {"help": "DEBUG, INFO, WARNING or ERROR"}),
]


def _add_config_flags(parser: argparse.ArgumentParser, flags: list[tuple[str, dict]]) -> None:
    parser.add_argument("--config", help="TOML configuration file (default $MLXD_HOME/config.toml)")
    parser.add_argument("--home", help="model store and data directory ($MLXD_HOME)")
    for flag, options in flags:
        parser.add_argument(flag, default=None, **options)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxd", description="Local OpenAI-style chat, embeddings and speech-to-text on MLX."
    )
    parser.add_argument("--version", action="version", version=f"mlxd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = commands.add_parser("serve", help="run the services in the foreground")
    _add_config_flags(serve, SERVE_FLAGS)
    models = commands.add_parser("models", help="list the models in the store")
    _add_config_flags(models, [])
    doctor = commands.add_parser("doctor", help="check the platform, ports and models")
    _add_config_flags(doctor, SERVE_FLAGS)
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {
        key: value
        for key, value in vars(args).items()
        if key not in ("command", "config", "func") and value is not None
    }
    return load_config(flags, args.config)


def cmd_serve(config: Config) -> int:
    from engine.supervisor import serve
    from engine.worker import setup_logging

    setup_logging(config.log_level, "mlxd")
    return serve(config)


def cmd_models(config: Config) -> int:
    from conversions.store import Store

    models = Store(config.home).list()
    if not models:
        print(f"No models in {config.home / 'models'}. Install one with `mlxd pull ID`.")
        return 0
    print(f"{'ID':32} {'KIND':11} {'SIZE':>10}  QUANTIZATION")
    for model in models:
        size = f"{model.size_bytes / 1e6:.1f} MB"
        print(f"{model.id:32} {model.kind or '?':11} {size:>10}  {model.quantization}")
    return 0


def _port_free(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host.strip("[]") else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError:
            return False
    return True


def _mlx_report() -> list[str]:
    try:
        import mlx.core as mx
    except Exception as exc:  # a broken MLX install is what doctor is for
        return [f"MLX: not importable ({exc})"]
    lines = [f"MLX: {mx.__version__}, default device {mx.default_device()}"]
    if mx.metal.is_available():
        info = mx.metal.device_info()
        lines.append(
            f"Metal: {info.get('device_name', '?')}, {info.get('memory_size', 0) / 1e9:.0f} GB"
        )
    else:
        lines.append("Metal: not available (CPU backend)")
    return lines


def cmd_doctor(config: Config) -> int:
    from conversions.store import ModelMissing, Store
    from engine.audio import find_ffmpeg

    lines = [f"mlxd {__version__}", f"Platform: {platform.platform()} ({platform.machine()})"]
    lines.append(f"Python: {sys.version.split()[0]}")
    lines += _mlx_report()
    lines.append(f"Store: {config.home / 'models'}")
    ok = True
    store = Store(config.home)
    for service in config.only:
        port = config.port(service)
        free = _port_free(config.host, port)
        ok &= free
        lines.append(f"Port {port} ({service}): {'free' if free else 'IN USE'}")
        try:
            model = store.resolve(config.model(service), service)
            lines.append(f"Model for {service}: {model.id} at {model.path}")
        except ModelMissing as exc:
            ok = False
            lines.append(f"Model for {service}: MISSING: {exc}")
    ffmpeg = find_ffmpeg()
    lines.append(f"ffmpeg: {ffmpeg or 'not found (m4a/webm/opus audio needs it)'}")
    print("\n".join(lines))
    return 0 if ok else 1


COMMANDS = {"serve": cmd_serve, "models": cmd_models, "doctor": cmd_doctor}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"mlxd: error: {exc}", file=sys.stderr)
        return 2
    logging.captureWarnings(True)
    return COMMANDS[args.command](config)
