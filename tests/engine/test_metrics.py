"""`GET /metrics`: Prometheus text that prometheus-client parses, whose counters move by exactly
the requests made (fake runners, tier 1)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.engine.test_app import assert_error, serving
from tests.wav_files import int_wav

Samples = dict[tuple[str, frozenset], float]


def scrape(client, **headers: str) -> Samples:
    _, response = client.get("/metrics", headers=headers)
    assert response.status == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in after, f"{name}{labels} is not on /metrics"
    return after[key] - before.get(key, 0.0)


def requests(route: str, status: int, method: str = "POST") -> dict[str, str]:
    return {"route": route, "method": method, "status": str(status)}


def test_embeddings_counters_move_by_the_requests_made(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings") as (client, _):
        before = scrape(client)
        tokens = 0
        for body in ({"input": "hello"}, {"input": ["a b", "cde"]}, {"input": "x"}):
            _, response = client.post("/v1/embeddings", json=body)
            assert response.status == 200
            tokens += response.json["usage"]["prompt_tokens"]
        assert_error(client.post("/v1/embeddings", json={"input": 5})[1], 400)
        after = scrape(client)
    route = "/v1/embeddings"
    assert delta(before, after, "mlxd_http_requests_total", **requests(route, 200)) == 3
    assert delta(before, after, "mlxd_http_requests_total", **requests(route, 400)) == 1
    assert delta(before, after, "mlxd_embeddings_texts_total") == 4
    assert delta(before, after, "mlxd_embeddings_tokens_total") == tokens
    assert delta(before, after, "mlxd_embeddings_request_inputs_count") == 3
    assert delta(before, after, "mlxd_jobs_total", outcome="ok") == 3
    assert delta(before, after, "mlxd_job_seconds_count") == 3
    assert after[("mlxd_model_loaded", frozenset())] == 1
    assert after[("mlxd_model_state", frozenset({("state", "ready")}))] == 1
    assert after[("mlxd_model_loads_total", frozenset())] == 1
    assert after[("llamacpp:requests_deferred", frozenset())] == 0
    assert after[("mlxd_requests_in_flight", frozenset())] == 0
    assert after[("mlxd_process_resident_memory_bytes", frozenset())] > 0
    assert after[("mlxd_process_peak_resident_memory_bytes", frozenset())] > 0


def test_chat_counters_follow_the_replies_tokens(tmp_path: Path) -> None:
    with serving(tmp_path, "chat") as (client, _):
        before = scrape(client)
        usages, replies = [], 0
        for extra in ({}, {"max_tokens": 3}, {"n": 2, "max_tokens": 4}):
            body = {"messages": [{"role": "user", "content": "Hi there"}], **extra}
            _, response = client.post("/v1/chat/completions", json=body)
            assert response.status == 200, response.text
            usages.append(response.json["usage"])
            replies += len(response.json["choices"])
        after = scrape(client)
    completion = sum(u["completion_tokens"] for u in usages)
    prompt = sum(u["prompt_tokens"] for u in usages)
    route = "/v1/chat/completions"
    assert delta(before, after, "mlxd_http_requests_total", **requests(route, 200)) == 3
    for name in ("llamacpp:tokens_predicted_total", "mlxd_chat_tokens_predicted_total"):
        assert delta(before, after, name) == completion
    for name in ("llamacpp:prompt_tokens_total", "mlxd_chat_prompt_tokens_total"):
        assert delta(before, after, name) == prompt
    assert delta(before, after, "mlxd_chat_time_to_first_token_seconds_count") == 3
    # Every token after a choice's first is one gap, whatever ran beside it.
    gaps = delta(before, after, "mlxd_chat_inter_token_seconds_count")
    assert gaps == completion - replies
    assert delta(before, after, "mlxd_chat_finish_reasons_total", reason="length") >= 2
    assert after[("llamacpp:predicted_tokens_seconds", frozenset())] > 0


def test_speech_counts_audio_seconds(tmp_path: Path) -> None:
    with serving(tmp_path, "stt") as (client, _):
        before = scrape(client)
        for seconds in (1.0, 2.5):
            wav = int_wav(0.1 * np.ones(int(16000 * seconds)), 16000)
            _, response = client.post("/inference", files={"file": ("a.wav", wav, "audio/wav")})
            assert response.status == 200, response.text
        after = scrape(client)
    assert delta(before, after, "mlxd_stt_audio_seconds_total") == 3.5
    assert delta(before, after, "mlxd_stt_real_time_factor_count") == 2
    assert delta(before, after, "mlxd_http_requests_total", **requests("/inference", 200)) == 2


def test_metrics_are_behind_the_api_key(tmp_path: Path) -> None:
    with serving(tmp_path, "embeddings", api_key="k") as (client, _):
        assert_error(client.get("/metrics")[1], 401, code="invalid_api_key")
        assert client.get("/health")[1].status == 200
        samples = scrape(client, authorization="Bearer k")
    refused = requests("/metrics", 401, method="GET")
    assert samples[("mlxd_http_requests_total", frozenset(refused.items()))] == 1
