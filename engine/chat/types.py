"""Plain data the chat handler, decode loop and runner exchange (no MLX: cheap to import)."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

# llguidance JSON options: compact separators, no free whitespace (a model cannot pad forever).
JSON_OPTIONS = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "lenient": True,
}


@dataclass(frozen=True)
class Constraint:
    """Constrained decoding of the answer (llguidance), built into a grammar by the runner.

    ``tools`` non-empty: the answer is one Gemma 4 tool call to one of these (name, JSON text
    of its parameters schema). Otherwise the answer is JSON matching ``json_schema`` (JSON
    text; None: any JSON object).
    """

    json_schema: str | None = None
    tools: tuple[tuple[str, str], ...] = ()
    after_thinking: bool = False  # let a leading <|channel>...<channel|> block through first


@dataclass(frozen=True)
class ChatParams:
    max_tokens: int | None  # None = up to the context length
    temperature: float
    top_p: float
    top_k: int
    min_p: float
    seed: int | None
    stop: tuple[str, ...]  # generation ends there; the stop text is not emitted
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logprobs: int | None = None  # None: off; 0: the chosen token's; n: plus the top n
    constraint: Constraint | None = None


@dataclass
class ChatStep:
    text: str  # new decoded text since the previous step (whole characters only)
    token: int | None
    finish_reason: str | None  # None until the last step: "stop", "length" or "cancelled"
    logprob: float | None = None  # only when ChatParams.logprobs is not None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    stop_sequence: str | None = None  # the stop string that ended the reply, if one did


@dataclass(frozen=True)
class RowStep:
    """One decoded token of one reply (choice `index` of request `rid`)."""

    rid: Hashable
    index: int
    step: ChatStep
    cached_tokens: int | None  # prompt tokens the prefix cache served; on the first step only


class RowFailed(Exception):
    """One reply's own processing failed inside a batched step (its constraint, say); raised
    from the original error, so the batch ends that reply only."""

    def __init__(self, rid: Hashable) -> None:
        super().__init__(f"reply {rid!r} failed")
        self.rid = rid


class PromptTooLongError(ValueError):
    """The prompt does not fit the context (llama-server: exceed_context_size_error)."""

    def __init__(self, n_prompt_tokens: int, n_ctx: int) -> None:
        super().__init__(
            f"the request exceeds the available context size: the prompt has "
            f"{n_prompt_tokens} tokens and the context holds {n_ctx}"
        )
        self.n_prompt_tokens = n_prompt_tokens
        self.n_ctx = n_ctx


class StopMatcher:
    """Cuts the stream at the first stop string, holding back a possible stop prefix."""

    def __init__(self, stops: tuple[str, ...]) -> None:
        self.stops = tuple(s for s in stops if s)
        self.pending = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Returns (text safe to emit, whether a stop string was found)."""
        self.pending += text
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            first = min(hits)
            self.matched = next(s for s in self.stops if self.pending.find(s) == first)
            out, self.pending = self.pending[:first], ""
            return out, True
        hold = self._held_length()
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out

    def _held_length(self) -> int:
        longest = max((len(s) for s in self.stops), default=1)
        for k in range(min(len(self.pending), longest - 1), 0, -1):
            tail = self.pending[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


# ---- events from the decode loop to the handler --------------------------------------------


@dataclass(frozen=True)
class Started:
    prompt_tokens: int
    reasoning_open: bool = False  # the rendered prompt ends inside a thought channel


@dataclass(frozen=True)
class Piece:
    text: str
    token: int | None
    logprob: dict[str, Any] | None = None
    index: int = 0  # the choice it belongs to (n > 1)


@dataclass
class ChatOutcome:
    finish_reasons: list[str] = field(default_factory=lambda: ["stop"])  # one per choice
    stop_sequences: dict[int, str] = field(default_factory=dict)  # choice -> stop string hit
    prompt_tokens: int = 0
    completion_tokens: int = 0  # all choices together
    cached_tokens: int = 0  # prompt tokens the prefix cache served
    prompt_ms: float = 0.0
    predicted_ms: float = 0.0
