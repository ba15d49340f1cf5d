"""Engine configuration: CLI flags > MLXD_* environment > TOML file > defaults.

One frozen `Config` is built at start-up and passed explicitly; it round-trips through JSON so
the supervisor can hand it to each service process.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.store.catalog import DEFAULT_IDS, SERVICES, Service

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

MiB = 1024 * 1024
CONFIG_ENV = "MLXD_SERVICE_CONFIG"  # a service process's Config as JSON (argv shows in `ps`)
PROBE_AGENT = "mlxd-supervisor"  # User-Agent of the supervisor's /health probe (logged at DEBUG)


class ConfigError(ValueError):
    """A configuration value is missing, malformed or unsafe."""


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    path: bool = False,
    aliases: tuple[str, ...] = (),
    metavar: str | None = None,
) -> Any:
    """A configuration field: its default and help text, from which the `mlxd serve` flag, the
    `MLXD_*` variable, the TOML key, the agent's plist arguments and the README table are made.
    `flag` overrides the flag name (a boolean's flag sets the opposite of its default); `path`
    marks a value that may be a filesystem path (made absolute for the launchd agent);
    `aliases` are former names, still accepted as flag, variable and key; `metavar` names the
    value in the README (else the name's last word)."""
    metadata = {"help": help, "flag": flag, "path": path, "aliases": aliases, "metavar": metavar}
    if callable(default):
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass(frozen=True)
class Config:
    home: Path = setting(lambda: default_home(), "model store and data directory", path=True)
    host: str = setting("127.0.0.1", "address to bind; a non-loopback address needs --api-key")
    chat_port: int = setting(8080, "chat service port")
    embeddings_port: int = setting(8081, "embeddings service port")
    stt_port: int = setting(8082, "speech-to-text service port")
    only: tuple[Service, ...] = setting(SERVICES, "comma-separated services to run")
    chat_model: str = setting(
        DEFAULT_IDS["chat"], "chat model: a store id or a local MLX model directory", path=True
    )
    embeddings_model: str = setting(
        DEFAULT_IDS["embeddings"], "embeddings model: a store id or a local directory", path=True
    )
    stt_model: str = setting(
        DEFAULT_IDS["stt"], "speech-to-text model: a store id or a local directory", path=True
    )
    api_key: str | None = setting(None, "require 'Authorization: Bearer KEY' on all but /health")
    allowed_hosts: tuple[str, ...] = setting((), "extra Host header names to accept")
    cors_origins: tuple[str, ...] = setting((), "origins that get CORS headers ('*': any)")
    strict_model: bool = setting(False, "answer 404 to a request naming another model")
    queue_size: int = setting(64, "requests queued per service before 503 Retry-After")
    chat_max_body_mb: int = setting(64, "largest chat request body, MiB")
    embeddings_max_body_mb: int = setting(16, "largest embeddings request body, MiB")
    stt_max_body_mb: int = setting(512, "largest speech upload, MiB")
    embeddings_max_inputs: int = setting(2048, "inputs per embeddings request")
    embeddings_batch_tokens: int = setting(16384, "tokens per embeddings forward pass")
    embeddings_batching: bool = setting(
        True,
        "batch embeddings requests together (the flag turns it off, for comparison)",
        flag="--embeddings-no-batching",
    )
    embeddings_truncate: bool = setting(False, "truncate over-long inputs instead of a 400")
    stt_language: str = setting("auto", "language when a request names none (auto: detect)")
    stt_time_limit_factor: float = setting(
        0.0, "speech time limit: model seconds per audio second, at least 60 s (0: none)"
    )
    stt_max_audio_seconds: float = setting(
        14400.0,
        "longest audio a speech request may hold, seconds (4 h; read from the file's header "
        "before decoding where it says; 0: no limit)",
        metavar="SECONDS",
    )
    stt_vad: bool = setting(
        False, "voice activity detection by default: only speech reaches Whisper (field: vad)"
    )
    stt_vad_model: str = setting("silero-vad", "the VAD model: store id or directory")
    stt_batch: int = setting(
        8,
        "speech windows decoded together when they do not depend on each other's text "
        "(max_context 0, vad); 1: one window at a time",
        metavar="WINDOWS",
    )
    chat_allow_image_urls: bool = setting(
        False,
        "let chat fetch http(s) image URLs (off: base64 data: URLs only)",
        flag="--allow-image-urls",
    )
    chat_max_images: int = setting(32, "images in one chat request")
    chat_max_image_pixels: int = setting(
        100_000_000, "pixels of all a chat request's images together (each is decoded to RGB)"
    )
    chat_batch: int = setting(
        8,
        "sequences decoded together, one forward pass a step (n counts each)",
        aliases=("chat_parallel",),
    )
    chat_prefill_chunk: int = setting(512, "most prompt tokens read per step beside decoding")
    chat_cache_bytes: int = setting(
        1 << 30, "prefix cache (KV reused across requests), bytes; 0: off"
    )
    chat_kv_tokens: int = setting(
        0, "KV token positions for all replies together; 0: from a quarter of free memory"
    )
    keep_alive: str = setting(
        "forever",
        "unload a model after it idles this long (5m, 30s, 1h; 0: after each request; -1 or "
        "forever: never); the next request reloads it",
        metavar="DURATION",
    )
    chat_keep_alive: str | None = setting(None, "--keep-alive for chat alone", metavar="DURATION")
    embeddings_keep_alive: str | None = setting(
        None, "--keep-alive for embeddings alone", metavar="DURATION"
    )
    stt_keep_alive: str | None = setting(
        None, "--keep-alive for speech-to-text alone", metavar="DURATION"
    )
    mlx_memory_limit: str = setting(
        "auto",
        "MLX memory limit per service, e.g. 16GB (auto: the machine's recommended working set, "
        "3/4 of RAM without Metal); a model whose files exceed it is refused",
    )
    mlx_cache_limit: str = setting(
        "auto", "freed MLX buffers a service keeps for reuse (auto: a quarter of the memory limit)"
    )
    blas: str = setting(
        "auto",
        "BLAS for MLX's CPU backend on Linux: auto (the system's OpenBLAS when present), "
        "bundled (MLX's own) or a library path",
        path=True,
    )
    shutdown_timeout: float = setting(
        10.0, "seconds to finish running work on SIGTERM; what cannot finish is a 503"
    )
    stall_seconds: float = setting(
        300.0,
        "a model thread with work but no progress this long makes /health 503 stalled and is "
        "restarted (0: never)",
    )
    log_level: str = setting("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_file: str | None = setting(
        None, "write the log to this file, rotated by size, instead of stderr", path=True
    )
    log_max_mb: int = setting(10, "size of the log file before it rotates (5 kept), MiB")

    def port(self, service: Service) -> int:
        return getattr(self, f"{service}_port")

    def model(self, service: Service) -> str:
        return getattr(self, f"{service}_model")

    def max_body_bytes(self, service: Service) -> int:
        return getattr(self, f"{service}_max_body_mb") * MiB

    def keep_alive_s(self, service: Service) -> float | None:
        """Seconds a model stays loaded after its last request; None: forever."""
        from engine.keepalive import parse_keep_alive

        return parse_keep_alive(getattr(self, f"{service}_keep_alive") or self.keep_alive)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data["home"] = str(self.home)
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> Config:
        return build_config(json.loads(text))


def default_home() -> Path:
    if env := os.environ.get("MLXD_HOME"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "mlxd"
    xdg = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(xdg) / "mlxd"


def _fields() -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(Config)}


def _split_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(item.strip() for item in value.split(",") if item.strip())
    if isinstance(value, list | tuple):
        return tuple(str(item).strip() for item in value)
    raise ConfigError(f"expected a list or a comma-separated string, got {value!r}")


def _parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off", ""):
        return False
    raise ConfigError(f"expected a boolean, got {value!r}")


def _coerce(name: str, value: Any) -> Any:
    kind = _fields()[name].type
    try:
        if kind.startswith("tuple"):
            return _split_list(value)
        if name == "home":
            return Path(str(value)).expanduser()
        if "bool" in kind:
            return _parse_bool(value)
        if "int" in kind:
            return int(value)
        if "float" in kind:
            return float(value)
        if value is None:
            return None
        return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name}: {exc}") from exc


def build_config(values: dict[str, Any]) -> Config:
    """Build and validate a Config from already-merged key/value pairs (unknown keys refused)."""
    known = _fields()
    values = {_ALIASES.get(key, key): value for key, value in values.items()}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown configuration keys: {', '.join(unknown)}")
    config = Config(**{k: _coerce(k, v) for k, v in values.items() if v is not None})
    validate(config)
    return config


def validate(config: Config) -> None:
    bad = [s for s in config.only if s not in SERVICES]
    if bad or not config.only:
        raise ConfigError(f"--only takes a comma-separated subset of {', '.join(SERVICES)}")
    ports = [config.port(s) for s in config.only]
    for port in ports:
        if not 0 < port < 65536:
            raise ConfigError(f"port {port} is out of range")
    if len(set(ports)) != len(ports):
        raise ConfigError("each service needs its own port")
    for name in (
        "queue_size",
        "embeddings_max_inputs",
        "embeddings_batch_tokens",
        "chat_batch",
        "chat_prefill_chunk",
        "chat_max_images",
        "chat_max_image_pixels",
        "stt_batch",
    ):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    for name in ("chat_cache_bytes", "chat_kv_tokens"):
        if getattr(config, name) < 0:
            raise ConfigError(f"{name} must be 0 or more")
    _validate_stt(config)
    _validate_memory(config)
    _validate_operations(config)
    if config.blas not in ("auto", "bundled") and not Path(config.blas).expanduser().is_file():
        raise ConfigError(f"blas: {config.blas} is not a file (auto, bundled or a library path)")
    if config.host not in LOOPBACK_HOSTS and not config.api_key:
        raise ConfigError(
            f"refusing to listen on non-loopback host {config.host!r} without an API key: "
            "set --api-key or MLXD_API_KEY"
        )


def _validate_stt(config: Config) -> None:
    from engine.languages import language_code

    try:
        language_code(config.stt_language)
    except ValueError as exc:
        raise ConfigError(f"stt_language: {exc}") from None
    if not config.stt_time_limit_factor >= 0:
        raise ConfigError("stt_time_limit_factor must be 0 (no limit) or more")
    if not config.stt_max_audio_seconds >= 0:
        raise ConfigError("stt_max_audio_seconds must be 0 (no limit) or more")


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


def _validate_operations(config: Config) -> None:
    if config.log_level.upper() not in LOG_LEVELS:
        raise ConfigError(
            f"log_level: {config.log_level!r} is not a log level (one of {', '.join(LOG_LEVELS)})"
        )
    if not config.shutdown_timeout >= 0:
        raise ConfigError("shutdown_timeout must be 0 or more seconds")
    if not config.stall_seconds >= 0:
        raise ConfigError("stall_seconds must be 0 (never) or more seconds")
    if config.log_max_mb < 1:
        raise ConfigError("log_max_mb must be at least 1")


def _validate_memory(config: Config) -> None:
    from engine.keepalive import parse_keep_alive
    from engine.memory import parse_size

    for name in ("keep_alive", *(f"{service}_keep_alive" for service in SERVICES)):
        if (value := getattr(config, name)) is not None:
            try:
                parse_keep_alive(value)
            except ValueError as exc:
                raise ConfigError(f"{name}: {exc}") from None
    for name in ("mlx_memory_limit", "mlx_cache_limit"):
        try:
            parse_size(getattr(config, name))
        except ValueError as exc:
            raise ConfigError(f"{name}: {exc}") from None


def read_toml(path: Path) -> dict[str, Any]:
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError as exc:
        raise ConfigError(f"config file not found: {path}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from exc
    return {key.replace("-", "_"): value for key, value in data.items()}


def read_env(environ: dict[str, str]) -> dict[str, Any]:
    values = {}
    for name in [*_ALIASES, *_fields()]:  # the current name wins over a former one
        env_name = f"MLXD_{name.upper()}"
        if env_name in environ:
            values[_ALIASES.get(name, name)] = environ[env_name]
    return values


def load_config(
    flags: dict[str, Any], config_file: str | None, environ: dict[str, str] | None = None
) -> Config:
    """Merge the layers: flags (None means unset) over environment over the TOML file."""
    environ = dict(os.environ) if environ is None else environ
    env_values = read_env(environ)
    path = config_file or environ.get("MLXD_CONFIG")
    if path:
        file_values = read_toml(Path(path).expanduser())
    else:
        home = Path(env_values.get("home") or default_home()).expanduser()
        default_file = home / "config.toml"
        file_values = read_toml(default_file) if default_file.is_file() else {}
    merged = {**file_values, **env_values}
    merged.update({k: v for k, v in flags.items() if v is not None})
    return build_config(merged)


# ---- flags, environment and docs, all made from the Config fields -----------------------------

# Former names of fields, still accepted: alias -> field.
_ALIASES = {
    alias: f.name for f in dataclasses.fields(Config) for alias in f.metadata.get("aliases", ())
}


@dataclass(frozen=True)
class Flag:
    """One `mlxd serve` flag, made from a Config field."""

    name: str  # "--chat-port"
    dest: str  # the Config field
    aliases: tuple[str, ...]  # former flag names
    help: str
    switch: bool  # takes no value: sets `const`
    const: Any
    path: bool

    @property
    def env(self) -> str:
        return f"MLXD_{self.dest.upper()}"

    def default_text(self) -> str:
        if self.dest == "home":
            return "$MLXD_HOME, else the platform's data dir"
        default = _fields()[self.dest].default
        if isinstance(default, tuple):
            return ",".join(default) or "none"
        return "none" if default is None else str(default).lower() if self.switch else str(default)


def serve_flags() -> list[Flag]:
    flags = []
    for f in dataclasses.fields(Config):
        switch = "bool" in str(f.type)
        name = f.metadata.get("flag") or "--" + f.name.replace("_", "-")
        const = (not f.default) if switch else None
        aliases = tuple("--" + a.replace("_", "-") for a in f.metadata["aliases"])
        help_text, path = f.metadata["help"], f.metadata["path"]
        flags.append(Flag(name, f.name, aliases, help_text, switch, const, path))
    return flags


def add_serve_flags(parser: Any) -> None:
    """Add every serve flag to an argparse parser (values default to None: unset)."""
    for flag in serve_flags():
        help_text = f"{flag.help} (default: {flag.default_text()}; env {flag.env})"
        names = (flag.name, *flag.aliases)
        if flag.switch:
            parser.add_argument(
                *names, dest=flag.dest, action="store_const", const=flag.const, help=help_text
            )
        else:
            parser.add_argument(*names, dest=flag.dest, default=None, help=help_text)


def serve_args(values: dict[str, Any], absolute: Callable[[str], str]) -> list[str]:
    """The serve flags that reproduce `values` (parsed flags; None: unset); `absolute` maps a
    value of a path-like field (a directory, or a store id left as it is)."""
    out: list[str] = []
    for flag in serve_flags():
        value = values.get(flag.dest)
        if value is None:
            continue
        if flag.switch:
            out.append(flag.name)
        else:
            text = ",".join(value) if isinstance(value, list | tuple) else str(value)
            out += [flag.name, absolute(text) if flag.path else text]
    return out


def flags_markdown() -> str:
    """The README's table of serve flags."""
    rows = ["| flag | environment | default | what it does |", "|---|---|---|---|"]
    for flag in serve_flags():
        metavar = _fields()[flag.dest].metadata["metavar"] or flag.dest.split("_")[-1].upper()
        value = "" if flag.switch else f" {metavar}"
        also = f" (also `{'`, `'.join(flag.aliases)}`)" if flag.aliases else ""
        rows.append(
            f"| `{flag.name}{value}` | `{flag.env}` | {flag.default_text()} | {flag.help}{also} |"
        )
    return "\n".join(rows)
