"""Real runners and their test fakes implement the same typed interface, so changing a runner's
signature breaks its fake (and the tests that rely on it) too."""

from __future__ import annotations

import pytest

from engine.chat.decode import ChatModel
from engine.chat.runner import ChatRunner
from engine.embeddings.decode import EmbeddingsModel
from engine.embeddings.runner import EmbeddingsRunner
from engine.speech.decode import SpeechModel
from engine.speech.runner import SpeechRunner
from tests.engine.fakes import FakeChat, FakeEmbeddings, FakeSpeech
from tests.protocols import mismatches


@pytest.mark.parametrize(
    ("implementation", "protocol"),
    [
        (ChatRunner, ChatModel),
        (FakeChat, ChatModel),
        (EmbeddingsRunner, EmbeddingsModel),
        (FakeEmbeddings, EmbeddingsModel),
        (SpeechRunner, SpeechModel),
        (FakeSpeech, SpeechModel),
    ],
)
def test_implements(implementation: type, protocol: type) -> None:
    assert mismatches(implementation, protocol) == []


def test_a_changed_signature_is_caught() -> None:
    class Drifted(FakeEmbeddings):
        def embed(self, token_lists, normalize):  # type: ignore[override]
            return super().embed(token_lists)

    assert mismatches(Drifted, EmbeddingsModel) != []
