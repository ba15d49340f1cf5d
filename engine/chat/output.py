"""Split a Gemma 4 reply, delta by delta, into reasoning, content and tool calls.

The runner hands over decoded text with the control tokens in it. Gemma 4 writes its thinking
as ``<|channel>thought\\n...<channel|>`` and a tool call as
``<|tool_call>call:NAME{key:<|"|>value<|"|>}<tool_call|>``. ``OutputParser.feed`` takes any
slice of that text and returns what is safe to show now; a possible partial marker at the end
is held back until the next slice (or ``finish``) settles it. Streamed and non-streamed replies
use the same parser, so both say the same thing.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any

from engine.chat.gemma_tokens import (
    CHANNEL_NAME,
    HIDDEN,
    STRING_DELIM,
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
)

MARKERS = (THINK_OPEN, THINK_CLOSE, TOOL_CALL_OPEN, TOOL_CALL_CLOSE, *HIDDEN)


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def as_dict(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {} if index is None else {"index": index}
        out.update(
            {
                "id": self.id,
                "type": "function",
                "function": {"name": self.name, "arguments": self.arguments},
            }
        )
        return out


@dataclass
class Delta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.content or self.reasoning or self.tool_calls)

    def extend(self, other: Delta) -> None:
        self.content += other.content
        self.reasoning += other.reasoning
        self.tool_calls.extend(other.tool_calls)


class OutputParser:
    """Streaming splitter; ``reasoning=True`` when the prompt already opened a thought channel."""

    def __init__(self, *, reasoning: bool = False, tools: bool = True) -> None:
        self.mode = "reasoning" if reasoning else "content"
        self.tools = tools
        self.pending = ""  # text not yet classified (may end in a partial marker)
        self.head = reasoning  # the channel name may still follow
        self.head_text = ""
        self.tool_text = ""
        self.return_mode = "content"

    # ---- public ------------------------------------------------------------------------

    def feed(self, text: str) -> Delta:
        self.pending += text
        out = Delta()
        while self.pending:
            at, marker = self._next_marker()
            if marker is None:
                keep = _partial_marker_length(self.pending)
                self._emit(self.pending[: len(self.pending) - keep], out)
                self.pending = self.pending[len(self.pending) - keep :]
                break
            self._emit(self.pending[:at], out)
            self.pending = self.pending[at + len(marker) :]
            self._marker(marker, out)
        return out

    def finish(self) -> Delta:
        """Settle everything held back (end of generation)."""
        out = Delta()
        rest, self.pending = self.pending, ""
        self._emit(rest, out)
        if self.mode == "tool":
            self._close_tool(out, complete=False)
        if self.head:
            self._flush_head(out, final=True)
        return out

    # ---- internals -----------------------------------------------------------------------

    def _next_marker(self) -> tuple[int, str | None]:
        if self.mode == "tool":
            at = self.pending.find(TOOL_CALL_CLOSE)
            return (at, TOOL_CALL_CLOSE) if at >= 0 else (-1, None)
        best, found = len(self.pending), None
        for marker in MARKERS:
            at = self.pending.find(marker)
            if at >= 0 and (at < best or (at == best and len(marker) > len(found or ""))):
                best, found = at, marker
        return (best, found) if found is not None else (-1, None)

    def _emit(self, text: str, out: Delta) -> None:
        if not text:
            return
        if self.mode == "tool":
            self.tool_text += text
        elif self.mode == "reasoning":
            if self.head:
                self.head_text += text
                self._flush_head(out, final=False)
            else:
                out.reasoning += text
        else:
            out.content += text

    def _flush_head(self, out: Delta, *, final: bool) -> None:
        """Drop the channel name ("thought" and its newline) at the start of reasoning."""
        text = self.head_text
        name = CHANNEL_NAME + "\n"
        if not final and len(text) < len(name) and name.startswith(text):
            return
        if text.startswith(name):
            text = text[len(name) :]
        elif text.strip() == CHANNEL_NAME:
            text = ""
        self.head, self.head_text = False, ""
        out.reasoning += text

    def _marker(self, marker: str, out: Delta) -> None:
        if marker == THINK_OPEN and self.mode == "content":
            self.mode, self.head, self.head_text = "reasoning", True, ""
        elif marker == THINK_CLOSE and self.mode == "reasoning":
            if self.head:
                self._flush_head(out, final=True)
            self.mode = "content"
        elif marker == TOOL_CALL_OPEN:
            self.return_mode, self.mode, self.tool_text = self.mode, "tool", ""
            if self.head:
                self._flush_head(out, final=True)
        elif marker == TOOL_CALL_CLOSE and self.mode == "tool":
            self._close_tool(out, complete=True)
        # every other control token is dropped

    def _close_tool(self, out: Delta, *, complete: bool) -> None:
        text, self.tool_text = self.tool_text, ""
        self.mode = self.return_mode if self.return_mode != "tool" else "content"
        calls = parse_tool_calls(text) if (self.tools and complete) else None
        if calls is None:
            out.content += text.replace(STRING_DELIM, '"')
        else:
            out.tool_calls.extend(calls)


def _partial_marker_length(text: str) -> int:
    """Length of the longest tail of ``text`` that is a proper prefix of a marker."""
    longest = max(len(m) for m in MARKERS)
    for start in range(max(0, len(text) - longest + 1), len(text)):
        if text[start] == "<":
            tail = text[start:]
            if any(m.startswith(tail) and m != tail for m in MARKERS):
                return len(text) - start
    return 0


# ---- Gemma 4 tool-call syntax ------------------------------------------------------------


class _ArgumentSyntaxError(ValueError):
    pass


def parse_tool_calls(text: str) -> list[ToolCall] | None:
    """``call:NAME{...}`` (one or more) to ToolCalls with JSON arguments; None if malformed."""
    calls: list[ToolCall] = []
    rest = text.strip()
    try:
        while rest:
            if not rest.startswith("call:"):
                return None
            brace = rest.find("{")
            name = rest[len("call:") : brace].strip() if brace > 0 else ""
            if not name or not all(c.isalnum() or c in "_-." for c in name):
                return None
            value, end = _arguments(rest, brace)
            calls.append(ToolCall(name, json.dumps(value, ensure_ascii=False)))
            rest = rest[end:].strip().lstrip(",").strip()
    except _ArgumentSyntaxError:
        return None
    return calls or None


def _arguments(text: str, at: int) -> tuple[dict[str, Any], int]:
    """The argument object at ``text[at]``: plain JSON, or Gemma 4's own notation."""
    try:
        value, end = json.JSONDecoder().raw_decode(text, at)
    except json.JSONDecodeError:
        return _ArgReader(text, at).object()
    if not isinstance(value, dict):
        raise _ArgumentSyntaxError("the arguments are not an object")
    return value, end


class _ArgReader:
    """Reads Gemma 4's argument notation: bare keys, <|"|>-quoted strings, JSON-like values."""

    def __init__(self, text: str, at: int) -> None:
        self.text, self.at = text, at

    def object(self) -> tuple[dict[str, Any], int]:
        return self._object(), self.at

    def _skip(self) -> None:
        while self.at < len(self.text) and self.text[self.at] in " \t\r\n":
            self.at += 1

    def _expect(self, char: str) -> None:
        self._skip()
        if not self.text.startswith(char, self.at):
            raise _ArgumentSyntaxError(f"expected {char!r} at {self.at}")
        self.at += len(char)

    def _object(self) -> dict[str, Any]:
        self._expect("{")
        out: dict[str, Any] = {}
        self._skip()
        if self.text.startswith("}", self.at):
            self.at += 1
            return out
        while True:
            key = self._key()
            self._expect(":")
            out[key] = self._value()
            self._skip()
            if self.text.startswith(",", self.at):
                self.at += 1
                continue
            self._expect("}")
            return out

    def _key(self) -> str:
        self._skip()
        if self.text.startswith(STRING_DELIM, self.at) or self.text.startswith('"', self.at):
            return self._string()
        start = self.at
        while self.at < len(self.text) and self.text[self.at] not in ":{}[],\n":
            self.at += 1
        key = self.text[start : self.at].strip()
        if not key:
            raise _ArgumentSyntaxError(f"empty key at {start}")
        return key

    def _string(self) -> str:
        for quote in (STRING_DELIM, '"'):
            if self.text.startswith(quote, self.at):
                end = self.text.find(quote, self.at + len(quote))
                if end < 0:
                    raise _ArgumentSyntaxError("unterminated string")
                value = self.text[self.at + len(quote) : end]
                self.at = end + len(quote)
                return value
        raise _ArgumentSyntaxError(f"expected a string at {self.at}")

    def _value(self) -> Any:
        self._skip()
        if self.text.startswith("{", self.at):
            return self._object()
        if self.text.startswith("[", self.at):
            return self._array()
        if self.text.startswith(STRING_DELIM, self.at) or self.text.startswith('"', self.at):
            return self._string()
        return self._scalar()

    def _array(self) -> list[Any]:
        self._expect("[")
        out: list[Any] = []
        self._skip()
        if self.text.startswith("]", self.at):
            self.at += 1
            return out
        while True:
            out.append(self._value())
            self._skip()
            if self.text.startswith(",", self.at):
                self.at += 1
                continue
            self._expect("]")
            return out

    def _scalar(self) -> Any:
        start = self.at
        while self.at < len(self.text) and self.text[self.at] not in ",}]\n":
            self.at += 1
        word = self.text[start : self.at].strip()
        if word in ("true", "false", "null"):
            return {"true": True, "false": False, "null": None}[word]
        try:
            return json.loads(word)
        except json.JSONDecodeError:
            if not word:
                raise _ArgumentSyntaxError(f"missing value at {start}") from None
            return word  # a bare word: keep it as a string
