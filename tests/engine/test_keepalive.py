"""Idle unload and transparent reload (keep-alive), and the memory policy: the model thread
alone, the app with fake runners, then `mlxd serve` with a tiny real model."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from sanic import Sanic
from sanic_testing.reusable import ReusableClient

from engine.app import ServiceSpec, create_app
from engine.config import ConfigError, build_config
from engine.errors import Unavailable
from engine.keepalive import format_duration, parse_keep_alive
from engine.memory import Limits, ModelTooLarge, check_fits, parse_size
from engine.modelthread import ModelState, ModelThread
from tests.engine.fakes import FakeEmbeddings, fake_model_dir, fake_spec
from tests.engine.test_app import assert_error, serving, wait_ready
from tests.serving import Server, free_port, poll_until, serve_one

POLL_S = 60  # generous: the unload itself is not timed


# ---- parsing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("5m", 300.0), ("30s", 30.0), ("1h", 3600.0), ("1h30m", 5400.0), ("250ms", 0.25)]
    + [("0", 0.0), (0, 0.0), (90, 90.0), ("-1", None), (-1, None), ("forever", None)],
)
def test_keep_alive_durations_as_ollama_writes_them(value: object, seconds: float | None) -> None:
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["", "5x", "m", "1m-", True, [], {}, "nan"])
def test_bad_keep_alive_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="5m, 30s"):
        parse_keep_alive(value)


def test_durations_print_back() -> None:
    assert [format_duration(s) for s in (None, 0, 0.25, 59.6, 3725)] == [
        "forever",
        "0s",
        "250ms",
        "1m",
        "1h2m5s",
    ]


def test_config_keep_alive_per_service_over_global(tmp_path: Path) -> None:
    config = build_config({"home": str(tmp_path), "keep_alive": "5m", "stt_keep_alive": "0"})
    assert config.keep_alive_s("chat") == 300.0 and config.keep_alive_s("stt") == 0.0
    assert build_config({"home": str(tmp_path)}).keep_alive_s("embeddings") is None
    with pytest.raises(ConfigError, match="chat_keep_alive"):
        build_config({"home": str(tmp_path), "chat_keep_alive": "soon"})
    with pytest.raises(ConfigError, match="mlx_memory_limit"):
        build_config({"home": str(tmp_path), "mlx_memory_limit": "lots"})


def test_sizes() -> None:
    assert parse_size("auto") is None and parse_size("16GB") == 16 * 10**9
    assert parse_size("1.5GiB") == 3 * 2**29 and parse_size("512") == 512
    with pytest.raises(ValueError, match="16GB"):
        parse_size("-1GB")


def test_a_model_larger_than_the_limit_is_refused_naming_both_sizes() -> None:
    limits = Limits(memory=2 * 10**9, cache=0, working_set=3 * 10**9, source="--x")
    check_fits("small", 10**9, limits)
    with pytest.raises(ModelTooLarge) as error:
        check_fits("big", 5 * 10**9, limits)
    assert "5.00 GB" in str(error.value) and "2.00 GB" in str(error.value)


# ---- the model thread --------------------------------------------------------------------------


class Loads:
    """A loader that counts its loads and can be held (the gate) mid-load."""

    def __init__(self) -> None:
        self.count = 0
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self) -> str:
        self.count += 1
        self.gate.wait(POLL_S)
        return f"runner {self.count}"


def echo_policy(runner: str, inbox) -> None:
    while inbox.wait():
        for job in inbox.take():
            job.finish((runner, job.payload))


async def until(predicate: Callable[[], bool], what: str, tries: int = 6000) -> None:
    """Like poll_until, on the event loop (a hang guard, not a timing)."""
    for _ in range(tries):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what}: not seen after {tries} checks")


def run_thread(keep_alive: float | None, body: Callable) -> tuple[Loads, ModelThread]:
    loads = Loads()
    worker = ModelThread("test", loads, echo_policy, queue_size=64, keep_alive=keep_alive)

    async def main() -> None:
        worker.start()
        await until(lambda: worker.loads == 1, "the first load")
        try:
            await body(worker, loads)
        finally:
            worker.stop(timeout=10)

    asyncio.run(main())
    return loads, worker


def test_requests_during_a_reload_share_one_load() -> None:
    async def body(worker: ModelThread, loads: Loads) -> None:
        await worker.submit("first").result()  # keep-alive 0: unloaded after each request
        await until(lambda: worker.state is ModelState.UNLOADED, "the unload")
        before = loads.count
        loads.gate.clear()
        jobs = [worker.submit(0)]
        await until(lambda: worker.state is ModelState.RELOADING, "the reload")
        jobs += [worker.submit(i) for i in range(1, 10)]
        loads.gate.set()
        results = await asyncio.gather(*(job.result() for job in jobs))
        assert results == [(f"runner {before + 1}", i) for i in range(10)]
        assert all(job.load_ms is not None for job in jobs)
        assert loads.count == worker.loads == before + 1 and worker.served == 11

    run_thread(0.0, body)


def test_a_failed_reload_answers_its_requests_and_the_next_request_tries_again() -> None:
    outcomes = iter(["runner 1", OSError("weights.safetensors is gone"), "runner 3"])

    def load() -> str:
        outcome = next(outcomes)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    worker = ModelThread("test", load, echo_policy, queue_size=64, keep_alive=None)

    async def main() -> None:
        worker.start()
        try:
            await until(lambda: worker.loads == 1, "the first load")
            first = worker.submit("first", keep_alive=0.0)
            assert await first.result() == ("runner 1", "first")
            await until(lambda: worker.state is ModelState.UNLOADED, "the unload")
            with pytest.raises(Unavailable, match="weights.safetensors is gone") as failed:
                await worker.submit("second").result()
            assert failed.value.code == "model_unavailable"
            assert worker.state is ModelState.FAILED
            assert await worker.submit("third").result() == ("runner 3", "third")
        finally:
            worker.stop(timeout=10)

    asyncio.run(main())
    assert worker.loads == 2


def test_a_requests_keep_alive_overrides_the_service_default() -> None:
    async def body(worker: ModelThread, loads: Loads) -> None:
        await worker.submit("kept").result()
        assert worker.state is ModelState.READY and worker.unload_in() is None
        await worker.submit("once", keep_alive=0.0).result()
        await until(lambda: worker.state is ModelState.UNLOADED, "the unload after keep_alive 0")
        job = worker.submit("again")
        assert await job.result() == ("runner 2", "again") and job.load_ms is not None
        assert worker.state is ModelState.READY and worker.idle_after is None

    loads, _ = run_thread(None, body)
    assert loads.count == 2


# ---- the app, with fake runners ---------------------------------------------------------------


class HeavyEmbeddings(FakeEmbeddings):
    """Holds 64 MiB of MLX memory (made on the model thread, as a real runner's weights)."""

    def __init__(self) -> None:
        import mlx.core as mx

        super().__init__()
        self.weights = mx.ones((16 * 1024 * 1024,), dtype=mx.float32)
        mx.eval(self.weights)


def rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="reads RSS from /proc")
def test_keep_alive_frees_the_memory_and_the_next_request_reloads(tmp_path: Path) -> None:
    Sanic._app_registry.clear()
    home = {"home": str(tmp_path), "embeddings_model": str(fake_model_dir(tmp_path, "embeddings"))}
    config = build_config({**home, "embeddings_keep_alive": "1s", "api_key": "k"})
    real, _ = fake_spec("embeddings")
    spec = ServiceSpec(real.name, real.blueprint, lambda m, c: HeavyEmbeddings(), real.policy)
    auth = {"authorization": "Bearer k"}
    with ReusableClient(create_app(spec, config), port=free_port()) as client:
        wait_ready(client)
        _, first = client.post("/v1/embeddings", json={"input": "hi"}, headers=auth)
        loaded = client.get("/mlxd/ps", headers=auth)[1].json
        rss_loaded = rss()
        poll_until(
            lambda: client.get("/health")[1].json.get("model") == "unloaded", "the idle unload"
        )
        assert client.get("/health")[1].json == {"status": "ok", "model": "unloaded"}
        unloaded = client.get("/mlxd/ps", headers=auth)[1].json
        assert rss() < rss_loaded - 32 * 1024 * 1024  # most of the 64 MiB went back
        assert loaded["mlx_active_bytes"] >= 64 * 1024 * 1024 > unloaded["mlx_active_bytes"]
        assert (loaded["state"], unloaded["state"]) == ("loaded", "unloaded")
        assert unloaded["keep_alive_s"] == 1.0 and unloaded["loads"] == 1
        _, again = client.post("/v1/embeddings", json={"input": "hi"}, headers=auth)
        assert again.json["data"] == first.json["data"]
        assert "x-mlxd-load-ms" in again.headers and "x-mlxd-load-ms" not in first.headers
        assert client.get("/mlxd/ps")[1].status == 401


def test_keep_alive_0_in_a_request_unloads_after_it(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        _, response = client.post("/v1/embeddings", json={"input": "a", "keep_alive": 0})
        assert response.status == 200
        poll_until(lambda: client.get("/health")[1].json.get("model") == "unloaded", "the unload")
        _, response = client.post("/v1/embeddings", json={"input": "a"})
        assert response.status == 200 and "x-mlxd-load-ms" in response.headers
        assert client.get("/health")[1].json == {"status": "ok"}


def test_bad_keep_alive_is_a_400_on_json_and_multipart(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        _, response = client.post("/v1/embeddings", json={"input": "a", "keep_alive": "soon"})
        assert_error(response, 400, param="keep_alive", code="invalid_value")
    with serving(tmp_path, "stt") as (client, _):
        files = {"file": ("a.wav", b"RIFF")}
        _, response = client.post("/inference", files=files, data={"keep_alive": [1]})
        assert_error(response, 400)


def test_a_model_over_the_memory_limit_is_refused(tmp_path: Path) -> None:
    Sanic._app_registry.clear()
    model = fake_model_dir(tmp_path, "embeddings")
    config = build_config(
        {"home": str(tmp_path), "embeddings_model": str(model), "mlx_memory_limit": "10b"}
    )
    spec, _ = fake_spec("embeddings")
    with ReusableClient(create_app(spec, config), port=free_port()) as client:
        poll_until(
            lambda: (
                client.get("/health")[1].status == 503
                and "does not fit" in str(client.get("/health")[1].json)
            ),
            "the refusal",
        )
        message = client.get("/health")[1].json["message"]
        assert "--mlx-memory-limit 10b" in message and "0.00 GB" in message
        _, response = client.post("/v1/embeddings", json={"input": "a"})
        assert "does not fit" in assert_error(response, 503)["message"]


# ---- mlxd serve with a tiny real model --------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_bge: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("keepalive")
    yield from serve_one(root, "embeddings", tiny_bge, "--embeddings-keep-alive", "1s")


def status(server: Server) -> dict:
    return server.get("embeddings", "/mlxd/ps").json()


def embed(server: Server, **extra: object) -> httpx.Response:
    response = server.post("embeddings", "/v1/embeddings", json={"input": "你好", **extra})
    assert response.status_code == 200, response.text
    return response


def test_served_model_unloads_when_idle_and_reloads_once_for_ten(server: Server) -> None:
    first = embed(server, keep_alive="1h")  # stays loaded while measured
    loaded = status(server)
    assert loaded["state"] == "loaded" and loaded["mlx_active_bytes"] > 0
    embed(server)  # the service's 1s applies again
    server.wait_for(lambda: status(server)["state"] == "unloaded", POLL_S, "the idle unload")
    unloaded = status(server)
    assert unloaded["mlx_active_bytes"] < loaded["mlx_active_bytes"] / 10
    assert server.get("embeddings", "/health").json() == {"status": "ok", "model": "unloaded"}
    again = embed(server, keep_alive="1h")
    assert again.json()["data"] == first.json()["data"] and "x-mlxd-load-ms" in again.headers
    embed(server)
    server.wait_for(lambda: status(server)["state"] == "unloaded", POLL_S, "the next unload")
    unloaded = status(server)
    with ThreadPoolExecutor(10) as pool:
        replies = list(pool.map(lambda _: embed(server, keep_alive="1h"), range(10)))
    vector = first.json()["data"][0]["embedding"]
    for reply in replies:  # batched together: equal to float32 rounding
        assert np.allclose(reply.json()["data"][0]["embedding"], vector, atol=1e-5)
    assert any("x-mlxd-load-ms" in r.headers for r in replies)
    assert status(server)["loads"] == unloaded["loads"] + 1


def test_mlxd_ps_prints_each_service(server: Server, tmp_path: Path, monkeypatch, capsys) -> None:
    from engine.cli import main

    monkeypatch.setenv("MLXD_EMBEDDINGS_PORT", str(server.ports["embeddings"]))
    args = ["ps", "--home", str(tmp_path), "--only", "embeddings,stt"]
    assert main([*args, "--stt-port", str(free_port())]) == 0
    header, embeddings, stt = capsys.readouterr().out.splitlines()
    assert header.split()[:4] == ["SERVICE", "PORT", "MODEL", "STATE"]
    assert embeddings.split()[:3] == ["embeddings", str(server.ports["embeddings"]), "tiny-bge"]
    assert embeddings.split()[3] in ("loaded", "unloaded")
    assert stt.split()[0] == "stt" and "not running" in stt
    assert main([*args, "--json"]) == 0
    served, _ = json.loads(capsys.readouterr().out)
    assert served["model"] == "tiny-bge" and served["requests_served"] >= 1
    assert {"rss_bytes", "mlx_active_bytes", "mlx_peak_bytes", "idle_s", "unload_in_s"} <= set(
        served
    )
