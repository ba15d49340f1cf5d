"""`mlxd agent`: the launchd plist it renders and the launchctl calls it makes (a fake on PATH)."""

from __future__ import annotations

import json
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from engine.agent import (
    BREW_LABEL,
    LABEL,
    AgentError,
    Paths,
    config_of_plist,
    plist_bytes,
    render_plist,
    template_path,
)

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "launchd" / f"{LABEL}.plist"
UID = os.getuid()

FAKE_LAUNCHCTL = """\
#!{python}
# Records every call; keeps which labels are loaded in a JSON state file, as launchd would.
import json, os, plistlib, sys

state_path = os.environ["FAKE_LAUNCHCTL_STATE"]
with open(os.environ["FAKE_LAUNCHCTL_LOG"], "a") as log:
    log.write(json.dumps(sys.argv[1:]) + "\\n")
state = json.load(open(state_path)) if os.path.exists(state_path) else []
command, args = sys.argv[1], sys.argv[2:]
if command == "print":
    label = args[0].rsplit("/", 1)[1]
    if label not in state:
        print("Could not find service", file=sys.stderr)
        sys.exit(113)
    print(args[0] + " = {{\\n\\tstate = running\\n\\tpid = 4242\\n\\tlast exit code = 0\\n}}")
elif command == "bootstrap":
    with open(args[1], "rb") as stream:
        state.append(plistlib.load(stream)["Label"])
elif command == "bootout":
    state.remove(args[0].rsplit("/", 1)[1])
json.dump(state, open(state_path, "w"))
"""


def render(tmp_path: Path, **overrides) -> dict:
    options = {
        "user_home": tmp_path / "home",
        "mlxd_home": tmp_path / "home" / "store",
        "shutdown_timeout": 10.0,
        "path_env": "/opt/homebrew/bin:/usr/bin:/bin",
    }
    options.update(overrides)
    return render_plist(["/opt/homebrew/bin/mlxd"], ["--chat-port", "9090"], **options)


def test_template_is_a_valid_plist_with_every_key() -> None:
    assert template_path() == TEMPLATE
    with TEMPLATE.open("rb") as stream:
        template = plistlib.load(stream)
    assert template["Label"] == LABEL
    assert template["ProgramArguments"][1:] == ["serve", "--log-file", "@LOGS@/mlxd.log"]
    assert template["ProcessType"] == "Interactive"
    assert template["KeepAlive"] == {"SuccessfulExit": False}


def test_rendered_plist_has_absolute_paths_and_the_right_types(tmp_path: Path) -> None:
    plist = plistlib.loads(plist_bytes(render(tmp_path)))
    home = tmp_path / "home"
    log_file = str(home / "Library" / "Logs" / "mlxd" / "mlxd.log")
    assert plist["Label"] == LABEL
    assert plist["ProgramArguments"] == [
        "/opt/homebrew/bin/mlxd",
        *("serve", "--log-file", log_file, "--chat-port", "9090"),
    ]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restart on crash, not clean exit
    assert type(plist["ThrottleInterval"]) is int and plist["ThrottleInterval"] >= 5
    assert plist["ProcessType"] == "Interactive"
    assert type(plist["ExitTimeOut"]) is int and plist["ExitTimeOut"] > 10 + 3
    logs = home / "Library" / "Logs" / "mlxd"
    assert Path(plist["StandardOutPath"]).parent == logs
    assert Path(plist["StandardErrorPath"]).parent == logs
    environment = plist["EnvironmentVariables"]
    assert environment == {
        "PATH": "/opt/homebrew/bin:/usr/bin:/bin",
        "MLXD_HOME": str(home / "store"),
        "PYTHONUNBUFFERED": "1",
    }
    text = plist_bytes(plist).decode()
    assert "~" not in text and "$" not in text and "@" not in text


def test_exit_timeout_stays_above_the_shutdown_timeout(tmp_path: Path) -> None:
    assert render(tmp_path, shutdown_timeout=45.5)["ExitTimeOut"] >= 45.5 + 3 + 5


def test_default_path_starts_with_homebrew_bin(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOMEBREW_PREFIX", "/usr/local")
    plist = render(tmp_path, path_env=None)
    assert plist["EnvironmentVariables"]["PATH"].split(":")[:2] == ["/usr/local/bin", "/usr/bin"]


def test_relative_paths_are_refused(tmp_path: Path) -> None:
    with pytest.raises(AgentError, match="absolute"):
        render(tmp_path, mlxd_home=Path("store"))
    with pytest.raises(AgentError, match="absolute"):
        render_plist(["mlxd"], [], user_home=tmp_path, mlxd_home=tmp_path, shutdown_timeout=1)


# -- the command, with a recording launchctl ---------------------------------------------------


class Fake:
    def __init__(self, tmp_path: Path) -> None:
        self.home = tmp_path / "home"
        self.home.mkdir()
        self.bin = tmp_path / "bin"
        self.bin.mkdir()
        self.log = tmp_path / "launchctl.log"
        self.state = tmp_path / "launchctl.json"
        script = self.bin / "launchctl"
        script.write_text(FAKE_LAUNCHCTL.format(python=sys.executable))
        script.chmod(0o755)
        self.paths = Paths(self.home)
        self.cwd = tmp_path

    def run(self, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
        env = {
            "HOME": str(self.home),
            "PATH": path or f"{self.bin}:/usr/bin:/bin",
            "HOMEBREW_PREFIX": "/opt/homebrew",
            "FAKE_LAUNCHCTL_LOG": str(self.log),
            "FAKE_LAUNCHCTL_STATE": str(self.state),
        }
        return subprocess.run(
            [sys.executable, "-m", "engine", "agent", *args],
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            cwd=self.cwd,
        )

    def calls(self) -> list[list[str]]:
        if not self.log.exists():
            return []
        calls = [json.loads(line) for line in self.log.read_text().splitlines()]
        self.log.unlink()
        return calls

    def loaded(self, *labels: str) -> None:
        self.state.write_text(json.dumps(list(labels)))

    def plist(self) -> dict:
        with self.paths.plist.open("rb") as stream:
            return plistlib.load(stream)


@pytest.fixture
def fake(tmp_path: Path) -> Fake:
    return Fake(tmp_path)


def test_install_renders_into_launch_agents_and_bootstraps(fake: Fake) -> None:
    result = fake.run("install", "--chat-port", "9090", "--home", "store", "--strict-model")
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [
        ["print", f"gui/{UID}/{BREW_LABEL}"],
        ["print", f"gui/{UID}/{LABEL}"],
        ["bootstrap", f"gui/{UID}", str(fake.home / "Library" / "LaunchAgents" / f"{LABEL}.plist")],
    ]
    plist = fake.plist()
    program = plist["ProgramArguments"]
    assert Path(program[0]).is_absolute() and os.access(program[0], os.X_OK)
    store = str(fake.cwd / "store")
    log_file = str(fake.paths.log_file)
    assert program[1:] == [
        *("serve", "--log-file", log_file),
        *("--home", store, "--chat-port", "9090", "--strict-model"),
    ]
    assert plist["EnvironmentVariables"]["MLXD_HOME"] == store
    assert plist["StandardErrorPath"] == str(fake.home / "Library/Logs/mlxd/mlxd.log")
    assert (fake.home / "Library" / "Logs" / "mlxd").is_dir()
    assert "logs: " in result.stdout and str(fake.paths.log_file) in result.stdout


def test_install_again_restarts_or_reloads(fake: Fake) -> None:
    assert fake.run("install").returncode == 0
    fake.calls()
    same = fake.run("install")
    assert same.returncode == 0, same.stderr
    assert fake.calls()[-1] == ["kickstart", "-k", f"gui/{UID}/{LABEL}"]
    changed = fake.run("install", "--stt-port", "9999")
    assert changed.returncode == 0, changed.stderr
    assert [call[0] for call in fake.calls()][-2:] == ["bootout", "bootstrap"]
    assert "--stt-port" in fake.plist()["ProgramArguments"]


def test_install_refuses_beside_brew_services_on_the_same_ports(fake: Fake) -> None:
    fake.loaded(BREW_LABEL)
    brew_plist = fake.paths.brew_plist
    brew_plist.parent.mkdir(parents=True)
    brew = {"Label": BREW_LABEL, "ProgramArguments": ["/opt/homebrew/opt/mlxd/bin/mlxd", "serve"]}
    brew_plist.write_bytes(plistlib.dumps(brew))
    refused = fake.run("install", "--chat-port", "9090")  # 8081 and 8082 still shared
    assert refused.returncode == 1
    assert "brew services" in refused.stderr and "8081, 8082" in refused.stderr
    assert not fake.paths.plist.exists()
    assert all(call[0] == "print" for call in fake.calls())
    elsewhere = ["--chat-port", "9080", "--embeddings-port", "9081", "--stt-port", "9082"]
    allowed = fake.run("install", *elsewhere)
    assert allowed.returncode == 0, allowed.stderr
    assert fake.calls()[-1][0] == "bootstrap"


def test_uninstall_boots_out_and_removes_the_plist(fake: Fake) -> None:
    assert fake.run("install").returncode == 0
    fake.calls()
    result = fake.run("uninstall")
    assert result.returncode == 0, result.stderr
    assert fake.calls() == [
        ["print", f"gui/{UID}/{LABEL}"],
        ["bootout", f"gui/{UID}/{LABEL}"],
    ]
    assert not fake.paths.plist.exists()
    again = fake.run("uninstall")
    assert again.returncode == 0 and "not installed" in again.stdout


def test_status_reports_the_launchd_state(fake: Fake) -> None:
    missing = fake.run("status")
    assert missing.returncode == 1 and "not loaded" in missing.stdout
    assert fake.run("install", "--only", "chat", "--chat-port", "1").returncode == 0
    result = fake.run("status")
    assert result.returncode == 0, result.stderr
    assert "state running" in result.stdout and "pid 4242" in result.stdout
    assert "chat http://127.0.0.1:1/health: no answer" in result.stdout


def test_logs_prints_the_tail_of_the_log(fake: Fake) -> None:
    assert fake.run("logs").returncode == 1
    fake.paths.logs.mkdir(parents=True)
    fake.paths.log_file.write_text("".join(f"line {i}\n" for i in range(50)))
    result = fake.run("logs", "-n", "3")
    assert result.returncode == 0 and result.stdout == "line 47\nline 48\nline 49\n"


@pytest.mark.skipif(sys.platform == "darwin", reason="launchd is there")
@pytest.mark.parametrize("action", ["install", "uninstall", "status", "logs"])
def test_without_launchd_it_says_where_the_logs_are(fake: Fake, action: str) -> None:
    result = fake.run(action, path="/nonexistent")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "macOS-only" in result.stderr and "journalctl --user -u mlxd" in result.stderr
    assert "docs/linux.md" in result.stderr and "Library" not in result.stderr
    assert not (fake.home / "Library").exists()


def test_bad_serve_flags_are_refused_before_anything_is_written(fake: Fake) -> None:
    result = fake.run("install", "--chat-port", "8081", "--embeddings-port", "8081")
    assert result.returncode == 2 and "own port" in result.stderr
    assert not fake.paths.plist.exists() and fake.calls() == []


def test_the_api_key_stays_out_of_the_command_line_and_the_plist_is_private(fake: Fake) -> None:
    result = fake.run("install", "--api-key", "s3cret-key", "--chat-port", "9090")
    assert result.returncode == 0, result.stderr
    plist = fake.plist()
    assert not any("s3cret-key" in argument for argument in plist["ProgramArguments"])
    assert "--api-key" not in plist["ProgramArguments"]
    assert plist["EnvironmentVariables"]["MLXD_API_KEY"] == "s3cret-key"
    assert fake.paths.plist.stat().st_mode & 0o777 == 0o600
    assert config_of_plist(fake.paths.plist).api_key == "s3cret-key"  # what the agent runs with
    fake.paths.plist.chmod(0o644)  # e.g. written by an older mlxd
    fake.loaded(LABEL)
    again = fake.run("install", "--api-key", "s3cret-key", "--chat-port", "9090")
    assert again.returncode == 0, again.stderr
    assert fake.calls()[-1][0] == "kickstart"  # unchanged: restarted, and made private
    assert fake.paths.plist.stat().st_mode & 0o777 == 0o600
