"""OpenAI's legacy `POST /v1/completions` on the chat port: raw text in, no chat template.

`prompt` is a string or an array of strings (each its own job, its choices indexed after the
previous prompt's). Unlike OpenAI (16), `max_tokens` unset means up to the context, as
llama-server does. `suffix` (fill-in-the-middle) is refused: Gemma has no such mode.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from sanic import HTTPResponse, Request
from sanic.response import json as json_response

from engine.app import resolve_requested_model
from engine.chat import jobs
from engine.chat.request import (
    ChatRequest,
    parse_max_tokens,
    parse_n,
    parse_sampling,
    parse_stop,
)
from engine.chat.response import FINGERPRINT
from engine.chat.types import ChatOutcome, Piece
from engine.errors import ApiError, InvalidRequest
from engine.validation import optional_bool, optional_number, parse_json_body, wrong_type

MAX_PROMPTS = 16
MAX_LOGPROBS = 5  # as OpenAI


def parse_prompts(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
        if len(value) > MAX_PROMPTS:
            raise InvalidRequest(
                f"'prompt' has {len(value)} entries; the limit is {MAX_PROMPTS}", param="prompt"
            )
        return value
    if isinstance(value, list) and value and all(isinstance(p, int | list) for p in value):
        raise InvalidRequest(
            "'prompt' as token ids is not supported: send the text", param="prompt"
        )
    if value is None:
        raise InvalidRequest("'prompt' is required", param="prompt")
    raise wrong_type("prompt", "a string or a non-empty array of strings", value)


def parse_body(request: Request, body: dict[str, Any]) -> tuple[list[ChatRequest], bool]:
    """One ChatRequest per prompt, and whether to echo the prompt."""
    prompts = parse_prompts(body.get("prompt"))
    if body.get("suffix") not in (None, ""):
        raise InvalidRequest("'suffix' (insertion) is not supported by this model", param="suffix")
    logprobs = optional_number(body, "logprobs", minimum=0, maximum=MAX_LOGPROBS, integer=True)
    echo = optional_bool(body, "echo")
    if echo and logprobs is not None:
        raise InvalidRequest(
            "'echo' with 'logprobs' is not supported: prompt tokens are not scored",
            param="logprobs",
        )
    best_of = optional_number(body, "best_of", minimum=1, integer=True)
    n = parse_n(body, request.app.ctx.config.chat_batch)
    if best_of not in (None, n):
        raise InvalidRequest("'best_of' other than 'n' is not supported", param="best_of")
    common = {
        "messages": [],
        "images": [],
        "sampling": parse_sampling(body),
        "max_tokens": parse_max_tokens(body),
        "stop": parse_stop(body.get("stop")),
        "enable_thinking": None,
        "tools": None,
        "logprobs": None if logprobs is None else int(logprobs),
        "n": n,
    }
    return [ChatRequest(**common, prompt=text) for text in prompts], echo


# ---- reply -----------------------------------------------------------------------------------


class Choice:
    """One choice's text and (legacy-shaped) logprobs as they build up."""

    def __init__(self, index: int, echo: str) -> None:
        self.index, self.text = index, echo
        self.logprobs: dict[str, list[Any]] = {
            "tokens": [],
            "token_logprobs": [],
            "top_logprobs": [],
            "text_offset": [],
        }

    def add(self, piece: Piece) -> None:
        if piece.logprob is not None:
            entry = piece.logprob
            self.logprobs["tokens"].append(entry["token"])
            self.logprobs["token_logprobs"].append(entry["logprob"])
            top = {t["token"]: t["logprob"] for t in entry.get("top_logprobs", [])}
            self.logprobs["top_logprobs"].append(top)
            self.logprobs["text_offset"].append(len(self.text))
        self.text += piece.text


def choice_body(
    choice: Choice, text: str, finish: str | None, with_logprobs: bool
) -> dict[str, Any]:
    return {
        "text": text,
        "index": choice.index,
        "logprobs": choice.logprobs if with_logprobs else None,
        "finish_reason": finish,
    }


def usage(outcomes: list[ChatOutcome]) -> dict[str, Any]:
    prompt = sum(o.prompt_tokens for o in outcomes)
    completion = sum(o.completion_tokens for o in outcomes)
    cached = sum(o.cached_tokens for o in outcomes)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
    }


def envelope(meta: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": meta["id"],
        "object": "text_completion",
        "created": meta["created"],
        "model": meta["model"],
        "system_fingerprint": FINGERPRINT,
    }


# ---- routes ---------------------------------------------------------------------------------


async def create(request: Request) -> HTTPResponse | None:
    body = parse_json_body(request)
    model = resolve_requested_model(request, body.get("model"))
    stream = optional_bool(body, "stream")
    stream_options = body.get("stream_options") or {}
    if not isinstance(stream_options, dict):
        raise wrong_type("stream_options", "an object", stream_options)
    chats, echo = parse_body(request, body)
    runs = await jobs.start_all(request, chats)
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model}
    with_logprobs = chats[0].logprobs is not None
    if stream:
        include_usage = bool(stream_options.get("include_usage"))
        await _stream(request, runs, meta, echo, with_logprobs, include_usage)
        return None
    out, outcomes = [], []
    for p, (chat, run) in enumerate(zip(chats, runs, strict=True)):
        choices = [Choice(p * chat.n + i, chat.prompt if echo else "") for i in range(chat.n)]
        async for piece in jobs.pieces(run):
            choices[piece.index].add(piece)
        outcome = await run.job.result()
        outcomes.append(outcome)
        for i, choice in enumerate(choices):
            finish = outcome.finish_reasons[i]
            out.append(choice_body(choice, choice.text, finish, with_logprobs))
    return json_response({**envelope(meta), "choices": out, "usage": usage(outcomes)})


async def _stream(
    request: Request,
    runs: list[jobs.Running],
    meta: dict[str, Any],
    echo: bool,
    with_logprobs: bool,
    include_usage: bool,
) -> None:
    """A chunk per choice and batch of pieces (text and its logprobs), a last chunk per choice
    with its finish_reason, then [DONE]. Several prompts stream one after the other."""
    outcomes = []
    async with jobs.EventStream(request, ": keepalive\n\n") as stream:
        for p, run in enumerate(runs):
            choices = [Choice(p * run.chat.n + i, "") for i in range(run.chat.n)]
            if echo:
                await stream.send("".join(_chunk(meta, c, run.chat.prompt, None) for c in choices))
            async for pieces in stream.batches(run):
                await stream.send(_piece_chunks(meta, choices, pieces, with_logprobs))
            if stream.gone:
                return
            try:
                outcome: ChatOutcome = await run.job.result()
            except ApiError as exc:
                await stream.send(f"data: {json.dumps(exc.body())}\n\n")
                await stream.end()
                return
            outcomes.append(outcome)
            tails = [_chunk(meta, c, "", outcome.finish_reasons[i]) for i, c in enumerate(choices)]
            await stream.send("".join(tails))
        if include_usage:
            last = {**envelope(meta), "choices": [], "usage": usage(outcomes)}
            await stream.send(f"data: {json.dumps(last)}\n\n")
        await stream.send("data: [DONE]\n\n")
        await stream.end()


def _piece_chunks(
    meta: dict[str, Any], choices: list[Choice], pieces: list[Piece], with_logprobs: bool
) -> str:
    """The pieces that arrived together: one chunk per choice."""
    groups: dict[int, list[Piece]] = {}
    for piece in pieces:
        groups.setdefault(piece.index, []).append(piece)
    out = []
    for index, group in groups.items():
        choice = choices[index]
        seen = len(choice.logprobs["tokens"])
        for piece in group:
            choice.add(piece)
        new = {key: values[seen:] for key, values in choice.logprobs.items()}
        text = "".join(piece.text for piece in group)
        out.append(_chunk(meta, choice, text, None, new if with_logprobs else None))
    return "".join(out)


def _chunk(
    meta: dict[str, Any],
    choice: Choice,
    text: str,
    finish: str | None,
    logprobs: dict[str, Any] | None = None,
) -> str:
    body = {"text": text, "index": choice.index, "logprobs": logprobs, "finish_reason": finish}
    return f"data: {json.dumps({**envelope(meta), 'choices': [body]}, ensure_ascii=False)}\n\n"
