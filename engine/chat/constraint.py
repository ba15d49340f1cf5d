"""Constrained decoding of the answer: llguidance grammars and the logits processor that
applies them after an optional thinking block (model thread; MLX)."""

from __future__ import annotations

import json
from typing import Any

import mlx.core as mx

from engine.chat.types import JSON_OPTIONS


def json_grammar(schema: str | None) -> str:
    """The llguidance grammar of a JSON schema (None: any JSON object); pure, no MLX."""
    import llguidance

    text = schema if schema is not None else '{"type": "object"}'
    return llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)


def tool_call_grammar(tools: tuple[tuple[str, str], ...], open_id: int, close_id: int) -> str:
    """A Lark grammar for one ``<|tool_call>call:NAME{json args}<tool_call|>``."""
    import llguidance

    def call(name: str, schema: str) -> str:
        body = json.loads(schema) if schema else {}
        body = body if isinstance(body, dict) and body else {"type": "object"}
        body = {**body, "x-guidance": JSON_OPTIONS}
        return f"{json.dumps(name)} %json {json.dumps(body)}"

    choices = " | ".join(call(name, schema) for name, schema in tools)
    lark = f'start: <[{open_id}]> "call:" ({choices}) <[{close_id}]>\n'
    return llguidance.LLMatcher.grammar_from_lark(lark)


class AnswerConstraint:
    """A logits processor that keeps the answer inside an llguidance grammar.

    Called once per generated token, before sampling; the token sampled last is the last
    entry of ``tokens`` from the second call on. With ``think_open`` set, the model may first
    write a whole ``<|channel>...<channel|>`` block unconstrained; the grammar applies after.
    """

    def __init__(
        self,
        matcher: Any,
        *,
        think_open: int | None,
        think_close: int | None,
        eos_ids: frozenset[int],
    ) -> None:
        self.matcher = matcher
        self.think_open, self.think_close = think_open, think_close
        self.eos_ids = sorted(eos_ids)
        self.state = "start"  # -> "thinking" -> "answer", or "start" -> "answer"
        self.calls = 0
        self.seen = 0  # length of `tokens` at the last call

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # `tokens` grows by the sampled token each step; a repeated call (a batched step that
        # was retried) consumes nothing twice.
        if self.calls and tokens.size > self.seen:
            self._consume(int(tokens.reshape(-1)[-1].item()))
        self.calls += 1
        self.seen = tokens.size
        if self.state == "thinking":
            return logits
        allowed = self._allowed(logits.shape[-1])
        if self.state == "start" and self.think_open is not None:
            allowed[self.think_open] = True
        return mx.where(mx.array(allowed), logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _consume(self, token: int) -> None:
        if self.state == "start" and token == self.think_open:
            self.state = "thinking"
        elif self.state == "thinking":
            if token == self.think_close:
                self.state = "answer"
        else:
            self.state = "answer"
            self.matcher.consume_token(token)

    def _allowed(self, width: int) -> Any:
        import numpy as np

        allowed = np.zeros(width, dtype=bool)
        if self.matcher.is_error() or self.matcher.is_stopped():
            allowed[[i for i in self.eos_ids if i < width]] = True
            return allowed
        bits = np.frombuffer(self.matcher.compute_bitmask(), dtype=np.uint8)
        mask = np.unpackbits(bits, bitorder="little").astype(bool)[:width]
        allowed[: mask.shape[0]] = mask
        return allowed
