"""`mlxd bench` against `mlxd serve` on the tiny models: a short run of every service (no timing
asserts: the rows are there and their numbers are positive), `--plot` and the errors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from engine.cli import main
from tests.conftest import model_flags
from tests.serving import PORT_FLAGS, Server, free_port, start_server

SHORT = ["--concurrency", "1,2", "--rounds", "1", "--max-tokens", "6", "--prompt-words", "20"]
SHORT += ["--batch-sizes", "1,4", "--audio-seconds", "1,2.5"]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models) -> Iterator[Server]:
    running = start_server(tmp_path_factory.mktemp("bench"), *model_flags(tiny_models))
    running.wait_healthy(timeout=180)
    yield running
    assert running.stop() == 0


def port_flags(server: Server) -> list[str]:
    return [arg for s, port in server.ports.items() for arg in (PORT_FLAGS[s], str(port))]


def positive(row: dict, *keys: str) -> None:
    for key in keys:
        assert isinstance(row[key], int | float) and row[key] > 0, (key, row)


def test_bench_measures_every_service_and_plots(server: Server, tmp_path: Path, capsys) -> None:
    png = tmp_path / "bench.png"
    code = main(["bench", *port_flags(server), *SHORT, "--json", "--plot", str(png)])
    out = capsys.readouterr()
    assert code == 0, out.err
    results = json.loads(out.out)
    assert list(results) == ["chat", "embeddings", "stt"]
    chat = results["chat"]["rows"]
    assert [row["concurrency"] for row in chat] == [1, 2]
    assert [row["requests"] for row in chat] == [1, 2]
    for row in chat:
        positive(row, "prompt_tokens", "completion_tokens", "ttft_p50_ms", "prefill_tok_s")
        positive(row, "aggregate_tok_s")
    embeddings = results["embeddings"]["rows"]
    assert [(r["batch_size"], r["concurrency"]) for r in embeddings] == [
        (1, 1),
        (1, 2),
        (4, 1),
        (4, 2),
    ]
    for row in embeddings:
        positive(row, "texts_s", "tokens_s", "latency_p50_ms")
    stt = results["stt"]["rows"]
    assert [row["audio_s"] for row in stt] == [1.0, 2.5]
    for row in stt:
        positive(row, "seconds_p50", "real_time_factor", "x_real_time")
    for service, result in results.items():
        assert result["model"], service
        positive(result["memory"], "rss_peak_bytes", "mlx_peak_bytes")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_one_url_prints_a_table(server: Server, capsys) -> None:
    url = server.url("embeddings")
    args = ["--concurrency", "3", "--rounds", "1", "--batch-sizes", "2"]
    assert main(["bench", "--service", "embeddings", "--url", url, *args]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"Embeddings ({url}")
    assert lines[1].split()[:2] == ["texts/request", "clients"]
    assert lines[2].split()[:3] == ["2", "3", "3"]
    assert lines[3].startswith("peak memory: process RSS peak ")


def test_bench_without_a_server_says_so(capsys) -> None:
    port = free_port()
    assert main(["bench", "--only", "chat", "--chat-port", str(port)]) == 1
    err = capsys.readouterr().err
    assert f"no server answers at http://127.0.0.1:{port}" in err and "mlxd serve" in err


def test_bench_url_needs_a_service(capsys) -> None:
    assert main(["bench", "--url", "http://127.0.0.1:1"]) == 1
    assert "--url needs --service" in capsys.readouterr().err
