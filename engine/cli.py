"""The `mlxd` command: serve, models, doctor."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from engine import __version__, bench
from engine.config import Config, ConfigError, add_serve_flags, load_config
from engine.store.catalog import CATALOG, DEFAULT_QUANTIZATION, GPU_DTYPE, KINDS, SERVICES


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default unless unset or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default in (None, False, argparse.SUPPRESS)
        if unset or "default" in text or action.option_strings == []:
            return text
        return f"{text} (default: %(default)s)"

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text:  # a table, as written (pull's known ids)
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def _add_command(
    commands: argparse._SubParsersAction, name: str, text: str, **kwargs: Any
) -> argparse.ArgumentParser:
    return commands.add_parser(
        name,
        help=text,
        description=kwargs.pop("description", text),
        formatter_class=HelpFormatter,
        **kwargs,
    )


def _add_config_flags(parser: argparse.ArgumentParser, serve: bool) -> None:
    parser.add_argument(
        "--config",
        help="TOML configuration file (default: $MLXD_HOME/config.toml; env MLXD_CONFIG)",
    )
    if serve:
        add_serve_flags(parser)
    else:
        parser.add_argument(
            "--home",
            help="model store and data directory (default: $MLXD_HOME, else the platform's data "
            "dir; env MLXD_HOME)",
        )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mlxd",
        description="Local OpenAI-style chat, embeddings and speech-to-text on MLX.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mlxd {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    serve = _add_command(commands, "serve", "run the services in the foreground")
    _add_config_flags(serve, serve=True)
    models = _add_command(commands, "models", "list the models in the store")
    _add_config_flags(models, serve=False)
    doctor = _add_command(commands, "doctor", "check the platform, ports and models")
    _add_config_flags(doctor, serve=True)
    ps = _add_command(commands, "ps", "show each service's model, state, memory and idle time")
    _add_config_flags(ps, serve=True)
    ps.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench_command = _add_command(commands, "bench", "measure a running server's speed")
    _add_config_flags(bench_command, serve=True)
    bench.add_arguments(bench_command)
    _add_model_commands(commands)
    _add_agent_command(commands)
    return parser


def _add_conversion_flags(parser: argparse.ArgumentParser) -> None:
    bits = ", ".join(f"{kind} {DEFAULT_QUANTIZATION[kind] or 0}" for kind in SERVICES)
    dtypes = ", ".join(f"{kind} {GPU_DTYPE[kind]}" for kind in SERVICES)
    parser.add_argument(
        "-q",
        "--quantize",
        type=int,
        choices=(0, 4, 8),
        help=f"bits, 0: none (default: the catalog entry's, else by kind: {bits})",
    )
    parser.add_argument("--group-size", type=int, default=64, help="quantization group size")
    parser.add_argument(
        "--dtype",
        choices=("float16", "bfloat16", "float32"),
        help=(
            "float dtype (default: float32 where MLX runs on the CPU, e.g. Linux without CUDA: "
            "half types are several times slower there; on a GPU the catalog entry's, else by "
            f"kind: {dtypes})"
        ),
    )
    parser.add_argument("--force", action="store_true", help="replace an installed model")


def _catalog_text() -> str:
    rows = [f"  {entry.id:24} {entry.kind:11} {entry.repo}" for entry in CATALOG.values()]
    return "known model ids:\n" + "\n".join(rows)


def _add_model_commands(commands: argparse._SubParsersAction) -> None:
    pull = _add_command(
        commands,
        "pull",
        "download, convert and install a model",
        epilog=_catalog_text(),
    )
    pull.add_argument(
        "model", metavar="ID", help="a known id (listed below) or a hub repo ORG/NAME"
    )
    pull.add_argument(
        "--kind",
        choices=KINDS,
        help="the service that will serve it (default: the known id's; needed for ORG/NAME)",
    )
    pull.add_argument("--revision", help="branch, tag or commit to download (default: main)")
    pull.add_argument(
        "--as",
        dest="as_id",
        metavar="ID",
        help="store id (default: the known id, else the repo name)",
    )
    _add_conversion_flags(pull)
    convert = _add_command(commands, "convert", "convert a local checkpoint into the store")
    convert.add_argument(
        "kind", choices=KINDS, help="the service that will serve it (vad: speech's detector)"
    )
    convert.add_argument("source", help="HF directory, GGUF file or CTranslate2 directory")
    convert.add_argument("--as", dest="as_id", metavar="ID", required=True, help="store id")
    _add_conversion_flags(convert)
    for name, text in (("rm", "remove an installed model"), ("verify", "check model files")):
        sub = _add_command(commands, name, text)
        sub.add_argument("model", metavar="ID")
    for sub in (pull, convert, commands.choices["rm"], commands.choices["verify"]):
        _add_config_flags(sub, serve=False)


def _add_agent_command(commands: argparse._SubParsersAction) -> None:
    agent = _add_command(
        commands,
        "agent",
        "run mlxd at login as a launchd user agent (macOS only)",
        description="Run mlxd at login as a launchd user agent. macOS only: on Linux run "
        "`mlxd serve` (it logs to stderr) or a systemd user service (docs/linux.md; logs: "
        "`journalctl --user -u mlxd`).",
    )
    actions = agent.add_subparsers(dest="agent_action", metavar="ACTION", required=True)
    install = _add_command(actions, "install", "write ~/Library/LaunchAgents plist and start it")
    _add_config_flags(install, serve=True)
    _add_command(actions, "uninstall", "stop the agent and remove its plist")
    _add_command(actions, "status", "show whether the agent runs, and each service's /health")
    logs = _add_command(actions, "logs", "print the agent's log (~/Library/Logs/mlxd/mlxd.log)")
    logs.add_argument("-n", "--lines", type=int, default=100, help="lines to show")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")


COMMAND_ARGS = frozenset(
    {"command", "config", "model", "kind", "revision", "as_id", "source", "quantize"}
    | {"group_size", "dtype", "force"}
    | bench.ARGUMENTS
    | {"json"}
)


def config_from_args(args: argparse.Namespace) -> Config:
    flags = {
        key: value
        for key, value in vars(args).items()
        if key not in COMMAND_ARGS and value is not None
    }
    return load_config(flags, args.config)


def cmd_serve(config: Config) -> int:
    from engine.supervisor import serve
    from engine.worker import setup_logging

    log = setup_logging(config.log_level, "mlxd", config.log_file, config.log_max_mb)
    return serve(config, log)


def cmd_models(config: Config) -> int:
    from engine.store import Store

    models = Store(config.home).list()
    if not models:
        print(f"No models in {config.home / 'models'}. Install one with `mlxd pull ID`.")
        return 0
    print(f"{'ID':32} {'KIND':11} {'SIZE':>10}  {'DTYPE':9} QUANTIZATION")
    for model in models:
        size = f"{model.size_bytes / 1e6:.1f} MB"
        kind = model.kind or "?"
        print(f"{model.id:32} {kind:11} {size:>10}  {model.dtype:9} {model.quantization}")
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


def _probe_blas(env: dict[str, str]) -> dict[str, Any]:
    """What `python -m engine.blas` measures in a process started with `env`."""
    done = subprocess.run(
        [sys.executable, "-m", "engine.blas"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"blas": f"probe failed: {tail}", "gflops": 0.0}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _blas_report(config: Config) -> list[str]:
    """Linux: the BLAS the services load (and its speed, beside MLX's bundled one), and the
    BLAS each running service process of this configuration has loaded."""
    from engine import blas

    if not sys.platform.startswith("linux"):
        return []
    served = _probe_blas(blas.worker_environment(os.environ, config.blas))
    lines = [
        f"BLAS for the services (--blas {config.blas}): {served['blas']}; float32 "
        f"{blas.MATMUL_SIZE}x{blas.MATMUL_SIZE} matmul {served['gflops']:.1f} GFLOP/s"
    ]
    if config.blas != blas.BUNDLED:
        bundled = _probe_blas(blas.worker_environment(os.environ, blas.BUNDLED))
        lines.append(f"  MLX's bundled BLAS for comparison: {bundled['gflops']:.1f} GFLOP/s")
    if config.blas == blas.AUTO and blas.find_openblas() is None:
        lines.append(
            "  no system OpenBLAS found: `apt install libopenblas0-pthread` (Debian, Ubuntu) or "
            "`dnf install openblas` (Fedora) makes float32 matmuls about 10x faster"
        )
    for worker in blas.running_workers():
        if worker.port == config.port(worker.service):
            lines.append(
                f"Running {worker.service} service on port {worker.port} "
                f"(pid {worker.pid}): {worker.blas}"
            )
    return lines


def cmd_doctor(config: Config) -> int:
    from engine.audio import find_ffmpeg
    from engine.store import ModelMissing, Store

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
    lines += _blas_report(config)
    print("\n".join(lines))
    return 0 if ok else 1


def _options(args: argparse.Namespace, kind: str, entry=None) -> Any:
    from conversions.install import ConvertOptions
    from engine.store.catalog import default_dtype

    bits = (
        args.quantize
        if args.quantize is not None
        else (entry.quantization if entry else DEFAULT_QUANTIZATION[kind])
    )
    dtype = args.dtype or default_dtype(kind, entry)
    return ConvertOptions(quantization=bits or None, group_size=args.group_size, dtype=dtype)


def cmd_pull(config: Config, args: argparse.Namespace) -> int:
    from conversions.hub import download
    from conversions.install import install
    from engine.services import smoke_test
    from engine.store import Store
    from engine.store.catalog import CATALOG

    entry = CATALOG.get(args.model)
    if entry is None and "/" not in args.model:
        known = ", ".join(CATALOG)
        raise CommandError(f"unknown model id {args.model!r}: use one of {known}, or ORG/NAME")
    kind = args.kind or (entry.kind if entry else None)
    if kind is None:
        raise CommandError(f"{args.model} is not in the catalog: say what serves it with --kind")
    repo = entry.repo if entry else args.model
    model_id = args.as_id or (entry.id if entry else repo.split("/")[-1].lower())
    store = Store(config.home)
    _refuse_existing(store, model_id, args.force)
    if kind == "vad":
        from conversions.silero import packaged

        fetched, origin_type = packaged(repo), "pypi"
    else:
        fetched, origin_type = download(repo, args.revision, kind), "huggingface"
    source = {"type": origin_type, "repo": repo, "revision": fetched.revision}
    info = install(
        store,
        model_id,
        kind,
        fetched.path,
        source_info=source,
        options=_options(args, kind, entry),
        smoke_test=smoke_test(kind),
        force=args.force,
    )
    origin = f"{repo}@{fetched.revision[:12]}"
    print(f"Installed {info.id} ({_summary(info)}) from {origin} in {info.path}")
    return 0


def cmd_convert(config: Config, args: argparse.Namespace) -> int:
    from conversions.install import install, source_sha256
    from engine.services import smoke_test
    from engine.store import Store

    source = Path(args.source).expanduser().resolve()
    if not source.exists():
        raise CommandError(f"source {args.source} does not exist")
    store = Store(config.home)
    _refuse_existing(store, args.as_id, args.force)
    info_source = {"type": "local", "path": str(source), "sha256": source_sha256(source)}
    info = install(
        store,
        args.as_id,
        args.kind,
        source,
        source_info=info_source,
        options=_options(args, args.kind),
        smoke_test=smoke_test(args.kind),
        force=args.force,
    )
    print(f"Installed {info.id} ({_summary(info)}) from {source} in {info.path}")
    return 0


def _summary(info: Any) -> str:
    """The kind, the quantization if any and the float dtype: "chat, 8-bit, float32"."""
    quant = (info.manifest or {}).get("quantization")
    bits = [f"{quant['bits']}-bit"] if quant else []
    return ", ".join([info.kind or "?", *bits, info.dtype])


def _refuse_existing(store: Any, model_id: str, force: bool) -> None:
    if store.path(model_id).exists() and not force:
        raise CommandError(f"model {model_id!r} is already installed; pass --force to replace it")


def cmd_rm(config: Config, args: argparse.Namespace) -> int:
    from conversions.install import remove
    from engine.store import Store

    print(f"Removed {remove(Store(config.home), args.model)}")
    return 0


def cmd_verify(config: Config, args: argparse.Namespace) -> int:
    from engine.store import ModelMissing, Store
    from engine.store.manifest import verify

    directory = Store(config.home).path(args.model)
    if not directory.is_dir():
        raise ModelMissing(f"model {args.model!r} is not installed")
    problems = verify(directory)
    for problem in problems:
        print(problem)
    print(f"{args.model}: {'FAILED' if problems else 'OK'}")
    return 1 if problems else 0


class CommandError(Exception):
    """A usage problem the command explains."""


COMMANDS = {"serve": cmd_serve, "models": cmd_models, "doctor": cmd_doctor}
MODEL_COMMANDS = {"pull": cmd_pull, "convert": cmd_convert, "rm": cmd_rm, "verify": cmd_verify}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "agent":
        from engine.agent import main as agent_main

        return agent_main(args)
    try:
        config = config_from_args(args)
    except ConfigError as exc:
        print(f"mlxd: error: {exc}", file=sys.stderr)
        return 2
    logging.captureWarnings(True)
    if args.command == "ps":
        from engine.ps import cmd_ps

        return cmd_ps(config, args.json)
    if args.command == "bench":
        return bench.run(config, args)
    if args.command in COMMANDS:
        return COMMANDS[args.command](config)
    from conversions.common import ConversionError
    from engine.store import ModelMissing, StoreError

    try:
        return MODEL_COMMANDS[args.command](config, args)
    except (CommandError, ConversionError, ModelMissing, StoreError) as exc:
        print(f"mlxd {args.command}: error: {exc}", file=sys.stderr)
        return 1
