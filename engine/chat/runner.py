"""Chat (vision-language) model runner: runs ONLY on the engine's single model thread.

Everything here touches ``mlx.core``: load the model with mlx-vlm (or mlx-lm for text-only
checkpoints such as gemma3_text converted from GGUF), render and tokenize prompts with the
model's own chat template and processor, and decode through a `ChatBatch`: the batched engine
(engine.chat.batch) plus, per row, a `ReplyDecoder` that turns tokens into text (mlx-lm's
streaming detokenizer), cuts stop strings and ends at end of turn or the token limit.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
from collections.abc import Callable, Hashable, Iterator, Sequence
from copy import copy
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx_lm.tokenizer_utils import (
    BPEStreamingDetokenizer,
    NaiveStreamingDetokenizer,
    SPMStreamingDetokenizer,
)
from mlx_lm.utils import MODEL_REMAPPING as LM_MODEL_REMAPPING
from mlx_lm.utils import load as lm_load
from mlx_vlm.utils import load as vlm_load

from engine.chat.audio_input import AudioClip, audio_not_supported, audio_too_long, audio_too_short
from engine.chat.audio_tower import AudioFeatures, audio_limit_s, expand_audio
from engine.chat.batch import BatchEngine, RowParams
from engine.chat.constraint import AnswerConstraint, json_grammar, tool_call_grammar
from engine.chat.gemma_tokens import (
    THINK_CLOSE,
    THINK_OPEN,
    TOOL_CALL_CLOSE,
    TOOL_CALL_OPEN,
    TURN_CLOSE,
)
from engine.chat.types import (
    ChatParams,
    ChatStep,
    Constraint,
    PromptTooLongError,
    RowStep,
    StopMatcher,
)
from engine.jsonfile import read_json


def _json(path: Path) -> dict:
    return read_json(path) or {}


REPLACEMENT_CHAR = "\ufffd"
FALLBACK_DEFAULTS = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0}


@dataclass
class PreparedPrompt:
    """A rendered, tokenized prompt; built on the model thread (holds MLX arrays)."""

    input_ids: mx.array  # shape (1, n_tokens)
    n_tokens: int
    text: str  # the rendered chat template
    pixel_values: mx.array | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    n_images: int = 0
    # Content hashes of the images and audio clips, in prompt order: their prefix-cache keys.
    image_hashes: tuple[str, ...] = ()
    audio: AudioFeatures | None = None


class ChatRunner:
    def __init__(
        self,
        model: Any,
        processor: Any,
        model_dir: Path,
        model_id: str,
        *,
        tokenizer: Any = None,
    ) -> None:
        """``processor`` None: a text-only mlx-lm model, with its Hugging Face ``tokenizer``."""
        self.model = model
        self.processor = processor
        self.tokenizer = tokenizer if tokenizer is not None else processor.tokenizer
        self.accepts_images = processor is not None
        self.model_dir = model_dir
        self.model_id = model_id
        self.config = _json(model_dir / "config.json")
        self.context_length = _context_length(self.config)
        # The most characters one token stands for: a longer prompt cannot fit, untokenized.
        self.max_token_chars = max(map(len, self.tokenizer.get_vocab()), default=1)
        self.eos_token_ids = _eos_token_ids(self.config, model_dir, self.tokenizer)
        self.image_token_id = self.config.get("image_token_id")
        has_tower = getattr(model, "audio_tower", None) is not None
        self.audio_token_id = self.config.get("audio_token_id") if has_tower else None
        self._detokenizer_class = _detokenizer_class(model_dir)
        self._detokenizer = self._detokenizer_class(self.tokenizer)
        self._llg_tokenizer: Any = None
        self._silent_ids = frozenset(
            i for i in (self.tokenizer.bos_token_id, self.tokenizer.pad_token_id) if i is not None
        )

    @classmethod
    def load(cls, model_dir: Path, model_id: str) -> ChatRunner:
        model_dir = Path(model_dir)
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no model at {model_dir} (config.json missing)")
        if is_text_only(_json(model_dir / "config.json")):
            model, wrapper = lm_load(str(model_dir))
            return cls(model, None, model_dir, model_id, tokenizer=wrapper._tokenizer)
        model, processor = vlm_load(str(model_dir))
        return cls(model, processor, model_dir, model_id)

    def generation_defaults(self) -> dict:
        """Sampling defaults from generation_config.json (Gemma 4: 1.0 / 0.95 / 64)."""
        gen = _json(self.model_dir / "generation_config.json") or self.config.get(
            "generation_config", {}
        )
        out = dict(FALLBACK_DEFAULTS)
        for key in out:
            if gen.get(key) is not None:
                out[key] = type(out[key])(gen[key])
        if gen.get("repetition_penalty") not in (None, 1.0):
            out["repetition_penalty"] = float(gen["repetition_penalty"])
        return out

    # ---------------------------------------------------------------- prompt

    def render(
        self,
        messages: list[dict],
        *,
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> str:
        """Render OpenAI messages with the model's chat template (generation prompt added)."""
        kwargs: dict[str, Any] = {"tokenize": False, "add_generation_prompt": True}
        if enable_thinking is not None:
            kwargs["enable_thinking"] = enable_thinking
        if tools:
            kwargs["tools"] = tools
        try:
            return self.tokenizer.apply_chat_template(_template_messages(messages), **kwargs)
        except Exception as exc:  # jinja2 TemplateError, raise_exception(), bad structure
            raise ValueError(f"the chat template cannot render these messages: {exc}") from exc

    def prepare(
        self,
        messages: list[dict],
        images: list[Any],
        *,
        audio: Sequence[AudioClip] = (),
        enable_thinking: bool | None = None,
        tools: list[dict] | None = None,
    ) -> PreparedPrompt:
        n_parts = _count_parts(messages, IMAGE_PARTS)
        if (images or n_parts) and not self.accepts_images:
            raise ValueError("this model does not accept images")
        if n_parts != len(images):
            raise ValueError(f"{n_parts} image parts in the messages but {len(images)} images")
        self._check_audio(messages, audio)
        text = self.render(messages, enable_thinking=enable_thinking, tools=tools)
        media = images or audio
        prompt = self._tokenize(text, images, audio) if media else self._tokenize_text(text)
        if prompt.n_tokens >= self.context_length:
            raise PromptTooLongError(prompt.n_tokens, self.context_length)
        return prompt

    def prepare_raw(self, text: str) -> PreparedPrompt:
        """A prompt given as text (legacy completions): tokenized as is, BOS added as the
        tokenizer does, no chat template."""
        ids = self.tokenizer.encode(text, add_special_tokens=True)
        if len(ids) >= self.context_length:
            raise PromptTooLongError(len(ids), self.context_length)
        return PreparedPrompt(input_ids=mx.array([ids]), n_tokens=len(ids), text=text)

    def _tokenize_text(self, text: str) -> PreparedPrompt:
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return PreparedPrompt(input_ids=mx.array([ids]), n_tokens=len(ids), text=text)

    def _check_audio(self, messages: list[dict], audio: Sequence[AudioClip]) -> None:
        n_parts = _count_parts(messages, AUDIO_PARTS)
        if n_parts != len(audio):
            raise ValueError(f"{n_parts} audio parts in the messages but {len(audio)} clips")
        if not audio:
            return
        if self.audio_token_id is None:
            raise audio_not_supported(audio[0].param, f"{self.model_id} has no audio tower")
        if getattr(self.processor, "feature_extractor", None) is None:
            raise audio_not_supported(
                audio[0].param,
                f"{self.model_id} has no audio feature extractor (its conversion lost it: "
                "convert the model again with mlxd convert)",
            )
        limit = audio_limit_s(self.processor)
        for clip in audio:
            if clip.seconds > limit:
                raise audio_too_long(clip, limit)

    def _tokenize(
        self, text: str, images: list[Any], audio: Sequence[AudioClip] = ()
    ) -> PreparedPrompt:
        # The processor expands each image token into <boi> soft tokens <eoi>, expand_audio each
        # audio token into <boa> soft tokens <eoa>. Pass add_special_tokens=False: the template
        # already rendered <bos> (mlx-vlm's prepare_inputs does not forward it for Gemma 4 and
        # the prompt gets two BOS).
        rgb = [im if im.mode == "RGB" else im.convert("RGB") for im in images]
        expanded, features = text, None
        if audio:
            expanded, features = expand_audio(self.processor, text, [c.samples for c in audio])
            for clip, n in zip(audio, features.tokens, strict=True):
                if n == 0:
                    raise audio_too_short(clip)
        out = dict(self.processor(text=[expanded], images=rgb or None, add_special_tokens=False))
        input_ids = out.pop("input_ids")
        pixel_values = out.pop("pixel_values", None)
        out.pop("attention_mask", None)
        hashes = {self.image_token_id: iter([_image_hash(im) for im in rgb])}
        if self.audio_token_id is not None:
            hashes[self.audio_token_id] = iter([clip.digest for clip in audio])
        return PreparedPrompt(
            input_ids=input_ids,
            n_tokens=int(input_ids.shape[1]),
            text=text,
            pixel_values=pixel_values,
            model_kwargs=out,
            n_images=len(images),
            image_hashes=_media_hashes(input_ids[0].tolist(), hashes),
            audio=features,
        )

    # ------------------------------------------------------------ generation

    def prompt_logits(self, prompt: PreparedPrompt) -> mx.array:
        """Next-token logits after the prompt (one forward pass, no cache); for tests."""
        if self.accepts_images:
            out = self.model(
                prompt.input_ids, pixel_values=prompt.pixel_values, **prompt.model_kwargs
            )
        else:
            out = self.model(prompt.input_ids)
        logits = getattr(out, "logits", out)[0, -1].astype(mx.float32)
        mx.eval(logits)
        return logits

    def decode_token(self, token: int) -> str:
        """The text of one token on its own (for logprobs); special tokens included."""
        return self.tokenizer.decode([token], skip_special_tokens=False)

    def open_batch(self, *, max_batch: int, prefill_chunk: int, cache_bytes: int) -> ChatBatch:
        """A batch of replies decoded together, one forward pass per step."""
        engine = BatchEngine(
            self.model,
            is_vlm=self.accepts_images,
            max_batch=max_batch,
            prefill_chunk=prefill_chunk,
            cache_bytes=cache_bytes,
            eos_ids=self.eos_token_ids,
            image_token_id=self.image_token_id,
            audio_token_id=self.audio_token_id,
        )
        return ChatBatch(self, engine)

    def kv_bytes_per_token(self) -> int:
        """KV bytes one more token position costs: the layers that cache every position (not
        sliding-window layers, whose cache stops growing at the window, nor layers that share
        another layer's KV), keys and values, in the weights' float width."""
        text = self.config.get("text_config") or self.config
        n_layers = int(text.get("num_hidden_layers") or 1)
        own = n_layers - int(text.get("num_kv_shared_layers") or 0)
        types = text.get("layer_types") or ["full_attention"] * n_layers
        full = sum(1 for kind in types[:own] if kind != "sliding_attention") or 1
        heads = int(
            text.get("num_global_key_value_heads")
            or text.get("num_key_value_heads")
            or text.get("num_attention_heads")
            or 1
        )
        head_dim = int(
            text.get("global_head_dim")
            or text.get("head_dim")
            or int(text.get("hidden_size", 64)) // max(int(text.get("num_attention_heads", 1)), 1)
        )
        dtype = text.get("torch_dtype") or self.config.get("torch_dtype") or text.get("dtype")
        itemsize = 4 if "float32" in str(dtype) else 2
        return 2 * full * heads * head_dim * itemsize

    def default_kv_tokens(self) -> int:
        """KV token positions for all replies together: a quarter of the memory available at
        start (Metal: of the recommended working set) over `kv_bytes_per_token`."""
        if mx.metal.is_available():
            available = int(mx.metal.device_info().get("max_recommended_working_set_size", 0))
        else:
            available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        return max(1, available // 4 // self.kv_bytes_per_token())

    def generate(
        self,
        prompt: PreparedPrompt,
        params: ChatParams,
        is_cancelled: Callable[[], bool],
    ) -> Iterator[ChatStep]:
        """One reply on its own (a batch of one row, no prefix cache): for tools and tests."""
        batch = self.open_batch(max_batch=1, prefill_chunk=2048, cache_bytes=0)
        batch.add("alone", prompt, params)
        while True:
            if is_cancelled():
                yield ChatStep("", None, "cancelled")
                return
            for row in batch.step():
                yield row.step
                if row.step.finish_reason is not None:
                    return

    def row_params(self, params: ChatParams) -> RowParams:
        """The engine's view of a request's sampling; constraint processors are built per row."""
        return RowParams(
            temperature=max(params.temperature, 0.0),
            top_p=params.top_p,
            top_k=max(params.top_k, 0),
            min_p=params.min_p,
            seed=params.seed,
            repetition_penalty=params.repetition_penalty,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            logprobs=params.logprobs is not None,
        )

    def _constraints(self, params: ChatParams) -> list[Callable[[mx.array, mx.array], mx.array]]:
        fmt = params.constraint
        if fmt is None:
            return []
        return [
            AnswerConstraint(
                self._llg_matcher(fmt),
                think_open=self._token_id(THINK_OPEN) if fmt.after_thinking else None,
                think_close=self._token_id(THINK_CLOSE),
                eos_ids=self.eos_token_ids,
            )
        ]

    def _llg_matcher(self, fmt: Constraint) -> Any:
        import llguidance
        import llguidance.hf

        if self._llg_tokenizer is None:
            self._llg_tokenizer = llguidance.hf.from_tokenizer(
                self.tokenizer, eos_token=sorted(self.eos_token_ids)
            )
        if fmt.tools:
            marks = (self._token_id(TOOL_CALL_OPEN), self._token_id(TOOL_CALL_CLOSE))
            if None in marks:
                raise ValueError("this model has no tool-call tokens")
            grammar = tool_call_grammar(fmt.tools, *marks)
        else:
            grammar = json_grammar(fmt.json_schema)
        matcher = llguidance.LLMatcher(self._llg_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the response format cannot be enforced: {matcher.get_error()}")
        return matcher

    def _token_id(self, token: str) -> int | None:
        found = self.tokenizer.convert_tokens_to_ids(token)
        return found if isinstance(found, int) and found != self.tokenizer.unk_token_id else None

    def _token_limit(self, prompt: PreparedPrompt, params: ChatParams) -> int:
        room = self.context_length - prompt.n_tokens
        return room if params.max_tokens is None else min(params.max_tokens, room)

    def _new_detokenizer(self) -> Any:
        detok = copy(self._detokenizer)
        detok.reset()
        return detok


# ------------------------------------------------------------------ helpers


class ReplyDecoder:
    """One reply's tokens into text: detokenize, cut stop strings, end at end of turn or at the
    token limit (`limit` tokens)."""

    def __init__(self, runner: ChatRunner, params: ChatParams, limit: int) -> None:
        self.runner, self.params, self.limit = runner, params, limit
        self.detok = runner._new_detokenizer()
        self.stops = StopMatcher(params.stop)
        self.count = 0

    def feed(self, token: int, logprobs: mx.array | None) -> ChatStep:
        self.count += 1
        logprob, top = _logprob_info(logprobs, token, self.params.logprobs)
        stops, detok = self.stops, self.detok
        if token in self.runner.eos_token_ids:
            text, _ = stops.feed(_finish(detok))
            return ChatStep(text + stops.flush(), token, "stop", logprob, top, stops.matched)
        if token not in self.runner._silent_ids:
            detok.add_token(token)
        text, stopped = stops.feed(_clean(detok.last_segment))
        if stopped:
            return ChatStep(text, token, "stop", logprob, top, stops.matched)
        if self.count >= self.limit:
            more, stopped = stops.feed(_finish(detok))
            tail = "" if stopped else stops.flush()
            reason = "stop" if stopped else "length"
            return ChatStep(text + more + tail, token, reason, logprob, top, stops.matched)
        return ChatStep(text, token, None, logprob, top)


class ChatBatch:
    """Replies decoded together: the batched engine plus a ReplyDecoder per row. A finished
    row leaves the batch at once (its KV goes to the prefix cache)."""

    def __init__(self, runner: ChatRunner, engine: BatchEngine) -> None:
        self.runner, self.engine = runner, engine
        self._decoders: dict[tuple[Hashable, int], ReplyDecoder] = {}
        self._ended: list[RowStep] = []  # replies with no room for a single token

    @property
    def active(self) -> int:
        return self.engine.active

    @property
    def kv_tokens(self) -> int:
        return self.engine.kv_tokens

    def add(self, rid: Hashable, prompt: PreparedPrompt, params: ChatParams, n: int = 1) -> None:
        limit = self.runner._token_limit(prompt, params)
        if limit <= 0:
            self._ended += [RowStep(rid, i, ChatStep("", None, "length"), 0) for i in range(n)]
            return
        processors = [self.runner._constraints(params) for _ in range(n)]  # fails early
        row = self.runner.row_params(params)
        if any(processors):
            row = dataclasses.replace(row, processors=iter(processors).__next__)
        self.engine.add(
            rid,
            prompt.input_ids,
            pixel_values=prompt.pixel_values,
            model_kwargs=prompt.model_kwargs,
            image_hashes=prompt.image_hashes,
            audio=prompt.audio,
            params=row,
            n=n,
        )
        for index in range(n):
            self._decoders[(rid, index)] = ReplyDecoder(self.runner, params, limit)

    def remove(self, rid: Hashable, index: int | None = None) -> None:
        self.engine.remove(rid, index=index)
        for key in [k for k in self._decoders if k[0] == rid and index in (None, k[1])]:
            del self._decoders[key]

    def step(self) -> list[RowStep]:
        out, self._ended = self._ended, []
        for produced in self.engine.step():
            key = (produced.rid, produced.index)
            step = self._decoders[key].feed(produced.token, produced.logprobs)
            out.append(RowStep(produced.rid, produced.index, step, produced.cached_tokens))
            if step.finish_reason is not None:
                self.remove(*key)
        return out


def is_text_only(config: dict) -> bool:
    """A checkpoint without vision/audio towers whose model type mlx-lm implements."""
    if any(config.get(key) for key in ("vision_config", "audio_config")):
        return False
    model_type = str(config.get("model_type", ""))
    model_type = LM_MODEL_REMAPPING.get(model_type, model_type)
    return bool(model_type) and importlib.util.find_spec(f"mlx_lm.models.{model_type}") is not None


def _context_length(config: dict) -> int:
    text_config = config.get("text_config") or config
    return int(text_config.get("max_position_embeddings") or 8192)


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [v for v in value if isinstance(v, int)]


def _eos_token_ids(config: dict, model_dir: Path, tokenizer: Any) -> frozenset[int]:
    gen = _json(model_dir / "generation_config.json")
    ids = _as_list(config.get("eos_token_id")) + _as_list(gen.get("eos_token_id"))
    ids += _as_list(tokenizer.eos_token_id)
    turn_end = tokenizer.convert_tokens_to_ids(TURN_CLOSE)
    if isinstance(turn_end, int) and turn_end != tokenizer.unk_token_id:
        ids.append(turn_end)
    return frozenset(ids)


def _detokenizer_class(model_dir: Path) -> Callable[[Any], Any]:
    """Pick mlx-lm's streaming detokenizer for the tokenizer.json decoder."""
    decoder = _json(model_dir / "tokenizer.json").get("decoder") or {}
    if decoder.get("type") == "ByteLevel":
        return BPEStreamingDetokenizer
    steps = [d.get("type") for d in decoder.get("decoders", [])]
    if "ByteFallback" in steps:
        return partial(SPMStreamingDetokenizer, trim_space="Strip" in steps)
    return NaiveStreamingDetokenizer


def _finish(detok: Any) -> str:
    detok.finalize()
    return _clean(detok.last_segment)


def _clean(text: str) -> str:
    # Invalid byte sequences (a random or confused model) decode to U+FFFD: drop them.
    return text.replace(REPLACEMENT_CHAR, "")


def _logprob_info(
    logprobs: mx.array, token: int, n_top: int | None
) -> tuple[float | None, tuple[tuple[int, float], ...]]:
    if n_top is None:
        return None, ()
    chosen = logprobs[token].item()
    if n_top <= 0:
        return chosen, ()
    order = mx.argsort(-logprobs)[:n_top]
    values = logprobs[order]
    return chosen, tuple(zip(order.tolist(), values.tolist(), strict=True))


IMAGE_PARTS = ("image_url", "image")
AUDIO_PARTS = ("input_audio", "audio")


def _count_parts(messages: list[dict], kinds: tuple[str, ...]) -> int:
    return sum(
        1
        for m in messages
        if isinstance(m.get("content"), list)
        for part in m["content"]
        if isinstance(part, dict) and part.get("type") in kinds
    )


def _media_hashes(ids: list[int], hashes: dict[Any, Iterator[str]]) -> tuple[str, ...]:
    """One hash per run of image or audio tokens, in prompt order ("" for a run that no image
    or clip filled: the literal token typed in text)."""
    out, previous = [], None
    for token in ids:
        if token in hashes and token != previous:
            out.append(next(hashes[token], ""))
        previous = token
    return tuple(out)


def _template_messages(messages: list[dict]) -> list[dict]:
    """OpenAI messages -> the shapes Gemma-style templates expect."""
    return [_template_message(m) for m in messages]


def _template_message(message: dict) -> dict:
    out = dict(message)
    content = message.get("content")
    if isinstance(content, list):
        out["content"] = [_template_part(p) for p in content]
    if message.get("tool_calls"):
        out["tool_calls"] = [_template_tool_call(c) for c in message["tool_calls"]]
    return out


def _template_part(part: dict) -> dict:
    if part.get("type") == "image_url":
        return {"type": "image"}
    if part.get("type") == "input_audio":
        return {"type": "audio"}
    return part


def _template_tool_call(call: dict) -> dict:
    function = dict(call.get("function") or {})
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            parsed = None
        if isinstance(parsed, dict):
            function["arguments"] = parsed
    return {**call, "function": function}


def smoke_test(model_dir: Path) -> None:
    """Load as the service does and generate one token greedily (`mlxd convert` runs this)."""
    runner = ChatRunner.load(Path(model_dir), Path(model_dir).name)
    prompt = runner.prepare([{"role": "user", "content": "Hello"}], [])
    params = ChatParams(
        max_tokens=1, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, seed=0, stop=()
    )
    steps = list(runner.generate(prompt, params, lambda: False))
    if not steps or steps[-1].token is None:
        raise RuntimeError(f"{model_dir} loaded but generated nothing")


def _image_hash(image: Any) -> str:
    digest = hashlib.sha256(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()
