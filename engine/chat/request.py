"""Parse and validate an OpenAI chat completions body into a ChatRequest (event-loop side).

Every client mistake is an InvalidRequest naming the field. Images and audio clips are decoded
here, off the model thread, once the request holds its queue slot and its images are within
--chat-max-images and, by their headers, --chat-max-image-pixels; nothing in this module imports
MLX. A prompt whose characters cannot fit the context is refused before it is tokenized.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from sanic import Request

from engine.chat.audio_input import AUDIO_PART, AudioClip, AudioRef, decode_clips, parse_input_audio
from engine.chat.types import Constraint
from engine.errors import InvalidRequest
from engine.lifecycle import admitted
from engine.validation import (
    optional_bool,
    optional_number,
    optional_object,
    required,
    wrong_type,
)

ROLES = ("system", "developer", "user", "assistant", "tool")
IMAGE_TYPES = ("JPEG", "PNG", "WEBP", "GIF")
MAX_IMAGE_PIXELS = 40_000_000
MAX_IMAGE_BYTES = 32 * 1024 * 1024
IMAGE_FETCH_TIMEOUT_S = 15.0
MAX_STOP = 16
MAX_TOP_LOGPROBS = 20
EFFORTS = ("none", "minimal", "low", "medium", "high")


@dataclass(frozen=True)
class ImageRef:
    url: str
    param: str  # where it sits in the body, for error messages


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    images: list[Any]
    sampling: dict[str, Any]  # only what the client set; the model thread adds the defaults
    max_tokens: int | None
    stop: tuple[str, ...]
    enable_thinking: bool | None
    tools: list[dict[str, Any]] | None  # what the template sees (None with tool_choice none)
    parse_tools: bool = False
    constraint: Constraint | None = None
    logprobs: int | None = None  # None: off; n: the chosen token plus the top n
    image_refs: list[ImageRef] = field(default_factory=list)
    n: int = 1  # choices
    # Decoded clips, one per {"type": "audio"} part of the messages, in order (input_audio parts
    # become those; another route can fill both the same way).
    audio: list[AudioClip] = field(default_factory=list)
    prompt: str | None = None  # raw text for /v1/completions: no chat template, no messages
    count_only: bool = False  # render and tokenize only: the outcome's prompt_tokens


# ---- messages ----------------------------------------------------------------------------


def parse_messages(value: Any) -> tuple[list[dict[str, Any]], list[ImageRef | AudioRef]]:
    """Validated messages, and the image and audio references in order of appearance."""
    if not isinstance(value, list):
        raise wrong_type("messages", "an array", value)
    if not value:
        raise InvalidRequest("'messages' must not be empty", param="messages")
    refs: list[ImageRef | AudioRef] = []
    return [_message(m, i, refs) for i, m in enumerate(value)], refs


def _message(message: Any, index: int, refs: list[ImageRef | AudioRef]) -> dict[str, Any]:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise wrong_type(where, "an object", message)
    role = message.get("role")
    if role not in ROLES:
        raise InvalidRequest(
            f"{where}.role must be one of {', '.join(ROLES)}; got {role!r}", param=f"{where}.role"
        )
    content = message.get("content")
    calls = _tool_calls(message.get("tool_calls"), where) if role == "assistant" else None
    if content is None and role != "assistant":
        raise InvalidRequest(f"{where}.content is required", param=f"{where}.content")
    if isinstance(content, list):
        content = [_part(part, f"{where}.content[{i}]", refs) for i, part in enumerate(content)]
    elif content is not None and not isinstance(content, str):
        raise wrong_type(f"{where}.content", "a string or an array of parts", content)
    out = {**message, "role": "system" if role == "developer" else role, "content": content}
    if calls is not None:
        out["tool_calls"] = calls
    reasoning = message.get("reasoning_content", message.get("reasoning"))
    if reasoning is not None and not isinstance(reasoning, str):
        raise wrong_type(f"{where}.reasoning_content", "a string", reasoning)
    return out


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise wrong_type(f"{where}.tool_calls", "an array", value)
    for i, call in enumerate(value):
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(
                f"{where}.tool_calls[{i}] must be an object with function.name",
                param=f"{where}.tool_calls[{i}]",
            )
        arguments = function.get("arguments")
        if arguments is not None and not isinstance(arguments, str | dict):
            raise wrong_type(f"{where}.tool_calls[{i}].function.arguments", "a string", arguments)
    return value or None


def _part(part: Any, where: str, refs: list[ImageRef | AudioRef]) -> dict[str, Any]:
    if not isinstance(part, dict):
        raise wrong_type(where, "an object", part)
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise wrong_type(f"{where}.text", "a string", part.get("text"))
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "input_image"):
        image = part.get("image_url")
        url = image.get("url") if isinstance(image, dict) else image
        if not isinstance(url, str):
            raise wrong_type(f"{where}.image_url.url", "a string", url)
        refs.append(ImageRef(url, f"{where}.image_url"))
        return {"type": "image"}
    if kind == "input_audio":
        refs.append(parse_input_audio(part, where))
        return dict(AUDIO_PART)
    raise InvalidRequest(
        f"{where}.type must be 'text', 'image_url' or 'input_audio'; got {kind!r}",
        param=f"{where}.type",
    )


# ---- images ------------------------------------------------------------------------------


def decode_image(ref: ImageRef, allow_urls: bool = False) -> Any:
    """A data: URL (or, when allowed, an http(s) URL) to an RGB PIL image; else a clear 400."""
    return open_image(image_bytes(ref, allow_urls), ref.param)


def decode_images(refs: list[ImageRef], allow_urls: bool, max_pixels: int) -> list[Any]:
    """Every image, once all their headers say they fit `max_pixels` together (a 400 naming
    both numbers before any is decoded)."""
    raws = [image_bytes(ref, allow_urls) for ref in refs]
    total = sum(probe_image(raw, ref.param) for raw, ref in zip(raws, refs, strict=True))
    if total > max_pixels:
        raise InvalidRequest(
            f"The request's {len(refs)} images hold {total} pixels together, over the limit of "
            f"{max_pixels} (--chat-max-image-pixels)",
            param="messages",
            code="images_too_large",
            extra={"image_pixels": total, "max_image_pixels": max_pixels},
        )
    return [open_image(raw, ref.param) for raw, ref in zip(raws, refs, strict=True)]


def check_image_count(refs: list[ImageRef], limit: int) -> None:
    if len(refs) > limit:
        raise InvalidRequest(
            f"The request has {len(refs)} images, over the limit of {limit} (--chat-max-images)",
            param="messages",
            code="too_many_images",
            extra={"images": len(refs), "max_images": limit},
        )


def image_bytes(ref: ImageRef, allow_urls: bool) -> bytes:
    """The image file a data: URL holds (or, when allowed, an http(s) URL points to)."""
    if ref.url.startswith(("http://", "https://")):
        if not allow_urls:
            raise InvalidRequest(
                "Image URLs are not fetched (start mlxd with --allow-image-urls to allow it): "
                "send the image inline as a base64 data: URL",
                param=ref.param,
                code="image_url_not_allowed",
            )
        return fetch_image(ref)
    header, _, data = ref.url.partition(",")
    if not header.startswith("data:") or ";base64" not in header:
        raise InvalidRequest(
            "Images must be base64 data: URLs (data:image/png;base64,...)", param=ref.param
        )
    try:
        return base64.b64decode(data.strip(), validate=False)
    except (binascii.Error, ValueError) as exc:
        raise InvalidRequest(f"Image could not be decoded: {exc}", param=ref.param) from None


def fetch_image(ref: ImageRef) -> bytes:
    request = urllib.request.Request(ref.url, headers={"User-Agent": "mlxd"})
    try:
        with urllib.request.urlopen(request, timeout=IMAGE_FETCH_TIMEOUT_S) as response:
            raw = response.read(MAX_IMAGE_BYTES + 1)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        raise InvalidRequest(
            f"Image could not be fetched from {ref.url}: {exc}", param=ref.param
        ) from None
    if len(raw) > MAX_IMAGE_BYTES:
        raise InvalidRequest(
            f"Image at {ref.url} is over {MAX_IMAGE_BYTES // (1024 * 1024)} MiB", param=ref.param
        )
    return raw


def probe_image(raw: bytes, param: str) -> int:
    """The image's pixel count from its header, after checking its type and size; no pixels
    are decoded (decompression bombs)."""
    from PIL import Image, UnidentifiedImageError

    if not raw:
        raise InvalidRequest("Image could not be decoded: it is empty", param=param)
    try:
        with Image.open(io.BytesIO(raw)) as probe:
            kind, (width, height) = probe.format, probe.size
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"Image could not be decoded: {exc}", param=param) from None
    if kind not in IMAGE_TYPES:
        raise InvalidRequest(
            f"Unsupported image type {kind}: send JPEG, PNG, WebP or GIF",
            param=param,
            code="unsupported_image_type",
        )
    if width * height > MAX_IMAGE_PIXELS:
        raise InvalidRequest(
            f"Image is {width}x{height}, over the limit of {MAX_IMAGE_PIXELS} pixels",
            param=param,
            code="image_too_large",
        )
    return width * height


def open_image(raw: bytes, param: str) -> Any:
    """Check type and size from the header, then decode to RGB."""
    from PIL import Image, UnidentifiedImageError

    probe_image(raw, param)
    try:
        with Image.open(io.BytesIO(raw)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise InvalidRequest(f"Image could not be decoded: {exc}", param=param) from None


# ---- prompt length -----------------------------------------------------------------------


def prompt_chars(chat: ChatRequest) -> int:
    """Characters the rendered prompt holds at least: the raw prompt, or the text of every
    message but the assistant's (a template may drop parts of earlier replies)."""
    if chat.prompt is not None:
        return len(chat.prompt)
    total = 0
    for message in chat.messages:
        if message.get("role") == "assistant":
            continue
        content = message.get("content")
        if isinstance(content, str):
            total += len(content)
        elif isinstance(content, list):
            total += sum(len(p.get("text") or "") for p in content if isinstance(p, dict))
    return total


def check_prompt_chars(chars: int, runner: Any) -> None:
    """A prompt longer than the context times the longest token (in characters) cannot fit:
    the context-length 400, without tokenizing it. `runner` None (not loaded): no check."""
    n_ctx = getattr(runner, "context_length", None)
    per_token = getattr(runner, "max_token_chars", None)
    if not isinstance(n_ctx, int) or not isinstance(per_token, int):
        return
    if chars > n_ctx * per_token:
        raise InvalidRequest(
            f"The prompt has {chars} characters, more than the model's context of {n_ctx} tokens "
            f"can hold (a token is at most {per_token} characters)",
            code="context_length_exceeded",
            extra={"n_prompt_chars": chars, "n_ctx": n_ctx},
        )


# ---- sampling, limits, thinking --------------------------------------------------------------


def parse_stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise wrong_type("stop", "a string or an array of strings", value)
    if len(items) > MAX_STOP:
        raise InvalidRequest(
            f"'stop' has {len(items)} entries; the limit is {MAX_STOP}", param="stop"
        )
    return tuple(s for s in items if s)


def parse_sampling(body: dict[str, Any]) -> dict[str, Any]:
    values = {
        "temperature": optional_number(body, "temperature", minimum=0, maximum=2),
        "top_p": optional_number(body, "top_p", minimum=0, maximum=1, exclusive_minimum=True),
        "top_k": optional_number(body, "top_k", minimum=0, integer=True),
        "min_p": optional_number(body, "min_p", minimum=0, maximum=1),
        "seed": optional_number(body, "seed", integer=True),
        "presence_penalty": optional_number(body, "presence_penalty", minimum=-2, maximum=2),
        "frequency_penalty": optional_number(body, "frequency_penalty", minimum=-2, maximum=2),
        "repetition_penalty": optional_number(
            body, "repetition_penalty", minimum=0, exclusive_minimum=True, maximum=10
        ),
    }
    return {k: v for k, v in values.items() if v is not None}


def parse_max_tokens(body: dict[str, Any]) -> int | None:
    a = optional_number(body, "max_completion_tokens", minimum=1, integer=True)
    b = optional_number(body, "max_tokens", minimum=1, integer=True)
    return a if a is not None else b


def parse_thinking(body: dict[str, Any]) -> bool | None:
    kwargs = optional_object(body, "chat_template_kwargs")
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in EFFORTS:
        raise InvalidRequest(
            f"'reasoning_effort' must be one of {', '.join(EFFORTS)}; got {effort!r}",
            param="reasoning_effort",
        )
    if kwargs.get("enable_thinking") is not None:
        if not isinstance(kwargs["enable_thinking"], bool):
            raise wrong_type(
                "chat_template_kwargs.enable_thinking", "a boolean", kwargs["enable_thinking"]
            )
        return kwargs["enable_thinking"]
    return None if effort is None else effort != "none"


def parse_logprobs(body: dict[str, Any]) -> int | None:
    wanted = optional_bool(body, "logprobs")
    top = optional_number(body, "top_logprobs", minimum=0, maximum=MAX_TOP_LOGPROBS, integer=True)
    if top is not None and not wanted:
        raise InvalidRequest(
            "'top_logprobs' needs 'logprobs': true", param="top_logprobs", code="invalid_value"
        )
    return int(top or 0) if wanted else None


def parse_n(body: dict[str, Any], limit: int) -> int:
    """Choices to generate: the prompt is read once and each choice decodes as its own row."""
    n = optional_number(body, "n", minimum=1, integer=True) or 1
    if n > limit:
        raise InvalidRequest(
            f"'n' is {n}, more than the {limit} sequences this server decodes at once "
            "(--chat-batch)",
            param="n",
            code="unsupported_value",
        )
    return int(n)


# ---- tools and response_format -------------------------------------------------------------


def parse_tools(body: dict[str, Any]) -> list[dict[str, Any]]:
    tools = body.get("tools")
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise wrong_type("tools", "an array of objects", tools)
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise InvalidRequest(
                f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}",
                param=f"tools[{i}]",
            )
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequest(f"tools[{i}].function.name is required", param=f"tools[{i}]")
        params = function.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise wrong_type(f"tools[{i}].function.parameters", "an object", params)
    return tools


def parse_tool_choice(body: dict[str, Any], tools: list[dict[str, Any]]) -> str | None:
    """ "none", "auto", "required", or the name of the one function the model must call."""
    choice = body.get("tool_choice")
    if choice is None:
        return "auto"
    names = [t["function"]["name"] for t in tools]
    if isinstance(choice, str):
        if choice not in ("none", "auto", "required"):
            raise InvalidRequest(
                f"'tool_choice' must be none, auto, required or a function; got {choice!r}",
                param="tool_choice",
            )
        if choice == "required" and not tools:
            raise InvalidRequest("tool_choice 'required' needs 'tools'", param="tool_choice")
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise InvalidRequest(
            "'tool_choice' must be a string or {'type': 'function', 'function': {'name': ...}}",
            param="tool_choice",
        )
    if name not in names:
        raise InvalidRequest(
            f"tool_choice names {name!r}, which is not in 'tools'", param="tool_choice"
        )
    return name


def _schema_text(schema: Any, param: str) -> str:
    import llguidance

    from engine.chat.types import JSON_OPTIONS

    if not isinstance(schema, dict):
        raise wrong_type(param, "a JSON schema object", schema)
    text = json.dumps(schema)
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except (ValueError, TypeError) as exc:
        error = str(exc)
    if error:
        raise InvalidRequest(
            f"{param} cannot be enforced: {error}", param=param, code="invalid_schema"
        )
    return text


def parse_response_format(body: dict[str, Any]) -> str | None | bool:
    """False: free text; None: any JSON object; else the JSON schema text."""
    fmt = optional_object(body, "response_format")
    kind = fmt.get("type", "text") if fmt else "text"
    if kind == "text":
        return False
    if kind == "json_object":
        schema = fmt.get("schema")
        return None if schema is None else _schema_text(schema, "response_format.schema")
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        if not isinstance(spec, dict):
            raise wrong_type("response_format.json_schema", "an object", spec)
        schema = spec.get("schema", {"type": "object"})
        return _schema_text(schema, "response_format.json_schema.schema")
    raise InvalidRequest(
        f"response_format type must be text, json_object or json_schema; got {kind!r}",
        param="response_format",
    )


def build_constraint(
    response_format: str | None | bool,
    tools: list[dict[str, Any]],
    choice: str | None,
    thinking: bool | None,
) -> Constraint | None:
    forced = [t for t in tools if choice == "required" or t["function"]["name"] == choice]
    if forced and response_format is not False:
        raise InvalidRequest(
            "response_format cannot be combined with a required tool call",
            param="response_format",
        )
    after_thinking = thinking is True  # Gemma 4 thinks only when asked to
    if forced:
        specs = tuple(
            (
                t["function"]["name"],
                _schema_text(t["function"].get("parameters") or {"type": "object"}, "tools"),
            )
            for t in forced
        )
        return Constraint(tools=specs, after_thinking=after_thinking)
    if response_format is False:
        return None
    return Constraint(json_schema=response_format, after_thinking=after_thinking)


async def parse_request(request: Request, body: dict[str, Any]) -> ChatRequest:
    messages, refs = parse_messages(required(body, "messages"))
    n = parse_n(body, request.app.ctx.config.chat_batch)
    tools = parse_tools(body)
    choice = parse_tool_choice(body, tools)
    thinking = parse_thinking(body)
    constraint = build_constraint(parse_response_format(body), tools, choice, thinking)
    chat = ChatRequest(
        messages=messages,
        images=[],
        sampling=parse_sampling(body),
        max_tokens=parse_max_tokens(body),
        stop=parse_stop(body.get("stop")),
        enable_thinking=thinking,
        tools=tools if tools and choice != "none" else None,
        parse_tools=bool(tools) and choice != "none",
        constraint=constraint,
        logprobs=parse_logprobs(body),
        image_refs=[ref for ref in refs if isinstance(ref, ImageRef)],
        n=n,
    )
    config = request.app.ctx.config
    check_image_count(chat.image_refs, config.chat_max_images)
    runner = getattr(getattr(request.app.ctx, "worker", None), "runner", None)
    check_prompt_chars(prompt_chars(chat), runner)
    clips = [ref for ref in refs if isinstance(ref, AudioRef)]
    if not chat.image_refs and not clips:
        return chat
    loop = asyncio.get_running_loop()
    allow, max_pixels = config.chat_allow_image_urls, config.chat_max_image_pixels
    with admitted(request):  # the queue slot first: a full queue is a 503 before any decoding
        images = await loop.run_in_executor(None, decode_images, chat.image_refs, allow, max_pixels)
        chat.images.extend(images)
        chat.audio.extend(await decode_clips(clips))
    return chat
