"""Progress reporting: sparse plain lines without a terminal, a bar on one."""

from __future__ import annotations

import io

from conversions.progress import BarProgress, DownloadLines, progress


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_at_each_tenth() -> None:
    stream = io.StringIO()
    with progress("quantize", 1000, stream=stream) as bar:
        for _ in range(1000):
            bar.update()
    lines = stream.getvalue().splitlines()
    assert lines[0] == "convert: quantize 100/1000 tensors"
    assert lines[-1] == "convert: quantize 1000/1000 tensors"
    assert len(lines) == 10


def test_bytes_are_shown_in_megabytes() -> None:
    stream = io.StringIO()
    with progress("sha256", 3_000_000, unit="B", stream=stream) as bar:
        bar.update(3_000_000)
    assert stream.getvalue() == "convert: sha256 3.0/3.0 MB\n"


def test_a_terminal_gets_a_bar() -> None:
    stream = Terminal()
    with progress("write", 4, stream=stream) as bar:
        assert isinstance(bar, BarProgress)
        bar.update(4)
    assert "convert: write" in stream.getvalue() and "4/4" in stream.getvalue()


def test_download_lines_skip_the_network_bytes_bar(capfd) -> None:
    with DownloadLines(total=2, desc="Fetching 2 files") as files:
        files.update(2)
    with DownloadLines(total=10, desc="Downloading bytes", unit="B") as network:
        network.update(10)
    assert capfd.readouterr().err == "convert: download 2/2 files\n"
