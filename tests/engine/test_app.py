"""Routes, validation and errors through the real app with fake model runners (tier 1)."""

from __future__ import annotations

import base64
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from sanic import Sanic
from sanic_testing.reusable import ReusableClient

from engine.app import create_app
from engine.config import build_config
from tests.engine.fakes import fake_model_dir, fake_spec
from tests.serving import free_port


@contextmanager
def serving(tmp_path: Path, service: str, runner=None, load_gate=None, **settings) -> Iterator:
    Sanic._app_registry.clear()
    values = {"home": str(tmp_path), f"{service}_model": str(fake_model_dir(tmp_path, service))}
    config = build_config({**values, **settings})
    spec, made = fake_spec(service, runner, load_gate=load_gate)
    app = create_app(spec, config)
    with ReusableClient(app, port=free_port()) as client:
        if load_gate is None:
            wait_ready(client)
        yield client, made


def wait_ready(client: ReusableClient) -> None:
    for _ in range(100):
        if client.get("/health")[1].status == 200:
            return
        time.sleep(0.05)
    raise AssertionError("fake model never became ready")


def assert_error(response, status: int, *, param: str | None = None, code: str | None = None):
    assert response.status == status, response.text
    error = response.json["error"]
    assert set(error) >= {"message", "type", "param", "code"}
    assert error["message"]
    if param is not None:
        assert error["param"] == param
    if code is not None:
        assert error["code"] == code
    return error


def test_health_is_503_loading_then_200(tmp_path: Path) -> None:
    gate = threading.Event()
    with serving(tmp_path, "embeddings", load_gate=gate) as (client, _):
        _, response = client.get("/health")
        assert response.status == 503 and response.json == {"status": "loading model"}
        _, response = client.post("/v1/embeddings", json={"input": "hi"})
        error = assert_error(response, 503)
        assert error["type"] == "unavailable_error" and error["message"] == "Loading model"
        gate.set()
        wait_ready(client)
        _, response = client.get("/health")
        assert response.json == {"status": "ok"}


def test_what_a_llama_server_client_also_calls(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", api_key="k") as (client, _):
        _, head = client.head("/health")
        assert head.status == 200 and not head.body
        auth = {"authorization": "Bearer k"}
        _, bare = client.get("/models", headers=auth)
        _, v1 = client.get("/v1/models", headers=auth)
        assert bare.status == 200 and bare.json == v1.json
        assert bare.json["data"] and bare.json["object"] == "list"


def test_missing_model_is_explained_and_the_service_stays_up(tmp_path: Path) -> None:
    Sanic._app_registry.clear()
    config = build_config({"home": str(tmp_path), "embeddings_model": "not-installed"})
    spec, _ = fake_spec("embeddings", runner=object())
    app = create_app(spec, config)
    with ReusableClient(app, port=free_port()) as client:
        time.sleep(0.3)
        _, response = client.get("/health")
        assert response.status == 503
        assert "mlxd pull not-installed" in response.json["message"]
        _, response = client.post("/v1/embeddings", json={"input": "x"})
        assert "mlxd pull not-installed" in assert_error(response, 503)["message"]


def test_load_failure_is_explained(tmp_path: Path) -> None:
    Sanic._app_registry.clear()
    config = build_config(
        {"home": str(tmp_path), "stt_model": str(fake_model_dir(tmp_path, "stt"))}
    )
    spec, _ = fake_spec("stt", runner=object())

    def broken(model, config):
        raise RuntimeError("weights are corrupt")

    spec = type(spec)(spec.name, spec.blueprint, broken, spec.policy)
    app = create_app(spec, config)
    with ReusableClient(app, port=free_port()) as client:
        time.sleep(0.3)
        _, response = client.get("/health")
        assert response.status == 503
        assert response.json["message"] == "Model failed to load: weights are corrupt"


def test_framework_errors_use_the_openai_shape(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        assert_error(client.get("/nope")[1], 404, code="not_found")
        assert_error(client.get("/v1/embeddings")[1], 405, code="method_not_allowed")
        headers = {"content-type": "text/plain"}
        response = client.post("/v1/embeddings", content=b"{}", headers=headers)[1]
        assert_error(response, 415, code="unsupported_media_type")
        assert_error(client.post("/v1/embeddings", content=b"{bad")[1], 400, code="invalid_json")
        assert_error(client.post("/v1/embeddings", content=b"[1, 2]")[1], 400, code="invalid_json")
        assert_error(client.post("/v1/embeddings", content=b"")[1], 400)
        assert client.get("/health")[1].status == 200


@pytest.mark.parametrize(
    "raw, words",
    [
        (b'{"input": "' + b"\\ud800" + b'"}', "surrogate"),
        (b'{"input": ["ok", {"x": "' + b"\\udfff" + b'"}]}', "surrogate"),
        (b"[" * 100_000 + b"]" * 100_000, "nested"),
        (b'{"input": "hi", "dimensions": ' + b"9" * 5000 + b"}", "not valid JSON"),
    ],
)
def test_input_at_pythons_limits_is_a_400(tmp_path: Path, raw: bytes, words: str) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.post("/v1/embeddings", content=raw)[1]
        error = assert_error(response, 400, code="invalid_json")
        assert words in error["message"]
        paired = b'{"input": "' + b"\\ud83d\\ude00" + b' \\\\ud800"}'  # a pair, an escaped "\\"
        assert client.post("/v1/embeddings", content=paired)[1].status == 200


def test_oversized_headers_are_431(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.get("/health", headers={"x-big": "a" * 20_000})[1]
        assert_error(response, 431, code="request_header_fields_too_large")
        assert client.get("/health")[1].status == 200


def test_curl_default_content_type_with_json_body_is_accepted(tmp_path: Path) -> None:
    headers = {"content-type": "application/x-www-form-urlencoded"}
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.post("/v1/embeddings", content=b'{"input": "hi"}', headers=headers)[1]
        assert response.status == 200


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "input"),
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": ["ok", 3]}, "input[1]"),
        ({"input": [[1, 2], []]}, "input[1]"),
        ({"input": [[1, "x"]]}, "input[0]"),
        ({"input": [5000]}, "input[0]"),
        ({"input": {"text": "x"}}, "input"),
        ({"input": "x", "encoding_format": "hex"}, "encoding_format"),
        ({"input": "x", "dimensions": 0}, "dimensions"),
        ({"input": "x", "dimensions": 9}, "dimensions"),
        ({"input": "x", "dimensions": "8"}, "dimensions"),
        ({"input": "x" * 40}, "input[0]"),
        ({"input": "x", "model": 7}, "model"),
    ],
)
def test_embeddings_bad_input(tmp_path: Path, body: dict, param: str) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        assert_error(client.post("/v1/embeddings", json=body)[1], 400, param=param)
        assert client.get("/health")[1].status == 200


def test_embeddings_input_forms_order_and_encodings(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, runner):
        floats = client.post("/v1/embeddings", json={"input": ["a", "bb", "ccc"]})[1].json
        assert [d["index"] for d in floats["data"]] == [0, 1, 2]
        assert floats["usage"] == {"prompt_tokens": 3 + 4 + 5, "total_tokens": 12}
        assert floats["model"] == "fake-embeddings"
        b64 = client.post(
            "/v1/embeddings", json={"input": ["a", "bb", "ccc"], "encoding_format": "base64"}
        )[1].json
        for f, b in zip(floats["data"], b64["data"], strict=True):
            decoded = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
            assert np.allclose(decoded, f["embedding"])
        single = client.post("/v1/embeddings", json={"input": "bb"})[1].json
        assert single["data"][0]["embedding"] == floats["data"][1]["embedding"]
        ids = runner.tokenize(["bb"])[0]
        by_ids = client.post("/v1/embeddings", json={"input": ids})[1].json
        assert by_ids["data"][0]["embedding"] == single["data"][0]["embedding"]
        lists = client.post("/v1/embeddings", json={"input": [ids, ids[:2]]})[1].json
        assert len(lists["data"]) == 2
        cut = client.post("/v1/embeddings", json={"input": "bb", "dimensions": 4})[1].json
        vector = np.array(cut["data"][0]["embedding"])
        assert vector.shape == (4,) and abs(np.linalg.norm(vector) - 1) < 1e-6
        full = np.array(single["data"][0]["embedding"][:4])
        assert np.allclose(vector, full / np.linalg.norm(full), atol=1e-6)


def test_embeddings_truncate_opt_in(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.post("/v1/embeddings", json={"input": ["x" * 40, "y"], "truncate": True})
        assert response[1].status == 200
        assert response[1].json["truncated"] == [0]
        assert response[1].headers["x-mlxd-truncated"] == "0"
        assert response[1].json["usage"]["prompt_tokens"] == 16 + 3


def test_strict_model(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", strict_model=True) as (client, _):
        response = client.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"})[1]
        assert_error(response, 404, code="model_not_found", param="model")
        for name in ("fake-embeddings", "bge-base-zh"):
            response = client.post("/v1/embeddings", json={"input": "x", "model": name})[1]
            assert response.status == 200 and response.json["model"] == "fake-embeddings"


def test_any_model_name_is_served_by_default(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.post("/v1/embeddings", json={"input": "x", "model": "gpt-4"})[1]
        assert response.json["model"] == "fake-embeddings"
        models = client.get("/v1/models")[1].json
        assert [m["id"] for m in models["data"]] == ["fake-embeddings", "bge-base-zh"]
        assert client.get("/v1/models/bge-base-zh")[1].json["root"] == "fake-embeddings"


def test_security_host_api_key_and_cors(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", api_key="sekret") as (client, _):
        assert_error(client.get("/health", headers={"host": "evil.example"})[1], 403)
        assert client.get("/health", headers={"host": "localhost:8081"})[1].status == 200
        assert client.get("/health", headers={"host": "[::1]:8081"})[1].status == 200
        assert_error(client.post("/v1/embeddings", json={"input": "x"})[1], 401)
        bad = {"authorization": "Bearer nope"}
        assert_error(client.post("/v1/embeddings", json={"input": "x"}, headers=bad)[1], 401)
        good = {"authorization": "Bearer sekret", "origin": "http://localhost:3000"}
        response = client.post("/v1/embeddings", json={"input": "x"}, headers=good)[1]
        assert response.status == 200
        assert "access-control-allow-origin" not in response.headers


@pytest.mark.parametrize(
    "host", ["[::1]evil.example", "127.0.0.1:8080@evil.example", "", "127.0.0.1:80:80"]
)
def test_malformed_host_headers_are_refused(tmp_path: Path, host: str) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.get("/health", headers={"host": host})[1]
        assert response.status in (400, 403), response.text


def test_two_host_headers_are_refused() -> None:
    from types import SimpleNamespace

    from sanic.compat import Header

    from engine.app import _check_host
    from engine.errors import InvalidRequest

    two = SimpleNamespace(headers=Header([("host", "127.0.0.1"), ("host", "evil.example")]))
    with pytest.raises(InvalidRequest) as raised:
        _check_host(two, {"127.0.0.1"})  # type: ignore[arg-type]
    assert raised.value.code == "bad_host"


def test_a_web_page_cannot_make_the_browser_run_work_here(tmp_path: Path) -> None:
    """A "simple" cross-origin POST (form content type: no preflight) from another site."""
    form = {"content-type": "application/x-www-form-urlencoded"}
    with serving(tmp_path, "embeddings") as (client, made):
        evil = form | {"origin": "http://evil.example"}
        response = client.post("/v1/embeddings", content=b'{"input": "x"}', headers=evil)[1]
        assert_error(response, 403, code="origin_not_allowed")
        assert "--cors-origins" in response.json["error"]["message"]
        for origin in ("http://127.0.0.1:5173", "http://[::1]", "vscode-webview://abc"):
            local = form | {"origin": origin}
            response = client.post("/v1/embeddings", content=b'{"input": "x"}', headers=local)[1]
            assert response.status == 200, origin


def test_cors_when_configured(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", cors_origins="http://app.example") as (client, _):
        headers = {"origin": "http://app.example"}
        response = client.options("/v1/embeddings", headers=headers)[1]
        assert response.status == 204
        assert response.headers["access-control-allow-origin"] == "http://app.example"
        other = client.get("/health", headers={"origin": "http://other.example"})[1]
        assert other.status == 403 and "access-control-allow-origin" not in other.headers


def test_allowed_hosts(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", allowed_hosts="box.local") as (client, _):
        assert client.get("/health", headers={"host": "box.local:8081"})[1].status == 200
        assert client.get("/health", headers={"host": "other.local"})[1].status == 403


def test_request_ids(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        response = client.get("/health", headers={"x-request-id": "abc123"})[1]
        assert response.headers["x-request-id"] == "abc123"
        assert len(client.get("/health")[1].headers["x-request-id"]) == 16


CHAT = {"messages": [{"role": "user", "content": "Say hello"}]}


@pytest.mark.parametrize(
    "body, param",
    [
        ({}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "user"}]}, "messages[0].content"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        (
            {"messages": [{"role": "user", "content": [{"type": "video"}]}]},
            "messages[0].content[0].type",
        ),
        ({**CHAT, "temperature": 3}, "temperature"),
        ({**CHAT, "temperature": "hot"}, "temperature"),
        ({**CHAT, "top_p": 0}, "top_p"),
        ({**CHAT, "max_tokens": 0}, "max_tokens"),
        ({**CHAT, "max_tokens": 1.5}, "max_tokens"),
        ({**CHAT, "stop": 5}, "stop"),
        ({**CHAT, "n": 9}, "n"),
        ({**CHAT, "n": 0}, "n"),
        ({**CHAT, "stream": "yes"}, "stream"),
        ({**CHAT, "reasoning_effort": "max"}, "reasoning_effort"),
        ({**CHAT, "seed": "x"}, "seed"),
        ({**CHAT, "top_k": 10**30}, "top_k"),
        ({**CHAT, "seed": -(10**30)}, "seed"),
    ],
)
def test_chat_bad_requests(tmp_path: Path, body: dict, param: str) -> None:
    with serving(tmp_path, "chat") as (client, _):
        assert_error(client.post("/v1/chat/completions", json=body)[1], 400, param=param)
        assert client.get("/health")[1].status == 200


def image_part(url: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}


@pytest.mark.parametrize(
    "url, message",
    [
        ("https://example.com/cat.png", "not fetched"),
        ("data:image/png;base64,!!!!", "could not be decoded"),
        ("data:image/png;base64," + base64.b64encode(b"not an image").decode(), "decoded"),
        ("file:///etc/passwd", "data: URL"),
    ],
)
def test_chat_bad_images(tmp_path: Path, url: str, message: str) -> None:
    with serving(tmp_path, "chat") as (client, _):
        response = client.post("/v1/chat/completions", json={"messages": [image_part(url)]})[1]
        assert message in assert_error(response, 400)["message"]


def test_chat_completion_shape_and_timings(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, _):
        response = client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})[1]
        assert response.status == 200
        body = response.json
        assert body["object"] == "chat.completion" and body["model"] == "fake-chat"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "Hello world,"}
        assert body["choices"][0]["finish_reason"] == "length"
        assert body["usage"]["completion_tokens"] == 3
        assert body["usage"]["total_tokens"] == body["usage"]["prompt_tokens"] + 3
        assert body["timings"]["predicted_n"] == 3


def test_chat_stream_shape(tmp_path: Path) -> None:
    body = {**CHAT, "max_tokens": 3, "stream": True, "stream_options": {"include_usage": True}}
    with serving(tmp_path, "chat") as (client, _):
        response = client.post("/v1/chat/completions", json=body)[1]
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.text.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        import json

        chunks = [json.loads(e) for e in events[:-1]]
        assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
        assert text == "Hello world,"
        assert chunks[-2]["choices"][0]["finish_reason"] == "length"
        assert chunks[-2]["timings"]["predicted_n"] == 3
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 3


def test_chat_errors_before_generation_are_plain_json_when_streaming(tmp_path: Path) -> None:
    messages = [{"role": "user", "content": " ".join(["word"] * 80)}]
    with serving(tmp_path, "chat") as (client, _):
        response = client.post("/v1/chat/completions", json={"messages": messages, "stream": True})
        error = assert_error(response[1], 400, code="context_length_exceeded")
        assert error["n_prompt_tokens"] == 80 and error["n_ctx"] == 64
        assert "80" in error["message"] and "64" in error["message"]


def test_stt_requires_multipart_file(tmp_path: Path) -> None:
    with serving(tmp_path, "stt") as (client, _):
        assert_error(client.post("/inference", json={"file": "x"})[1], 415)
        response = client.post("/inference", files={"other": ("a.wav", b"RIFF")})[1]
        assert_error(response, 400, param="file")
        response = client.post("/inference", files={"file": ("a.wav", b"")})[1]
        assert_error(response, 400, param="file")
