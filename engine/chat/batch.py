"""Batched chat decoding on one thread: one model call per step over every active row.

Design in one paragraph: every row (one choice of one request) owns its own per-layer KV
caches (the model's own ``KVCache`` / ``RotatingKVCache`` classes, exactly what the single-request
path uses). A decode step stacks the rows' next tokens into a ``(B, 1)`` batch and calls the
model once with a thin per-layer view (``_DecodeView``) in place of each layer's cache: the view
hands every row's new key/value to that row's own cache and returns the rows' keys/values as a
ragged list. The model's attention function is wrapped so that, for ragged keys only, it runs
``mx.fast.scaled_dot_product_attention`` row by row over exactly that row's keys. All
projections, MLPs, norms, embeddings and the LM head run batched (these hold the weights, so
this is where batching pays); attention is per row and needs no padding and no masks.
Result: a row computes bit for bit what it computes alone (verified: MLX's CPU GEMM rows do not
depend on the batch size M), rows join and leave between steps with no re-padding, and a row's
cache is an ordinary cache that can be copied (n > 1), snapshotted (prefix cache) or dropped.

Prompts are prefilled request by request (batch of 1 each), oldest first, within a token budget
per ``step()`` of at most ``prefill_chunk`` (several short prompts fit one step), alongside the
batched decode of the running rows; while rows are decoding, the budget is sized from measured
speeds so that it costs about PREFILL_SHARE (half) of a decode step (running streams slow to
about 1.5x their pace while a long prompt is read). The prompt's last token is not prefilled but
fed as the row's first decode input (as mlx-lm/mlx-vlm's ``generate_step`` do), so prefill
never computes LM-head logits.
"""

from __future__ import annotations

import secrets
import statistics
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p, make_logits_processors

from engine.chat.audio_tower import AudioFeatures, embed_audio
from engine.chat.types import RowFailed

GOLDEN_GAMMA = 0x9E3779B97F4A7C15  # spreads (seed, step) pairs over the seed space
MIN_PREFILL_CHUNK = 16
EMA = 0.2  # weight of the newest timing in the running average of prefill time per token
DECODE_WINDOW = 32  # decode steps whose median time is "a decode step"
# While rows decode, a step reads prompt tokens worth this share of a decode step: running
# streams slow to about 1.5x their pace while a long prompt is read, never stall.
PREFILL_SHARE = 0.5
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


# ---------------------------------------------------------------------------- public types


@dataclass(frozen=True)
class RowParams:
    """Sampling and processing of one request (each of its ``n`` rows gets its own state)."""

    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None  # None: a fresh random seed per row
    repetition_penalty: float | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_context_size: int = 20
    logprobs: bool = False  # StepOut.logprobs carries the row's (vocab,) log-probabilities
    # Builds this row's own logits processors (e.g. an AnswerConstraint); called once per row.
    processors: Callable[[], Sequence[LogitsProcessor]] | None = None


@dataclass(frozen=True)
class StepOut:
    rid: Hashable
    index: int  # choice index, 0 .. n-1
    token: int
    logprobs: mx.array | None  # (vocab,) float32 when RowParams.logprobs
    cached_tokens: int | None  # prompt tokens served by the prefix cache; first token only


# ------------------------------------------------------------------- ragged batched decode


class _RowKV:
    """The keys (or values) of one layer for a decode step: one array per row, unpadded."""

    __slots__ = ("rows",)

    def __init__(self, rows: list[mx.array]) -> None:
        self.rows = rows


class _DecodeView:
    """Stands in for one layer's cache in a batched decode step (one new token per row)."""

    def __init__(self, caches: list[Any], offset: mx.array) -> None:
        self.caches = caches
        self.offset = offset  # per-row RoPE positions

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[_RowKV, _RowKV]:
        out_k, out_v = [], []
        n = len(self.caches)  # one split each (a single op), not n slices
        for cache, k, v in zip(self.caches, mx.split(keys, n), mx.split(values, n), strict=True):
            k, v = cache.update_and_fetch(k, v)
            out_k.append(k)
            out_v.append(v)
        return _RowKV(out_k), _RowKV(out_v)

    def make_mask(self, n: int, **_: Any) -> None:
        # One query per row against exactly the keys that row may see (a rotating cache holds
        # only the sliding window): no mask at all, like the single-request decode.
        assert n == 1, "a decode view takes one token per row"


def _install_ragged_attention(module: Any) -> None:
    """Wrap ``module.scaled_dot_product_attention`` to run ragged (per-row) keys row by row.

    Any other call (prefill, other users of the model) goes to the original unchanged.
    """
    original = getattr(module, "scaled_dot_product_attention", None)
    if original is None:
        raise TypeError(f"{module.__name__} has no scaled_dot_product_attention to batch")
    if getattr(original, "ragged_rows", False):
        return

    def attention(queries: mx.array, keys: Any, values: Any, *args: Any, **kwargs: Any) -> Any:
        if not isinstance(keys, _RowKV):
            return original(queries, keys, values, *args, **kwargs)
        if kwargs.get("sinks") is not None or kwargs.get("mask") is not None:
            raise NotImplementedError("ragged decode takes no mask or attention sinks")
        scale = kwargs["scale"]
        split = mx.split(queries, len(keys.rows))
        rows = [
            mx.fast.scaled_dot_product_attention(q, k, v, scale=scale)
            for q, k, v in zip(split, keys.rows, values.rows, strict=True)
        ]
        return mx.concatenate(rows, axis=0)

    attention.ragged_rows = True  # type: ignore[attr-defined]
    module.scaled_dot_product_attention = attention


# --------------------------------------------------------------------------- cache helpers


def _clone_cache(cache: Any) -> Any:
    """A new cache object over the same (immutable) arrays: writes to one never reach the other.

    MLX arrays are values: a cache update replaces its own array handles (``a[i:j] = x`` swaps
    the descriptor of that handle only), so fresh handles are an O(1) snapshot; the first
    write to either side copies the buffer they share, once. Works for mlx-lm's and mlx-vlm's
    ``KVCache`` / ``RotatingKVCache`` alike (plain attributes: arrays and ints).
    """
    clone = type(cache).__new__(type(cache))
    clone.__dict__.update(
        {
            name: value[: value.shape[0]] if isinstance(value, mx.array) else value
            for name, value in vars(cache).items()
        }
    )
    return clone


def _cache_arrays(caches: Iterable[Any]) -> list[mx.array]:
    return [v for c in caches for v in vars(c).values() if isinstance(v, mx.array)]


def _cache_nbytes(caches: Iterable[Any]) -> int:
    return sum(a.nbytes for a in _cache_arrays(caches))


def _n_media_runs(tokens: Sequence[int], media_ids: frozenset[int]) -> int:
    """Runs of image or audio soft tokens: one per image or clip."""
    runs, previous = 0, None
    for t in tokens:
        if t in media_ids and t != previous:
            runs += 1
        previous = t
    return runs


@dataclass
class _Snapshot:
    tokens: tuple[int, ...]
    images: tuple[str, ...]  # hashes of the images and clips whose tokens lie inside ``tokens``
    caches: list[Any]  # never written: every user gets clones
    nbytes: int


class PrefixCache:
    """LRU of KV snapshots at exact token counts, bounded in bytes.

    A snapshot is reused only when its tokens are a strict prefix of the new prompt and its
    images and audio clips are the prompt's first ones (by content hash), so nothing is ever
    trimmed (a
    sliding-window ``RotatingKVCache`` cannot be).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.nbytes = 0
        self._entries: OrderedDict[tuple[tuple[int, ...], tuple[str, ...]], _Snapshot] = (
            OrderedDict()
        )

    def __len__(self) -> int:
        return len(self._entries)

    def put(self, tokens: tuple[int, ...], images: tuple[str, ...], caches: list[Any]) -> bool:
        key = (tokens, images)
        if self.max_bytes <= 0 or not tokens:
            return False
        if key in self._entries:
            self._entries.move_to_end(key)
            return False
        size = _cache_nbytes(caches)
        if size > self.max_bytes:
            return False
        self._entries[key] = _Snapshot(tokens, images, caches, size)
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._entries.popitem(last=False)
            self.nbytes -= old.nbytes
        return True

    def lookup(self, tokens: Sequence[int], images: Sequence[str]) -> _Snapshot | None:
        best: _Snapshot | None = None
        n = len(tokens)
        for snap in self._entries.values():
            m = len(snap.tokens)
            if m >= n or (best is not None and m <= len(best.tokens)):
                continue
            if tuple(images[: len(snap.images)]) != snap.images:
                continue
            if tuple(tokens[:m]) == snap.tokens:
                best = snap
        if best is not None:
            self._entries.move_to_end((best.tokens, best.images))
        return best


# ------------------------------------------------------------------------------- the rows


@dataclass
class _Row:
    rid: Hashable
    index: int
    prompt: tuple[int, ...]
    images: tuple[str, ...]
    caches: list[Any]
    params: RowParams
    seed: int
    processors: list[LogitsProcessor]
    next_input: int | mx.array  # fed at the next step: a token id, or the step in flight's
    cached_tokens: int
    generated: list[int] = field(default_factory=list)  # tokens known so far
    steps: int = 0  # decode steps built (the last one may still be in flight)

    @property
    def tokens_held(self) -> int:
        return len(self.prompt) - 1 + self.steps

    def history(self) -> mx.array:
        # What the single-request generate_step hands its processors: the prompt's last token
        # and everything generated since.
        return mx.array([self.prompt[-1], *self.generated])


@dataclass
class _Pending:
    rid: Hashable
    prompt: tuple[int, ...]
    images: tuple[str, ...]
    pixel_values: mx.array | None
    model_kwargs: dict[str, Any]
    params: RowParams
    n: int
    caches: list[Any] | None = None
    done: int = 0  # prompt tokens already in the caches
    cached_tokens: int = 0
    embeds: mx.array | None = None  # from prompt position embeds_from on
    embeds_from: int = 0
    per_layer: mx.array | None = None
    whole: bool = False  # the prompt must be read in one go (e.g. bidirectional image attention)
    audio: AudioFeatures | None = None


@dataclass
class _Inflight:
    """A launched step: its rows in batch order, its lazy results, what else it evaluates."""

    rows: list[_Row]
    tokens: mx.array | None
    logprobs: list[mx.array | None]  # per row: (vocab,) where the row asked for them
    to_eval: list[Any]
    prefilled: int
    decoding: bool  # rows were decoding when it was built
    started: float


class BatchEngine:
    """Continuous batching of chat decoding; call everything from one thread."""

    def __init__(
        self,
        model: Any,
        *,
        is_vlm: bool,
        max_batch: int,
        prefill_chunk: int,
        cache_bytes: int,
        eos_ids: frozenset[int],
        image_token_id: int | None = None,
        audio_token_id: int | None = None,
    ) -> None:
        self.model = model
        self.is_vlm = is_vlm
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self.eos_ids = eos_ids
        self.lm = model.language_model if is_vlm else model
        if image_token_id is None and is_vlm:
            image_token_id = getattr(model.config, "image_token_id", None)
        self.image_token_id = image_token_id
        self.audio_token_id = audio_token_id
        self.media_ids = frozenset(t for t in (image_token_id, audio_token_id) if t is not None)
        self.prefix_cache = PrefixCache(cache_bytes)
        self._rows: list[_Row] = []
        self._pending: deque[_Pending] = deque()
        self._decode_times: deque[float] = deque(maxlen=DECODE_WINDOW)
        self._prefill_token_s: float | None = None  # prefill time per token (running average)
        self._last_budget = MIN_PREFILL_CHUNK  # prompt tokens the last step beside rows read
        self._inflight: _Inflight | None = None  # the step computing now, not yet read back
        self._last_read: float | None = None
        _install_ragged_attention(sys.modules[type(self.lm).__module__])
        if is_vlm:  # the text model class lives next to the wrapper
            inner = getattr(self.lm, "model", None)
            if inner is not None:
                _install_ragged_attention(sys.modules[type(inner).__module__])

    # ------------------------------------------------------------------ public interface

    def add(
        self,
        rid: Hashable,
        prompt_ids: list[int] | mx.array,
        *,
        pixel_values: mx.array | None = None,
        model_kwargs: dict[str, Any] | None = None,
        image_hashes: Sequence[str] = (),
        audio: AudioFeatures | None = None,
        params: RowParams,
        n: int = 1,
    ) -> None:
        """``image_hashes``: one content hash per image or audio clip, in prompt order."""
        if isinstance(prompt_ids, mx.array):  # no lazy reshape: it would wait for the step
            nested = prompt_ids.tolist()
            prompt = tuple(nested[0] if prompt_ids.ndim == 2 else nested)
        else:
            prompt = tuple(int(t) for t in prompt_ids)
        if not prompt:
            raise ValueError("an empty prompt")
        if n < 1 or n > self.max_batch:
            raise ValueError(f"n must be in 1..{self.max_batch}")
        if pixel_values is not None and not self.is_vlm:
            raise ValueError("this model does not accept images")
        if audio is not None and self.audio_token_id is None:
            raise ValueError("this model does not accept audio")
        if (pixel_values is not None or audio is not None) and not image_hashes:
            raise ValueError("images and audio need content hashes (prefix-cache keys)")
        if any(r.rid == rid for r in self._rows) or any(p.rid == rid for p in self._pending):
            raise ValueError(f"request {rid!r} is already in the engine")
        self._pending.append(
            _Pending(
                rid,
                prompt,
                tuple(image_hashes),
                pixel_values,
                dict(model_kwargs or {}),
                params,
                n,
                audio=audio,
            )
        )

    def remove(self, rid: Hashable, index: int | None = None, *, keep_cache: bool = True) -> None:
        """Drop the rows of ``rid`` (only choice ``index`` if given) and its pending prefill.

        With ``keep_cache`` each finished row's KV (prompt + generated tokens fed so far) goes
        into the prefix cache as is (no copy), keyed by exactly those tokens.
        """
        if index is None:
            self._pending = deque(p for p in self._pending if p.rid != rid)
        kept = []
        for row in self._rows:
            if row.rid != rid or index not in (None, row.index):
                kept.append(row)
            elif keep_cache:  # the caches hold the prompt and every input fed since
                fed = row.prompt + tuple(row.generated[: row.steps - 1])
                self.prefix_cache.put(fed, self._images_within(fed, row.images), row.caches)
        self._rows = kept

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def pending(self) -> int:
        return len(self._pending)

    @property
    def kv_tokens(self) -> int:
        """Token positions held in KV by running rows and prompts being prefilled."""
        return sum(r.tokens_held for r in self._rows) + sum(p.done for p in self._pending)

    def kv_tokens_by_row(self) -> dict[tuple[Hashable, int], int]:
        out = {(r.rid, r.index): r.tokens_held for r in self._rows}
        for p in self._pending:
            out[(p.rid, -1)] = p.done  # -1: the shared prompt still being read
        return out

    @property
    def kv_bytes(self) -> int:
        """Bytes of live KV (rows and prefills; the prefix cache: ``prefix_cache.nbytes``)."""
        live = [c for r in self._rows for c in r.caches]
        live += [c for p in self._pending if p.caches for c in p.caches]
        return _cache_nbytes(live)

    def step(self) -> list[StepOut]:
        """Launch a step (read waiting prompts within the budget, decode one token of every
        row) and return the tokens of the step before it, read back meanwhile.

        Pipelined like mlx-lm's generators: the next step's graph is built and handed to MLX
        (`async_eval`) before the previous one's tokens are read, so the host work overlaps
        the compute; a step's tokens come back with the next call. Rows with logits
        processors (penalties, constraints) need their last token's value first: then the
        step in flight is read back before the next one is built."""
        outs = self._read_back() if any(r.processors for r in self._rows) else []
        started = time.perf_counter()
        to_eval: list[Any] = []
        decoding = bool(self._rows)
        prefilled, joined = self._advance_prefill(to_eval)
        self._rows.extend(joined)
        launched = _Inflight([], None, [], to_eval, prefilled, decoding, started)
        if self._rows:
            tokens, logprobs = self._decode(self._rows)
            for i, row in enumerate(self._rows):
                row.next_input = tokens[i]
                row.steps += 1
            launched = _Inflight(
                list(self._rows), tokens, logprobs, to_eval, prefilled, decoding, started
            )
            mx.async_eval(tokens, *[lp for lp in logprobs if lp is not None], *to_eval)
        elif to_eval:
            mx.async_eval(to_eval)
        outs += self._read_back()
        self._inflight = launched if (launched.rows or to_eval) else None
        return outs

    def _read_back(self) -> list[StepOut]:
        """The tokens of the step in flight (waiting for it), for the rows still here."""
        flight, self._inflight = self._inflight, None
        if flight is None:
            return []
        values = flight.tokens.tolist() if flight.tokens is not None else []
        if flight.tokens is None:
            mx.eval(flight.to_eval)
        now = time.perf_counter()
        since = max(self._last_read or flight.started, flight.started)
        self._measure(now - since, flight.prefilled, decoding=flight.decoding)
        self._last_read = now
        live = {id(row) for row in self._rows}
        outs = []
        for i, (row, token) in enumerate(zip(flight.rows, values, strict=True)):
            if id(row) not in live:
                continue  # removed while its step was computing
            first = not row.generated
            row.generated.append(token)
            outs.append(
                StepOut(
                    row.rid,
                    row.index,
                    token,
                    flight.logprobs[i],
                    row.cached_tokens if first else None,
                )
            )
        return outs

    # -------------------------------------------------------------------------- prefill

    def _images_within(self, tokens: Sequence[int], images: tuple[str, ...]) -> tuple[str, ...]:
        return images[: _n_media_runs(tokens, self.media_ids)]

    @property
    def _decode_s(self) -> float | None:
        """A decode step's time: the median of the last ones (a running mean took in the slow
        steps, e.g. a row joining, and let prefill budgets grow past their share)."""
        return statistics.median(self._decode_times) if self._decode_times else None

    def _measure(self, seconds: float, prefilled: int, *, decoding: bool) -> None:
        """A decode step's time, and prefill time per token (running average)."""
        if prefilled == 0:
            if decoding:
                self._decode_times.append(seconds)
            return
        spent = seconds - (self._decode_s or 0.0) if decoding else seconds
        per_token = max(spent, 0.0) / prefilled
        old = self._prefill_token_s
        self._prefill_token_s = per_token if old is None else (1 - EMA) * old + EMA * per_token

    def _prefill_budget(self) -> int:
        """Prompt tokens to read this step: about PREFILL_SHARE of a decode step's worth while
        rows are decoding (measured; at most twice what the last such step read, as timings
        are noisy, from MIN_PREFILL_CHUNK on), else the configured chunk."""
        decode_s = self._decode_s
        if not self._rows or not decode_s or not self._prefill_token_s:
            return self.prefill_chunk
        fit = int(PREFILL_SHARE * decode_s / self._prefill_token_s)
        floor = min(MIN_PREFILL_CHUNK, self.prefill_chunk)
        budget = max(floor, min(self.prefill_chunk, fit, 2 * self._last_budget))
        self._last_budget = budget
        return budget

    def _advance_prefill(self, to_eval: list[Any]) -> tuple[int, list[_Row]]:
        """Read waiting prompts, oldest first, within this step's token budget (several short
        ones at once). Returns (prompt tokens read, rows whose prompt is now fully read)."""
        budget, read, joined = self._prefill_budget(), 0, []
        while self._pending and budget > 0:
            job = self._pending[0]
            if job.caches is None:
                if len(self._rows) + len(joined) + job.n > self.max_batch:
                    break  # wait for room
                self._start(job)
            assert job.caches is not None
            target = len(job.prompt) - 1  # the last token is the first decode input
            if job.done < target:
                take = target - job.done if job.whole else min(target - job.done, budget)
                self._prefill(job, job.done, job.done + take)
                job.done += take
                budget -= take
                read += take
                to_eval.extend(_cache_arrays(job.caches))
            if job.done < target:
                break
            self._pending.popleft()
            key = job.prompt[:target]
            if job.cached_tokens < target and self.prefix_cache.max_bytes > 0:
                snap = [_clone_cache(c) for c in job.caches]
                self.prefix_cache.put(key, self._images_within(key, job.images), snap)
            joined += self._make_rows(job)
        return read, joined

    def _start(self, job: _Pending) -> None:
        snap = None
        if len(job.prompt) > 1:
            snap = self.prefix_cache.lookup(job.prompt, job.images)  # keeps >= 1 token to feed
        if snap is not None:
            job.caches = [_clone_cache(c) for c in snap.caches]
            job.done = job.cached_tokens = len(snap.tokens)
        else:
            job.caches = self.lm.make_cache()
        if self.is_vlm and len(job.prompt) > 1:
            self._embed(job)

    def _embed(self, job: _Pending) -> None:
        """Input embeddings of the prompt from the first token not in the cache on; the whole
        prompt (vision and audio towers included) only when images or clips remain to be read."""
        suffix = job.prompt[job.done :]
        text_only = job.done > 0 and self.media_ids.isdisjoint(suffix)
        job.embeds_from = job.done if text_only else 0
        ids = mx.array([suffix if text_only else job.prompt])
        features = self.model.get_input_embeddings(
            ids, None if text_only else job.pixel_values, mask=None, **job.model_kwargs
        )
        job.embeds = features.inputs_embeds
        if job.audio is not None and not text_only:
            assert self.audio_token_id is not None
            job.embeds = embed_audio(self.model, job.audio, ids, job.embeds, self.audio_token_id)
        job.per_layer = getattr(features, "per_layer_inputs", None)
        policy = getattr(self.lm, "chunked_prefill_policy", None)
        if policy is not None and not policy(
            input_ids=ids, inputs_embeds=job.embeds, prefill_kwargs=job.model_kwargs
        ):
            job.whole = True

    def _prefill(self, job: _Pending, start: int, end: int) -> None:
        ids = mx.array([job.prompt[start:end]])
        if not self.is_vlm:
            self.lm(ids, cache=job.caches)  # logits stay lazy and are never computed
            return
        assert job.embeds is not None
        base = job.embeds_from
        a, b = start - base, end - base
        extra = {}
        for name in ("mm_token_type_ids", "token_type_ids"):
            value = job.model_kwargs.get(name)
            if isinstance(value, mx.array):
                extra[name] = value[:, start:end]
        self.lm(
            inputs=ids,
            inputs_embeds=job.embeds[:, a:b],
            per_layer_inputs=None if job.per_layer is None else job.per_layer[:, a:b],
            cache=job.caches,
            logits_to_keep=1,
            **extra,
        )

    def _make_rows(self, job: _Pending) -> list[_Row]:
        assert job.caches is not None
        rows = []
        for index in range(job.n):
            caches = job.caches if index == 0 else [_clone_cache(c) for c in job.caches]
            if job.params.seed is None:
                seed = secrets.randbits(63)
            else:
                seed = (job.params.seed + index * GOLDEN_GAMMA) % 2**64
            rows.append(
                _Row(
                    job.rid,
                    index,
                    job.prompt,
                    job.images,
                    caches,
                    job.params,
                    seed,
                    _row_processors(job.params),
                    job.prompt[-1],
                    job.cached_tokens,
                )
            )
        return rows

    # --------------------------------------------------------------------------- decode

    def _decode(self, rows: list[_Row]) -> tuple[mx.array, list[mx.array | None]]:
        """(the rows' next tokens, each row's (vocab,) log-probabilities where it asked)."""
        out = self.lm(self._inputs(rows), cache=self._views(rows))
        logits = getattr(out, "logits", out)[:, -1, :]
        if any(r.processors for r in rows):
            logits = mx.concatenate([_processed(logits[i : i + 1], r) for i, r in enumerate(rows)])
        # Normalised only for the rows that need it: over a 262k vocabulary that pass costs
        # more than the attention of every layer (this CPU: 35 ms for 8 rows, argmax 2.4 ms).
        normal = [
            _normalized(logits[i : i + 1]) if _needs_normal(r.params) else None
            for i, r in enumerate(rows)
        ]
        if all(r.params.temperature <= 0 for r in rows):
            tokens = mx.argmax(logits, axis=-1)
        else:
            picks = [
                _sample_row(logits[i : i + 1], normal[i], row, row.steps)
                for i, row in enumerate(rows)
            ]
            tokens = mx.concatenate(picks, axis=0)
        wanted = [
            n[0] if n is not None and r.params.logprobs else None
            for n, r in zip(normal, rows, strict=True)
        ]
        return tokens, wanted

    def _inputs(self, rows: list[_Row]) -> mx.array:
        """The rows' next tokens as a (B, 1) batch: the step in flight's tokens as they are
        when the rows are that step's, in its order (the common case: no op per row)."""
        flight = self._inflight
        same = flight is not None and len(flight.rows) == len(rows)
        if same and all(a is b for a, b in zip(flight.rows, rows, strict=True)):
            return flight.tokens.reshape(-1, 1)
        return mx.stack([mx.array(r.next_input).reshape(1) for r in rows])

    @staticmethod
    def _views(rows: list[_Row]) -> list[_DecodeView]:
        """One view per layer; layers at the same positions share one offsets array."""
        offsets: dict[tuple[int, ...], mx.array] = {}
        views = []
        for layer in range(len(rows[0].caches)):
            caches = [r.caches[layer] for r in rows]
            key = tuple(c.offset for c in caches)
            if key not in offsets:
                offsets[key] = mx.array(key)
            views.append(_DecodeView(caches, offsets[key]))
        return views


def _processed(logits: mx.array, row: _Row) -> mx.array:
    """One row's (1, vocab) logits through its processors (penalties, constraint)."""
    if not row.processors:
        return logits
    history = row.history()
    try:
        for proc in row.processors:
            logits = proc(history, logits)
    except Exception as exc:  # that row's own constraint: end it alone
        raise RowFailed(row.rid) from exc
    return logits


def _needs_normal(params: RowParams) -> bool:
    """Whether a row needs log-probabilities rather than logits: to report them, or for top-p
    (a cumulative probability). Greedy picks, categorical sampling, min-p and top-k do not
    change under a shift of the logits."""
    return params.logprobs or (params.temperature > 0 and 0 < params.top_p < 1.0)


def _normalized(logits: mx.array) -> mx.array:
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _row_processors(params: RowParams) -> list[LogitsProcessor]:
    procs: list[LogitsProcessor] = make_logits_processors(
        repetition_penalty=params.repetition_penalty
        if params.repetition_penalty not in (None, 1.0)
        else None,
        repetition_context_size=params.repetition_context_size,
        presence_penalty=params.presence_penalty or None,
        presence_context_size=params.repetition_context_size,
        frequency_penalty=params.frequency_penalty or None,
        frequency_context_size=params.repetition_context_size,
    )
    if params.processors is not None:
        procs.extend(params.processors())
    return procs


def row_key(seed: int, step: int) -> mx.array:
    """The PRNG key of a row's ``step``-th token: a function of (seed, step) only.

    It is the key MLX's global generator hands out first after ``mx.random.seed(s)``, so a row
    draws exactly what the single-request ``KeyedSampler`` drew, without global state.
    """
    s = (seed * GOLDEN_GAMMA + step) % 2**64
    return mx.random.split(mx.random.key(s))[1]


def _sample_row(logits: mx.array, normal: mx.array | None, row: _Row, step: int) -> mx.array:
    """mlx-lm's sampler chain (top-p, min-p, top-k, categorical) on one (1, vocab) row; the
    row's log-probabilities where ``_needs_normal`` says so, else its logits."""
    p = row.params
    if p.temperature <= 0:
        return mx.argmax(logits, axis=-1)
    scores = logits
    if 0 < p.top_p < 1.0:
        assert normal is not None
        scores = apply_top_p(normal, p.top_p)
    if p.min_p != 0.0:
        scores = apply_min_p(scores, p.min_p, 1)
    if 0 < p.top_k < scores.shape[-1]:  # a top_k past the vocabulary keeps every token
        scores = apply_top_k(scores, p.top_k)
    key = row_key(row.seed, step)
    return mx.random.categorical(scores * (1.0 / p.temperature), key=key)
