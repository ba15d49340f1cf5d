"""`mlxd agent install|uninstall|status|logs`: run `mlxd serve` as a launchd user agent.

For users who do not use `brew services`. The template in `launchd/` is rendered with absolute
paths (launchd expands neither `~` nor `$HOME`) into `~/Library/LaunchAgents/`, then loaded into
the user's GUI domain with `launchctl bootstrap gui/$UID` (`kickstart -k` restarts an unchanged
agent, `bootout` unloads one). `launchctl` is whatever is on PATH, so tests can record the calls.
"""

from __future__ import annotations

import argparse
import math
import os
import plistlib
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from engine.config import (
    Config,
    ConfigError,
    add_serve_flags,
    build_config,
    load_config,
    serve_args,
)

LABEL = "dev.mlxd.serve"
BREW_LABEL = "homebrew.mxcl.mlxd"
TEMPLATE_NAME = f"{LABEL}.plist"
EXIT_TIMEOUT_MARGIN = 10  # seconds above the shutdown timeout before launchd sends SIGKILL
SYSTEM_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
TOKENS = ("@MLXD@", "@LOGS@", "@MLXD_HOME@", "@PATH@")
# Flags whose values are secrets: passed in the plist's environment (the plist is 0600), never in
# ProgramArguments, which every local user sees in `ps`.
SECRET_FLAGS = {"api_key": "MLXD_API_KEY"}
PRIVATE_MODE = 0o600
ELSEWHERE = (
    "the launchd agent is macOS-only. Elsewhere run `mlxd serve`, which logs to stderr, or run "
    "it as a systemd user service (docs/linux.md has the unit file), whose log is "
    "`journalctl --user -u mlxd`"
)


class AgentError(Exception):
    """Something `mlxd agent` cannot do; the message says why and what to do."""


@dataclass(frozen=True)
class Paths:
    """Where the agent's files live for one user (absolute)."""

    home: Path

    @property
    def plist(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / TEMPLATE_NAME

    @property
    def brew_plist(self) -> Path:
        return self.home / "Library" / "LaunchAgents" / f"{BREW_LABEL}.plist"

    @property
    def logs(self) -> Path:
        return self.home / "Library" / "Logs" / "mlxd"

    @property
    def log_file(self) -> Path:
        return self.logs / "mlxd.log"


# -- rendering -------------------------------------------------------------------------------


def template_path() -> Path:
    """The plist template: in a source checkout, or where the Homebrew formula installs it."""
    candidates = [
        Path(__file__).resolve().parent.parent / "launchd" / TEMPLATE_NAME,
        Path(sys.prefix).parent / "share" / "mlxd" / "launchd" / TEMPLATE_NAME,
        Path(sys.prefix) / "share" / "mlxd" / "launchd" / TEMPLATE_NAME,
    ]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise AgentError(
        f"the launchd template {TEMPLATE_NAME} is not installed (looked in "
        + ", ".join(str(c.parent) for c in candidates)
        + ")"
    )


def homebrew_bin() -> str:
    prefix = os.environ.get("HOMEBREW_PREFIX")
    if not prefix and (brew := shutil.which("brew")):
        prefix = str(Path(brew).parent.parent)
    return str(Path(prefix or "/opt/homebrew") / "bin")


def default_path_env() -> str:
    """PATH for the agent: Homebrew's bin first (ffmpeg), then the system directories."""
    return f"{homebrew_bin()}:{SYSTEM_PATH}"


def mlxd_command() -> list[str]:
    """An absolute command that runs mlxd (symlinks kept, so upgrades keep working)."""
    invoked = Path(sys.argv[0])
    if invoked.name == "mlxd" and invoked.is_file():
        return [str(invoked.absolute())]
    beside = Path(sys.executable).parent / "mlxd"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside.absolute())]
    if found := shutil.which("mlxd"):
        return [str(Path(found).absolute())]
    return [str(Path(sys.executable).absolute()), "-m", "engine"]


def exit_timeout(shutdown_timeout: float) -> int:
    return math.ceil(shutdown_timeout) + EXIT_TIMEOUT_MARGIN


def _substitute(value: Any, tokens: dict[str, str]) -> Any:
    if isinstance(value, str):
        for token, replacement in tokens.items():
            value = value.replace(token, replacement)
        return value
    if isinstance(value, list):
        return [_substitute(item, tokens) for item in value]
    if isinstance(value, dict):
        return {key: _substitute(item, tokens) for key, item in value.items()}
    return value


def render_plist(
    command: list[str],
    serve_args: list[str],
    *,
    user_home: Path,
    mlxd_home: Path,
    shutdown_timeout: float,
    path_env: str | None = None,
    template: Path | None = None,
    secrets: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The agent's plist as a dict: tokens replaced, the command and flags, the exit timeout,
    and `secrets` (environment variables) in its environment."""
    with (template or template_path()).open("rb") as stream:
        plist = plistlib.load(stream)
    tokens = {
        "@LOGS@": str(Paths(user_home).logs),
        "@MLXD_HOME@": str(mlxd_home),
        "@PATH@": path_env or default_path_env(),
    }
    plist = _substitute(plist, tokens)
    program = plist["ProgramArguments"]
    plist["ProgramArguments"] = [*command, *program[1:], *serve_args]
    plist["ExitTimeOut"] = exit_timeout(shutdown_timeout)
    plist["EnvironmentVariables"].update(secrets or {})
    check_plist(plist)
    return plist


def check_plist(plist: dict[str, Any]) -> None:
    """Refuse a plist launchd would misread: relative paths, `~`, `$VAR` or tokens left over."""
    paths = [
        plist["ProgramArguments"][0],
        plist["StandardOutPath"],
        plist["StandardErrorPath"],
        plist["EnvironmentVariables"]["MLXD_HOME"],
    ]
    for path in paths:
        if not Path(path).is_absolute() or "~" in path or "$" in path:
            raise AgentError(f"launchd needs absolute paths, got {path!r}")
    leftover = [s for s in _strings(plist) if any(token in s for token in TOKENS)]
    if leftover:
        raise AgentError(f"unrendered template tokens in {leftover}")


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    if isinstance(value, dict):
        return [s for item in value.values() for s in _strings(item)]
    return []


def plist_bytes(plist: dict[str, Any]) -> bytes:
    return plistlib.dumps(plist, fmt=plistlib.FMT_XML)


def write_private(path: Path, data: bytes) -> None:
    """Write a file only its owner can read (mode 0600), atomically: it may hold a secret."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.unlink(missing_ok=True)
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_MODE)
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.replace(temporary, path)


# -- serve flags -----------------------------------------------------------------------------


def _absolute_if_path(value: str) -> str:
    """A directory made absolute (launchd has no working directory); a store id kept."""
    looks_like_path = value.startswith(("/", "~", ".")) or os.sep in value
    return str(Path(value).expanduser().absolute()) if looks_like_path else value


def serve_args_from(args: argparse.Namespace) -> list[str]:
    """The `mlxd serve` flags given to `mlxd agent install`, paths made absolute."""
    config_file = getattr(args, "config", None)
    out = ["--config", str(Path(config_file).expanduser().absolute())] if config_file else []
    values = {key: value for key, value in vars(args).items() if key not in SECRET_FLAGS}
    if values.get("home"):
        values["home"] = str(Path(values["home"]).expanduser().absolute())
    return out + serve_args(values, _absolute_if_path)


def secrets_from(args: argparse.Namespace) -> dict[str, str]:
    """The secret flags given to `mlxd agent install`, as the environment variables they set."""
    return {
        variable: str(value)
        for dest, variable in SECRET_FLAGS.items()
        if (value := getattr(args, dest, None)) is not None
    }


def config_from(args: argparse.Namespace) -> Config:
    fields = set(Config.__dataclass_fields__)
    flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    if flags.get("home"):
        flags["home"] = str(Path(flags["home"]).expanduser().absolute())
    return load_config(flags, getattr(args, "config", None))


# -- launchctl -------------------------------------------------------------------------------


def domain() -> str:
    return f"gui/{os.getuid()}"


def launchctl(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("launchctl")
    if binary is None:
        raise AgentError("launchctl not found: `mlxd agent` manages a macOS launchd agent")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def _checked(*args: str) -> subprocess.CompletedProcess:
    result = launchctl(*args)
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip()
        raise AgentError(f"`launchctl {' '.join(args)}` failed ({result.returncode}): {detail}")
    return result


def loaded(label: str) -> subprocess.CompletedProcess | None:
    """`launchctl print` of the service when it is loaded, else None."""
    result = launchctl("print", f"{domain()}/{label}")
    return result if result.returncode == 0 else None


# -- brew services conflict ------------------------------------------------------------------


def ports_of(config: Config) -> set[int]:
    return {config.port(service) for service in config.only}


def config_of_plist(path: Path) -> Config:
    """The configuration an installed agent runs with (its flags and environment)."""
    try:
        with path.open("rb") as stream:
            plist = plistlib.load(stream)
        program = [str(a) for a in plist.get("ProgramArguments", [])]
        serve_at = program.index("serve")
        args = _serve_parser().parse_args(program[serve_at + 1 :])
        environ = {str(k): str(v) for k, v in plist.get("EnvironmentVariables", {}).items()}
        fields = set(Config.__dataclass_fields__)
        flags = {k: v for k, v in vars(args).items() if k in fields and v is not None}
        return load_config(flags, args.config, environ)
    except (OSError, ValueError, ConfigError, SystemExit, plistlib.InvalidFileException):
        return build_config({})


def _serve_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlxd serve", add_help=False)
    parser.add_argument("--config")
    add_serve_flags(parser)
    return parser


def refuse_beside_brew(paths: Paths, config: Config) -> None:
    """Refuse to install while `brew services` runs mlxd on any of the same ports."""
    if loaded(BREW_LABEL) is None:
        return
    brew = config_of_plist(paths.brew_plist)
    shared = sorted(ports_of(brew) & ports_of(config))
    if shared:
        raise AgentError(
            f"`brew services` already runs mlxd ({BREW_LABEL}) on port(s) "
            f"{', '.join(map(str, shared))}; two agents would fight over them. Use one of the two: "
            "`brew services stop mlxd`, then `mlxd agent install` again, or keep brew services "
            "and pass other ports (--chat-port, --embeddings-port, --stt-port)"
        )


# -- commands --------------------------------------------------------------------------------


def install(args: argparse.Namespace, paths: Paths) -> int:
    config = config_from(args)
    refuse_beside_brew(paths, config)
    plist = render_plist(
        mlxd_command(),
        serve_args_from(args),
        user_home=paths.home,
        mlxd_home=config.home.expanduser().absolute(),
        shutdown_timeout=config.shutdown_timeout,
        secrets=secrets_from(args),
    )
    data = plist_bytes(plist)
    unchanged = paths.plist.is_file() and paths.plist.read_bytes() == data
    paths.plist.parent.mkdir(parents=True, exist_ok=True)
    paths.logs.mkdir(parents=True, exist_ok=True)
    target = f"{domain()}/{LABEL}"
    is_loaded = loaded(LABEL) is not None
    if is_loaded and unchanged:
        paths.plist.chmod(PRIVATE_MODE)
        _checked("kickstart", "-k", target)
        print(f"Restarted {LABEL} ({paths.plist} unchanged)")
    else:
        if is_loaded:
            _checked("bootout", target)
        write_private(paths.plist, data)
        _checked("bootstrap", domain(), str(paths.plist))
        print(f"Installed {LABEL}: {paths.plist}")
    print(f"mlxd starts at login and restarts after a crash; logs: {paths.log_file}")
    return 0


def uninstall(args: argparse.Namespace, paths: Paths) -> int:
    was_loaded = loaded(LABEL) is not None
    if was_loaded:
        _checked("bootout", f"{domain()}/{LABEL}")
    if paths.plist.exists():
        paths.plist.unlink()
    elif not was_loaded:
        print(f"{LABEL} is not installed")
        return 0
    print(f"Removed {LABEL} (logs kept in {paths.logs})")
    return 0


def _print_fields(text: str) -> dict[str, str]:
    fields = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(" = ")
        if sep and key in ("state", "pid", "last exit code") and key not in fields:
            fields[key] = value.strip()
    return fields


def status(args: argparse.Namespace, paths: Paths) -> int:
    printed = loaded(LABEL)
    print(f"plist: {paths.plist}{'' if paths.plist.is_file() else ' (not installed)'}")
    print(f"logs: {paths.log_file}")
    if printed is None:
        print(f"{LABEL}: not loaded")
        return 1
    fields = _print_fields(printed.stdout)
    print(f"{LABEL}: " + ", ".join(f"{k} {v}" for k, v in fields.items()))
    if paths.plist.is_file():
        _print_health(config_of_plist(paths.plist))
    return 0


def _print_health(config: Config) -> None:
    import urllib.error
    import urllib.request

    for service in config.only:
        url = f"http://127.0.0.1:{config.port(service)}/health"
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                answer = f"{response.status} {response.read().decode(errors='replace')}"
        except urllib.error.HTTPError as exc:
            answer = f"{exc.code} {exc.read().decode(errors='replace')}"
        except OSError as exc:
            answer = f"no answer ({exc})"
        print(f"{service} {url}: {answer.strip()}")


def logs(args: argparse.Namespace, paths: Paths) -> int:
    if not paths.log_file.is_file():
        print(f"no log yet at {paths.log_file}", file=sys.stderr)
        return 1
    if args.follow:
        tail = shutil.which("tail") or "tail"
        os.execv(tail, [tail, "-n", str(args.lines), "-F", str(paths.log_file)])
    lines = paths.log_file.read_text(errors="replace").splitlines()
    for line in lines[-args.lines :] if args.lines > 0 else []:
        print(line)
    return 0


ACTIONS = {"install": install, "uninstall": uninstall, "status": status, "logs": logs}


def without_launchd() -> bool:
    """Not macOS and no `launchctl` on PATH (the tests put a recording one there)."""
    return sys.platform != "darwin" and shutil.which("launchctl") is None


def main(args: argparse.Namespace) -> int:
    """Run `mlxd agent ACTION`; errors are explained on stderr with exit status 1 (2: config,
    or a platform without launchd)."""
    if without_launchd():
        print(f"mlxd agent: {ELSEWHERE}", file=sys.stderr)
        return 2
    paths = Paths(Path.home())
    try:
        return ACTIONS[args.agent_action](args, paths)
    except ConfigError as exc:
        print(f"mlxd agent: error: {exc}", file=sys.stderr)
        return 2
    except AgentError as exc:
        print(f"mlxd agent {args.agent_action}: error: {exc}", file=sys.stderr)
        return 1
