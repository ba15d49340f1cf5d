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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

Service = Literal["chat", "embeddings", "stt"]
SERVICES: tuple[Service, ...] = get_args(Service)

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})

MiB = 1024 * 1024


class ConfigError(ValueError):
    """A configuration value is missing, malformed or unsafe."""


@dataclass(frozen=True)
class Config:
    host: str = "127.0.0.1"
    chat_port: int = 8080
    embeddings_port: int = 8081
    stt_port: int = 8082
    only: tuple[Service, ...] = SERVICES
    chat_model: str = "gemma-4-e4b"
    embeddings_model: str = "bge-base-zh"
    stt_model: str = "whisper-large-v3-turbo"
    home: Path = field(default_factory=lambda: default_home())
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = ()
    cors_origins: tuple[str, ...] = ()
    strict_model: bool = False
    queue_size: int = 64
    chat_max_body_mb: int = 64
    embeddings_max_body_mb: int = 16
    stt_max_body_mb: int = 512
    embeddings_max_inputs: int = 2048
    embeddings_batch_tokens: int = 16384
    embeddings_batching: bool = True
    embeddings_truncate: bool = False
    stt_language: str = "auto"
    stt_time_limit_factor: float = 3.0
    chat_allow_image_urls: bool = False
    chat_parallel: int = 4
    shutdown_timeout: float = 10.0
    log_level: str = "INFO"

    def port(self, service: Service) -> int:
        return getattr(self, f"{service}_port")

    def model(self, service: Service) -> str:
        return getattr(self, f"{service}_model")

    def max_body_bytes(self, service: Service) -> int:
        return getattr(self, f"{service}_max_body_mb") * MiB

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
        if name in ("only", "allowed_hosts", "cors_origins"):
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
    for name in ("queue_size", "embeddings_max_inputs", "embeddings_batch_tokens", "chat_parallel"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name} must be at least 1")
    _validate_stt(config)
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
    for name in _fields():
        env_name = f"MLXD_{name.upper()}"
        if env_name in environ:
            values[name] = environ[env_name]
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
