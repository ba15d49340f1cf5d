"""Operations: config values refused with a clear message, the rotated --log-file."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

LINES = 20_000  # about 2 MiB of 100-byte lines from each writer against a 1 MiB limit
CHILD = f"for i in range({LINES}): print(f'service line {{i:06d}} ' + 'x' * 80)"


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--log-level", "LOUD"], "log_level: 'LOUD' is not a log level"),
        (["--shutdown-timeout", "-1"], "shutdown_timeout must be 0 or more"),
        (["--stall-seconds", "soon"], "stall_seconds"),
        (["--log-max-mb", "0"], "log_max_mb must be at least 1"),
    ],
)
def test_bad_settings_are_a_clear_error_and_exit_2(tmp_path: Path, flags, words) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "engine", "serve", "--home", str(tmp_path), *flags],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert words in result.stderr and "Traceback" not in result.stderr


def test_the_log_file_rotates_by_size_and_is_private(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "mlxd.log"
    # In a child process: the log takes over its stdout and stderr.
    script = textwrap.dedent(
        f"""
        import logging, subprocess, sys
        from engine.logfile import open_log
        log = open_log({str(path)!r}, 1, "%(levelname)s %(message)s")
        logging.basicConfig(level="INFO", handlers=[log])
        child = subprocess.Popen(
            [sys.executable, "-c", {CHILD!r}],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        relay = log.relay(child.stdout)
        for i in range({LINES}):
            logging.getLogger("mlxd.test").info("own line %06d %s", i, "y" * 80)
        child.wait(); relay.join(60)
        print("printed after rotating", flush=True)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    files = sorted(path.parent.iterdir())
    assert path in files and path.with_name("mlxd.log.1") in files
    assert len(files) <= 6  # the file and 5 rotated ones
    for file in files:
        assert file.stat().st_mode & 0o777 == 0o600, file
        assert file.stat().st_size <= 1024 * 1024 + 200, file
    assert "printed after rotating" in path.read_text()  # stdout follows the rotation
    kept = "".join(file.read_text() for file in files)
    last = LINES - 1
    assert f"INFO own line {last:06d}" in kept and f"service line {last:06d}" in kept
