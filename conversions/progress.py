"""Progress of the long conversion steps, on stderr: a bar on a terminal, else sparse lines.

    with progress("quantize", total=len(tensors), unit="tensors") as bar:
        for ...: bar.update()

Without a terminal (a log file, CI) a line such as `convert: quantize 120/236 tensors` is
printed at each tenth of the way or after LINE_INTERVAL_S seconds, whichever comes first.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

PREFIX = "convert"
LINE_INTERVAL_S = 10.0
STEPS = 10


def _amount(count: float, unit: str) -> str:
    return f"{count / 1e6:.1f}" if unit == "B" else f"{count:.0f}"


def _unit_name(unit: str) -> str:
    return "MB" if unit == "B" else unit


class LineThrottle:
    """Decides when a plain progress line is due: each tenth of the total, or after a while."""

    def __init__(self) -> None:
        self.next_fraction = 1 / STEPS
        self.last = time.monotonic()

    def due(self, done: float, total: float) -> bool:
        now = time.monotonic()
        finished = total > 0 and done >= total
        crossed = total > 0 and done / total >= self.next_fraction
        if not (finished or crossed or now - self.last >= LINE_INTERVAL_S):
            return False
        if total > 0:
            self.next_fraction = (int(done / total * STEPS) + 1) / STEPS
        self.last = now
        return True


class Progress:
    """A counter of one step; prints plain lines (the terminal version draws a bar instead)."""

    def __init__(self, step: str, total: int, unit: str, stream: TextIO) -> None:
        self.step, self.total, self.unit, self.stream = step, total, unit, stream
        self.done = 0
        self.throttle = LineThrottle()

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.throttle.due(self.done, self.total):
            self.stream.write(f"{self.line()}\n")
            self.stream.flush()

    def line(self) -> str:
        done, total = _amount(self.done, self.unit), _amount(self.total, self.unit)
        return f"{PREFIX}: {self.step} {done}/{total} {_unit_name(self.unit)}"

    def close(self) -> None:
        """Nothing to do: update printed the last line when the count reached the total."""


class BarProgress(Progress):
    def __init__(self, step: str, total: int, unit: str, stream: TextIO) -> None:
        super().__init__(step, total, unit, stream)
        scaled = unit == "B"
        self.bar = tqdm(
            total=total, desc=f"{PREFIX}: {step}", unit=unit, unit_scale=scaled, file=stream
        )

    def update(self, n: int = 1) -> None:
        self.done += n
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()


def is_terminal(stream: TextIO) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


@contextmanager
def progress(
    step: str, total: int, unit: str = "tensors", stream: TextIO | None = None
) -> Iterator[Progress]:
    """Report `step`, `total` units long (unit "B": bytes, shown in MB)."""
    stream = stream or sys.stderr
    kind = BarProgress if is_terminal(stream) else Progress
    reporter = kind(step, total, unit, stream)
    try:
        yield reporter
    finally:
        reporter.close()


@contextmanager
def stage(step: str, stream: TextIO | None = None) -> Iterator[None]:
    """A step without a count: a line when it starts and one when it ends."""
    stream = stream or sys.stderr
    start = time.monotonic()
    print(f"{PREFIX}: {step}...", file=stream, flush=True)
    yield
    print(f"{PREFIX}: {step} done ({time.monotonic() - start:.1f} s)", file=stream, flush=True)


class _Discard:
    def write(self, text: str) -> int:
        return len(text)

    def flush(self) -> None:
        pass


class DownloadLines(tqdm):
    """huggingface-hub's progress bars as plain lines, for stderr without a terminal (the hub
    hides its own bars there). The network-bytes bar, whose total is a guess, is not shown."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.pop("name", None)
        self.throttle = LineThrottle()
        super().__init__(*args, **{**kwargs, "file": _Discard(), "disable": False})

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        desc = self.desc or ""
        if desc.startswith("Downloading bytes") or not self.throttle.due(self.n, self.total or 0):
            return
        unit = "B" if self.unit == "B" else "files"
        done, total = _amount(self.n, unit), _amount(self.total or 0, unit)
        print(f"{PREFIX}: download {done}/{total} {_unit_name(unit)}", file=sys.stderr)


def download_bars() -> type[tqdm] | None:
    """The tqdm class to give huggingface-hub: its own (None) on a terminal, else lines."""
    return None if is_terminal(sys.stderr) else DownloadLines
