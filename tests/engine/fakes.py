"""Pure-Python stand-ins for the model runners, for route and validation tests (tier 1)."""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from engine import services
from engine.chat.types import RowFailed, RowStep
from engine.config import Config
from engine.store import ModelInfo


class FakeEmbeddings:
    model_id = "fake-bert"
    hidden_size = 8
    max_tokens = 16
    pooling = "cls"

    def __init__(self) -> None:
        self.batches: list[int] = []

    def vocab_size(self) -> int:
        return 300

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        return [[101, *[ord(c) % 200 + 1 for c in text], 102] for text in texts]

    def embed(self, token_lists: list[list[int]]) -> np.ndarray:
        self.batches.append(len(token_lists))
        rows = []
        for tokens in token_lists:
            seed = int(hashlib.sha256(str(tokens).encode()).hexdigest()[:8], 16)
            vector = np.random.default_rng(seed).standard_normal(self.hidden_size)
            rows.append(vector / np.linalg.norm(vector))
        return np.asarray(rows, dtype=np.float32)


@dataclass
class FakePrompt:
    text: str
    n_tokens: int


@dataclass
class FakeStep:
    text: str
    token: int | None
    finish_reason: str | None
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    stop_sequence: str | None = None


DEFAULT_WORDS = ("Hello", " world", ",", " this", " is", " fake", ".") * 10


class FakeChat:
    """Plays back ``script`` (one string per token) as the real runner would decode it.

    Honours max_tokens, stop strings (cut, not emitted), cancellation and logprobs, and records
    what it was asked for in ``calls``. With ``eos`` an end-of-turn token follows the script.
    """

    model_id = "fake-gemma"
    context_length = 64
    eos_token_ids = frozenset({1})

    def __init__(
        self,
        gate: threading.Event | None = None,
        script: tuple[str, ...] = DEFAULT_WORDS,
        eos: bool = False,
        prompt_suffix: str = "",
    ) -> None:
        self.gate = gate
        self.script = tuple(script)
        self.eos = eos
        self.prompt_suffix = prompt_suffix
        self.calls: list[dict[str, Any]] = []

    def generation_defaults(self) -> dict[str, Any]:
        return {"temperature": 1.0, "top_p": 0.95, "top_k": 64}

    def prepare(
        self, messages, images, *, audio=(), enable_thinking=None, tools=None
    ) -> FakePrompt:
        text = " ".join(
            m["content"] if isinstance(m["content"], str) else "<image>"
            for m in messages
            if m["content"]
        )
        self.calls.append(
            {
                "messages": messages,
                "images": images,
                "audio": audio,
                "thinking": enable_thinking,
                "tools": tools,
            }
        )
        return FakePrompt(text + self.prompt_suffix, len(text.split()) + 2 * len(images))

    def prepare_raw(self, text: str) -> FakePrompt:
        self.calls.append({"prompt": text})
        return FakePrompt(text + self.prompt_suffix, len(text.split()))

    def decode_token(self, token: int) -> str:
        return self.script[token - 100] if 0 <= token - 100 < len(self.script) else f"<{token}>"

    def default_kv_tokens(self) -> int:
        return 4096

    def open_batch(self, *, max_batch: int, prefill_chunk: int, cache_bytes: int) -> FakeBatch:
        return FakeBatch(self, max_batch)

    def generate(self, prompt, params, is_cancelled):
        from engine.chat.types import StopMatcher

        self.calls[-1]["params"] = params
        stops = StopMatcher(params.stop)
        words = self.script[: params.max_tokens]
        cut = len(words) < len(self.script) or (self.eos and len(words) == params.max_tokens)
        for i, word in enumerate(words):
            if self.gate is not None:
                self.gate.wait(5)
            if is_cancelled():
                yield FakeStep("", None, "cancelled")
                return
            text, stopped = stops.feed(word)
            extra = {}
            if params.logprobs is not None:
                extra = {"logprob": -0.5, "top_logprobs": ((100 + i, -0.5), (7, -1.5))}
            last = i == len(words) - 1
            if stopped or (last and (cut or not self.eos)):
                reason = "stop" if stopped or not cut else "length"
                text += "" if stopped else stops.flush()
                yield FakeStep(text, 100 + i, reason, stop_sequence=stops.matched, **extra)
                return
            yield FakeStep(text, 100 + i, None, **extra)
        yield FakeStep(stops.flush(), 1, "stop")


class FakeBatch:
    """Plays each row's script one token a step, in the order rows were added; honours the
    row limit like the real batch (a row past it waits)."""

    def __init__(self, chat: FakeChat, max_batch: int) -> None:
        self.chat, self.max_batch = chat, max_batch
        self.rows: dict[tuple[Any, int], Any] = {}
        self.held: list[RowStep] = []
        self.steps = 0

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def kv_tokens(self) -> int:
        return 0

    def add(self, rid: Any, prompt: Any, params: Any, n: int = 1) -> None:
        for index in range(n):
            self.rows[(rid, index)] = self.chat.generate(prompt, params, lambda: False)

    def remove(self, rid: Any, index: int | None = None) -> None:
        for key in [k for k in self.rows if k[0] == rid and index in (None, k[1])]:
            del self.rows[key]

    def step(self) -> list[RowStep]:
        """Like the real batch, a row that fails ends only itself: the others' tokens of this
        step come with the next call."""
        self.steps += 1
        out, self.held = self.held, []
        if out:
            return out
        failed = None
        for (rid, index), steps in list(self.rows.items())[: self.max_batch]:
            try:
                step = next(steps)
            except Exception as exc:
                failed = failed or (rid, exc)
                continue
            out.append(RowStep(rid, index, step, None))
            if step.finish_reason is not None:
                del self.rows[(rid, index)]
        if failed is not None:
            self.held = out
            raise RowFailed(failed[0]) from failed[1]
        return out


class FakeSpeech:
    model_id = "fake-whisper"

    def detect_language(self, audio, *, on_window=lambda: None) -> dict[str, float]:
        on_window()
        return {"en": 0.9, "de": 0.1}

    def transcribe(
        self,
        audio,
        *,
        language,
        task="transcribe",
        temperature=(0.0,),
        initial_prompt=None,
        word_timestamps=False,
        language_probs=False,
        on_window=lambda: None,
        **decode_options,
    ) -> dict:
        seconds = len(audio) / 16000
        segment = {"id": 0, "start": 0.0, "end": seconds, "text": " Fake words.", "tokens": [1]}
        return {"text": " Fake words.", "segments": [segment], "language": "en"}

    def transcribe_pieces(
        self,
        pieces,
        *,
        batch,
        language,
        task="transcribe",
        temperature=(0.0,),
        initial_prompt=None,
        word_timestamps=False,
        language_probs=False,
        on_window=lambda: None,
        **decode_options,
    ) -> dict:
        segments = []
        for audio, start in pieces:
            on_window()
            at = start / 16000
            end = at + len(audio) / 16000
            segments.append({"id": len(segments), "start": at, "end": end, "text": " Fake words."})
            segments[-1]["tokens"] = [1]
        text = "".join(s["text"] for s in segments)
        return {"text": text, "segments": segments, "language": "en"}


def fake_spec(service: str, runner: Any = None, *, load_gate: threading.Event | None = None):
    """The service's real spec (routes, policy) with a fake runner loader."""
    real = services.spec(service)
    made = runner or {"chat": FakeChat, "embeddings": FakeEmbeddings, "stt": FakeSpeech}[service]()

    def load(model: ModelInfo, config: Config) -> Any:
        if load_gate is not None:
            load_gate.wait(30)
        return made

    return replace(real, load=load), made


def fake_model_dir(root: Path, kind: str) -> Path:
    """A directory the store resolves; the fake loaders never read its weights."""
    directory = root / f"fake-{kind}"
    directory.mkdir(parents=True, exist_ok=True)
    config = {"chat": {"model_type": "gemma4"}, "embeddings": {"model_type": "bert"}}
    import json

    (directory / "config.json").write_text(json.dumps(config.get(kind, {"n_audio_state": 8})))
    return directory
