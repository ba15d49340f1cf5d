"""Chat's counters on /metrics: llama-server's token totals and rates, time to first token,
the gaps between tokens, and the prefix cache (model thread, when a reply ends)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.chat.types import ChatOutcome, Piece
from engine.metrics import SECONDS_BUCKETS, ServiceObserver, Twin, ratio_gauge
from engine.modelthread import Job

GAP_BUCKETS = (0.002, 0.005, 0.01, 0.02, 0.035, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5)


def observer(registry: CollectorRegistry) -> ServiceObserver:
    def twin(name: str, doc: str) -> Twin:
        return Twin(registry, (f"llamacpp:{name}", f"mlxd_chat_{name}"), doc)

    prompt_tokens = twin("prompt_tokens", "Prompt tokens processed (the prefix cache's included)")
    prompt_seconds = twin("prompt_seconds", "Seconds spent reading prompts")
    predicted = twin("tokens_predicted", "Tokens generated, all choices")
    predicted_seconds = twin("tokens_predicted_seconds", "Seconds spent generating")
    for name, top, bottom, what in (
        ("prompt_tokens_seconds", prompt_tokens, prompt_seconds, "prompt"),
        ("predicted_tokens_seconds", predicted, predicted_seconds, "generation"),
    ):
        ratio_gauge(registry, f"llamacpp:{name}", f"Average {what} tokens/s", top, bottom)
    ttft = Histogram(
        "mlxd_chat_time_to_first_token_seconds",
        "Seconds from a request's arrival at the queue to its first generated token",
        buckets=SECONDS_BUCKETS,
        registry=registry,
    )
    gaps = Histogram(
        "mlxd_chat_inter_token_seconds",
        "Seconds between consecutive tokens of one choice",
        buckets=GAP_BUCKETS,
        registry=registry,
    )
    hits = Counter(
        "mlxd_chat_prefix_cache_hits",
        "Replies whose prompt the prefix cache served in part",
        registry=registry,
    )
    cached = Counter(
        "mlxd_chat_prefix_cache_tokens", "Prompt tokens the prefix cache served", registry=registry
    )
    finishes = Counter(
        "mlxd_chat_finish_reasons", "Choices ended, by finish reason", ["reason"], registry=registry
    )

    def observe(job: Job, outcome: ChatOutcome) -> None:
        if not outcome.finish_reasons:  # a prompt counted, nothing generated
            return
        prompt_tokens.inc(outcome.prompt_tokens)
        prompt_seconds.inc(outcome.prompt_ms / 1000)
        predicted.inc(outcome.completion_tokens)
        predicted_seconds.inc(outcome.predicted_ms / 1000)
        if outcome.cached_tokens:
            hits.inc()
            cached.inc(outcome.cached_tokens)
        for reason in outcome.finish_reasons:
            finishes.labels(reason).inc()
        times = token_times(job)
        if times:
            ttft.observe(min(t[0] for t in times.values()) - job.enqueued_at)
        for choice in times.values():
            for before, after in zip(choice, choice[1:], strict=False):
                gaps.observe(after - before)

    return observe


def token_times(job: Job) -> dict[int, list[float]]:
    """When each choice's tokens were sent, by choice index."""
    times: dict[int, list[float]] = {}
    for at, item in job.timeline:
        if isinstance(item, Piece) and item.token is not None:
            times.setdefault(item.index, []).append(at)
    return times
