"""Speech's counters on /metrics: audio seconds transcribed and the real-time factor (model
thread, per transcription)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

from engine.audio import SAMPLE_RATE
from engine.metrics import ServiceObserver
from engine.modelthread import Job
from engine.speech.request import SttJob

RTF_BUCKETS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1, 1.5, 2, 5, 10)


def observer(registry: CollectorRegistry) -> ServiceObserver:
    audio = Counter("mlxd_stt_audio_seconds", "Seconds of audio transcribed", registry=registry)
    busy = Counter(
        "mlxd_stt_processing_seconds", "Model-thread seconds spent transcribing", registry=registry
    )
    rtf = Histogram(
        "mlxd_stt_real_time_factor",
        "Processing seconds per audio second, per transcription (under 1: faster than real time)",
        buckets=RTF_BUCKETS,
        registry=registry,
    )

    def observe(job: Job, result: dict) -> None:
        request: SttJob = job.payload
        seconds = len(request.audio) / SAMPLE_RATE
        spent = (job.finished_at or 0.0) - (job.started_at or 0.0)
        audio.inc(seconds)
        busy.inc(spent)
        if seconds > 0:
            rtf.observe(spent / seconds)

    return observe
