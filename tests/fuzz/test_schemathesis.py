"""Schemathesis against each service's /openapi.json, served with fake runners: data that fits
the document and data that does not, and every answer a documented status and content type in
the documented shape, never a 5xx. Bounded and derandomized, so a run is reproducible and takes
about a minute and a half on two cores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.fuzz.live import SERVICES, live
from tests.wav_files import int_wav

EXAMPLES = 30  # per operation and generation mode
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
# A real clip, so that speech forms also reach the model (random bytes are a 400 invalid_audio).
CLIP = int_wav((np.sin(np.arange(8000) / 8) * 8000).astype(np.int16), 16000)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("service", SERVICES)
def test_every_operation_answers_as_documented(
    tmp_path: Path, service: str, mode: GenerationMode
) -> None:
    with live(tmp_path, service, queue_size=64) as url:
        schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        cases = st.one_of(*(op.as_strategy(generation_mode=mode) for op in operations))

        @given(case=cases, real_audio=st.booleans())
        @settings(
            max_examples=EXAMPLES * len(operations),
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        def check(case, real_audio: bool) -> None:
            if real_audio and isinstance(case.body, dict) and "file" in case.body:
                case.body["file"] = CLIP
            case.call_and_validate(base_url=url, checks=CHECKS, timeout=20)

        check()
