"""`mlxd serve` as a real subprocess with tiny real-architecture models, driven by real clients."""

from __future__ import annotations

import io
import json
import socket
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from tests.conftest import model_flags
from tests.serving import Server, start_server


def wav_bytes(seconds: float = 1.0, rate: int = 16000) -> bytes:
    t = np.arange(int(seconds * rate)) / rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * t) * 32767).astype("<i2")
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(samples.tobytes())
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_models) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("e2e")
    running = start_server(tmp, *model_flags(tiny_models))
    seen: list[int | None] = []

    def chat_ready() -> bool:
        seen.append(running.health("chat"))
        return seen[-1] == 200

    running.wait_for(chat_ready, 180, "chat ready")
    running.wait_healthy()
    running.chat_health_seen = seen
    yield running
    assert running.stop() == 0


def client(server: Server, service: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url(service) + "/v1", api_key="anything", max_retries=0)


def test_health_is_503_while_loading_then_200(server: Server) -> None:
    seen = [code for code in server.chat_health_seen if code is not None]
    assert seen[0] == 503 and seen[-1] == 200
    assert server.get("chat", "/health").json() == {"status": "ok"}


def test_chat_completion_with_the_openai_package(server: Server) -> None:
    reply = client(server, "chat").chat.completions.create(
        model="gemma-4-e4b",
        messages=[{"role": "user", "content": "Hello, how are you?"}],
        max_tokens=8,
        temperature=0,
    )
    assert reply.choices[0].message.content
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 0 and 0 < reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model == "tiny-gemma4"


def test_chat_stream_matches_non_stream_under_greedy(server: Server) -> None:
    messages = [{"role": "user", "content": "Tell me a story"}]
    chat = client(server, "chat").chat.completions
    whole = chat.create(model="m", messages=messages, max_tokens=12, temperature=0)
    stream = chat.create(model="m", messages=messages, max_tokens=12, temperature=0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == whole.choices[0].message.content


def test_embeddings_with_the_openai_package(server: Server) -> None:
    api = client(server, "embeddings")
    result = api.embeddings.create(model="bge-base-zh", input=["你好，世界", "hello world"])
    assert [d.index for d in result.data] == [0, 1]
    for item in result.data:
        vector = np.asarray(item.embedding)
        assert vector.shape == (32,)  # the tiny bge's hidden size
        assert abs(np.linalg.norm(vector) - 1.0) < 1e-4
    floats = api.embeddings.create(model="x", input="hello world", encoding_format="float")
    assert np.allclose(floats.data[0].embedding, result.data[1].embedding, atol=1e-6)
    assert result.usage.prompt_tokens > 0


def test_inference_multipart(server: Server) -> None:
    files = {"file": ("tone.wav", wav_bytes(), "audio/wav")}
    data = {"temperature": "0.0", "temperature_inc": "0", "response_format": "json"}
    response = server.post("stt", "/inference", files=files, data=data)
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"text"} and isinstance(body["text"], str)


def test_models_on_every_port(server: Server) -> None:
    expected = {"chat": "gemma-4-e4b", "embeddings": "bge-base-zh", "stt": "whisper-large-v3-turbo"}
    for service, alias in expected.items():
        ids = [m["id"] for m in server.get(service, "/v1/models").json()["data"]]
        assert alias in ids and len(ids) == 2


@pytest.mark.parametrize("service", ["chat", "embeddings", "stt"])
def test_bad_requests_get_json_errors_and_leave_the_service_healthy(
    server: Server, service: str
) -> None:
    route = {"chat": "/v1/chat/completions", "embeddings": "/v1/embeddings", "stt": "/inference"}
    path = route[service]
    cases = [
        (server.post(service, "/no/such/route"), 404),
        (server.get(service, path), 405),
        (
            server.post(service, path, content=b"{not json", headers=_json),
            415 if service == "stt" else 400,
        ),
        (server.post(service, path, content=b"{}", headers={"content-type": "text/xml"}), 415),
        (server.get(service, "/health", headers={"host": "attacker.example"}), 403),
    ]
    if service != "stt":
        cases.append((server.post(service, path, json={"model": 1}), 400))
    for response, status in cases:
        assert response.status_code == status, response.text
        assert set(response.json()["error"]) >= {"message", "type", "param", "code"}
    assert oversized_status(server.ports[service], path, 700 * 1024 * 1024) == 413
    assert server.get(service, "/health").status_code == 200


_json = {"content-type": "application/json"}


def oversized_status(port: int, path: str, length: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
        )
        sock.sendall(head.encode() + b"x" * 100_000)
        return int(sock.recv(4096).split(b" ")[1])


def test_bad_audio_is_400_not_500(server: Server) -> None:
    for name, data in [("a.wav", b"RIFF....WAVEjunk"), ("b.mp3", b"\x00" * 10), ("c.wav", b"")]:
        response = server.post("stt", "/inference", files={"file": (name, data)})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == "file"
    response = server.post(
        "stt", "/inference", files={"file": ("a.wav", wav_bytes())}, data={"temperature": "abc"}
    )
    assert response.status_code == 400
    assert server.get("stt", "/health").status_code == 200


def test_health_answers_while_the_model_thread_is_busy(server: Server) -> None:
    import threading

    # On the seeded tiny model this seed never samples an end of turn before 400 tokens.
    body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 400, "seed": 2}
    replies: list[httpx.Response] = []
    worker = threading.Thread(
        target=lambda: replies.append(server.post("chat", "/v1/chat/completions", json=body)),
        daemon=True,
    )
    worker.start()
    time.sleep(0.3)
    assert server.get("chat", "/health").status_code == 200
    assert worker.is_alive(), "/health answered only after the chat reply"
    worker.join(60)
    assert replies[0].json()["usage"]["completion_tokens"] == 400


def test_access_log_has_one_line_per_request(server: Server) -> None:
    server.get("embeddings", "/health", headers={"x-request-id": "trace-me-42"})
    time.sleep(0.3)
    lines = [line for line in server.log().splitlines() if "id=trace-me-42" in line]
    assert len(lines) == 1
    assert "GET /health 200" in lines[0] and "ms" in lines[0]


def test_client_disconnect_frees_the_model(server: Server, tmp_path: Path) -> None:
    body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 2000, "stream": True}
    with httpx.stream(
        "POST", server.url("chat") + "/v1/chat/completions", json=body, timeout=30
    ) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and "content" in line:
                break
    server.wait_for(
        lambda: "chat: generation cancelled after" in server.log(), 10, "the cancel log line"
    )
    reply = client(server, "chat").chat.completions.create(
        model="m", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, timeout=30
    )
    assert reply.choices[0].message.content is not None


def test_node_sdk_embeddings_equal_the_float_response(server: Server, node_client) -> None:
    base = server.url("embeddings") + "/v1"
    texts = ["你好，世界", "hello world"]
    default = node_client(base, {"kind": "embeddings", "model": "bge-base-zh", "input": texts})
    floats = node_client(
        base, {"kind": "embeddings", "model": "x", "input": texts, "encoding_format": "float"}
    )
    python = client(server, "embeddings").embeddings.create(model="x", input=texts)
    for a, b, c in zip(default["data"], floats["data"], python.data, strict=True):
        assert len(a) == len(b) == 32
        assert np.allclose(a, b, atol=1e-6) and np.allclose(a, c.embedding, atol=1e-6)


def test_node_sdk_chat_stream_and_not(server: Server, node_client) -> None:
    base = server.url("chat") + "/v1"
    request = {
        "kind": "chat",
        "model": "gemma-4-e4b",
        "messages": [{"role": "user", "content": "Hello"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    whole = node_client(base, request)
    streamed = node_client(
        base, {**request, "stream": True, "stream_options": {"include_usage": True}}
    )
    assert whole["content"] and whole["content"] == streamed["content"]
    assert streamed["finish_reason"] == whole["finish_reason"]
    assert streamed["usage"]["completion_tokens"] == whole["usage"]["completion_tokens"]


def test_a_client_that_leaves_mid_reply_is_a_quiet_499(server: Server) -> None:
    # On the seeded tiny model this seed samples no end of turn for hundreds of tokens.
    body = {"messages": [{"role": "user", "content": "Go"}], "max_tokens": 3000, "seed": 2}
    raw = json.dumps(body).encode()
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(raw)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.ports["chat"]), timeout=30) as sock:
        sock.sendall(head.encode() + raw)
        time.sleep(0.5)  # the reply is being generated
    server.wait_for(
        lambda: "POST /v1/chat/completions 499" in server.log(), 60, "the 499 access line"
    )
    assert "RequestCancelled" not in server.log() and "unhandled error" not in server.log()
