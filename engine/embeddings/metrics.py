"""Embeddings' counters on /metrics: texts and tokens embedded (model thread, per request)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.embeddings.request import EmbedRequest, EmbedResult
from engine.metrics import ServiceObserver
from engine.modelthread import Job

SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048)


def observer(registry: CollectorRegistry) -> ServiceObserver:
    texts = Counter("mlxd_embeddings_texts", "Inputs embedded", registry=registry)
    tokens = Counter(
        "mlxd_embeddings_tokens", "Tokens embedded (special tokens included)", registry=registry
    )
    truncated = Counter("mlxd_embeddings_truncated", "Inputs cut to fit", registry=registry)
    sizes = Histogram(
        "mlxd_embeddings_request_inputs",
        "Inputs per request",
        buckets=SIZE_BUCKETS,
        registry=registry,
    )

    def observe(job: Job, result: EmbedResult) -> None:
        request: EmbedRequest = job.payload
        texts.inc(request.count)
        tokens.inc(sum(result.token_counts))
        truncated.inc(len(result.truncated))
        sizes.observe(request.count)

    return observe
