"""`--log-file`: the engine's log in one file, rotated by size.

launchd (the agent) can only append a process's output to a file, never rotate it. With
`--log-file` the supervisor is the one writer: its own records, every line its service processes
print (their stdout and stderr come to it through pipes) and its own stray output (fds 1 and 2
point at the current file, again after each rotation) go through one `RotatingLog`.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from logging.handlers import RotatingFileHandler
from pathlib import Path
from typing import IO

BACKUPS = 5
MiB = 1024 * 1024


class _Passthrough(logging.Formatter):
    """Formats the supervisor's own records; a service's lines, already formatted, as they are."""

    def format(self, record: logging.LogRecord) -> str:
        if getattr(record, "raw", False):
            return record.getMessage()
        return super().format(record)


class RotatingLog(RotatingFileHandler):
    """A size-rotated log file (mode 0600) that also receives this process's fds 1 and 2."""

    def __init__(self, path: Path, max_bytes: int, fmt: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        super().__init__(path, maxBytes=max_bytes, backupCount=BACKUPS, encoding="utf-8")
        self.setFormatter(_Passthrough(fmt))
        self._capture()

    def _open(self) -> IO[str]:
        fd = os.open(self.baseFilename, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        os.chmod(self.baseFilename, 0o600)
        return open(fd, "a", encoding=self.encoding, errors=self.errors)  # noqa: SIM115

    def doRollover(self) -> None:
        super().doRollover()
        self._capture()

    def _capture(self) -> None:
        """Point fds 1 and 2 at the current file (prints, tracebacks, C libraries' output)."""
        if self.stream is None:
            return
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        for fd in (1, 2):
            os.dup2(self.stream.fileno(), fd)

    def write_line(self, line: str) -> None:
        record = logging.LogRecord("mlxd.service", logging.INFO, "", 0, line, None, None)
        record.raw = True
        self.handle(record)

    def relay(self, pipe: IO[bytes]) -> threading.Thread:
        """Copy a service process's output into the log, line by line, until it closes."""

        def copy() -> None:
            with pipe:
                for line in iter(pipe.readline, b""):
                    self.write_line(line.decode("utf-8", errors="replace").rstrip("\n"))

        thread = threading.Thread(target=copy, name="mlxd-log-relay", daemon=True)
        thread.start()
        return thread


def open_log(path: str, max_mb: int, fmt: str) -> RotatingLog:
    return RotatingLog(Path(path).expanduser(), max_mb * MiB, fmt)
