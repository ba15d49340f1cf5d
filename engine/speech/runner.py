"""Speech-to-text with mlx-whisper. Runs only on the worker's single model thread.

The model is loaded once from a local directory (never the hub) and handed to
`mlx_whisper.transcribe` through its process-wide `ModelHolder` cache, wrapped in `_HookedModel`:

- before every 30 s window is decoded (and before every temperature-fallback retry) it calls the
  request's `on_window` hook: cancellation, the time limit, and handing the turn to other
  requests between windows (engine.speech.decode) all happen there;
- it encodes each window once: mlx-whisper runs the encoder again for every fallback
  temperature, for word timestamps and (on long audio) for language detection. Same inputs,
  same results, fewer encoder passes;
- it keeps the language probabilities of the detection pass for verbose_json;
- it runs the temperature fallback ladder itself (engine.speech.guards: whisper.cpp's rules,
  the entropy check among them), decoding a rung greedily with mlx-whisper or, for beam search
  and best_of, with several candidates (engine.speech.beam). mlx-whisper sees one temperature.

Each call's hooks and encoder cache live in a context variable: transcriptions that take turns
(each in its own greenlet, which has its own context) or nest never see each other's.
"""

from __future__ import annotations

import codecs
import contextvars
import importlib
import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.audio import SAMPLE_RATE
from engine.speech.beam import decode_window
from engine.speech.guards import Ladder, drop_repeated_segments, entropy_failed

DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# Beam search has no patience here (nor in whisper.cpp); the others are the runner's to set.
_UNSUPPORTED_OPTIONS = ("patience", "fp16", "verbose", "path_or_hf_repo")

# mlx-whisper is installed apart from mlxd, without its declared (unused) torch requirement.
MLX_WHISPER_MISSING = (
    "mlx-whisper is not installed; install it without its torch requirement: "
    "pip install --no-deps 'mlx-whisper>=0.4.3,<0.5' (from a checkout: make install)"
)


def _nothing() -> None:
    return None


def _load_model_function() -> Callable[..., Any]:
    """mlx-whisper's model loader; without mlx-whisper an error naming how to install it."""
    try:
        from mlx_whisper.load_models import load_model
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] != "mlx_whisper":
            raise
        raise ModuleNotFoundError(MLX_WHISPER_MISSING, name=exc.name) from exc
    return load_model


def _transcribe_module() -> Any:
    # `mlx_whisper.transcribe` the attribute is the function; the module must be imported by name.
    return importlib.import_module("mlx_whisper.transcribe")


def weights_dtype(model_dir: Path) -> mx.Dtype:
    """The floating dtype the weights are stored in (read from the file header, not loaded)."""
    path = model_dir / "weights.safetensors"
    if path.is_file():
        with path.open("rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
        names = {v["dtype"] for k, v in header.items() if k != "__metadata__"}
        for name, dtype in (("F16", mx.float16), ("BF16", mx.bfloat16), ("F32", mx.float32)):
            if name in names:
                return dtype
        return mx.float32
    arrays = mx.load(str(model_dir / "weights.npz"))
    floats = [a.dtype for a in arrays.values() if mx.issubdtype(a.dtype, mx.floating)]
    return floats[0] if floats else mx.float32


@dataclass
class _Call:
    """Per-request state of one transcribe call (a stack of them when calls nest)."""

    on_window: Callable[[], None]
    ladder: Ladder = field(default_factory=Ladder)
    mel: mx.array | None = None
    features: mx.array | None = None
    language_probs: dict[str, float] | None = None


_CALL: contextvars.ContextVar[_Call | None] = contextvars.ContextVar("stt_call", default=None)


class _HookedModel:
    """Delegates to a Whisper model; hooks each window and encodes each window only once."""

    def __init__(self, model: Any) -> None:
        self._model = model

    @property
    def call(self) -> _Call | None:
        return _CALL.get()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def _before_window(self) -> None:
        if self.call is not None:
            self.call.on_window()

    def _features(self, mel: mx.array) -> mx.array:
        """Encoder output for one (frames, n_mels) window, reused while the window is the same."""
        call = self.call
        if call is None:
            return self._model.encoder(mel[None])[0]
        same = call.mel is not None and (
            call.mel is mel
            or (call.mel.shape == mel.shape and mx.array_equal(call.mel, mel).item())
        )
        if not same:
            call.mel, call.features = mel, self._model.encoder(mel[None])[0]
        return call.features

    def decode(self, mel: mx.array, options: Any) -> Any:
        call = self.call
        if call is None or mel.ndim != 2:
            self._before_window()
            return self._model.decode(self._features(mel) if mel.ndim == 2 else mel, options)
        result = None
        for temperature in call.ladder.temperatures:
            self._before_window()
            rung = replace(options, temperature=temperature)
            result, repetitive = self._decode_rung(self._features(mel), rung, call.ladder)
            if not call.ladder.needs_fallback(result, repetitive=repetitive):
                break
        return result

    def _decode_rung(self, features: mx.array, options: Any, ladder: Ladder) -> tuple[Any, bool]:
        """One temperature's result, and whether the entropy check rejected it."""
        width = ladder.width(options.temperature)
        if width > 1 and options.language is not None:
            return decode_window(self._model, features, options, width, ladder.entropy_threshold)
        result = self._model.decode(features, options)
        return result, entropy_failed(result.tokens, ladder.entropy_threshold)

    def detect_language(self, mel: mx.array, tokenizer: Any = None) -> Any:
        self._before_window()
        if mel.ndim != 2:
            return self._model.detect_language(mel, tokenizer)
        tokens, probs = self._model.detect_language(self._features(mel), tokenizer)
        if self.call is not None:
            self.call.language_probs = dict(probs)
        return tokens, probs

    def forward_with_cross_qk(self, mel: mx.array, tokens: mx.array) -> Any:
        if mel.ndim == 3 and mel.shape[0] == 1:
            features = self._features(mel[0])[None]
        else:
            features = self._model.encoder(mel)
        logits, _, cross_qk = self._model.decoder(tokens, features)
        return logits, cross_qk


class SpeechRunner:
    """A loaded Whisper model; `transcribe` returns mlx_whisper.transcribe's result dict plus
    `pieces` per segment (text tokens grouped into valid UTF-8 strings) and, when asked for or
    detected, `language_probs`."""

    def __init__(self, model: Any, model_dir: Path, model_id: str, dtype: mx.Dtype) -> None:
        self.model_id = model_id
        self.model_dir = model_dir
        self.dtype = dtype
        self.fp16 = dtype != mx.float32
        self._model = _HookedModel(model)
        self._key = str(model_dir)

    @property
    def multilingual(self) -> bool:
        return bool(self._model.is_multilingual)

    @classmethod
    def load(cls, model_dir: Path, model_id: str) -> SpeechRunner:
        """Load once from an existing local directory, then warm up (graphs, DTW compilation)."""
        load_model = _load_model_function()
        model_dir = Path(model_dir).resolve()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no Whisper model at {model_dir} (config.json missing)")
        dtype = weights_dtype(model_dir)
        compute = mx.float32 if dtype == mx.float32 else mx.float16
        from engine.speech.text_decoder import adopt  # imports mlx_whisper

        model = adopt(load_model(str(model_dir), dtype=compute))
        runner = cls(model, model_dir, model_id, dtype)
        runner.warm_up()
        return runner

    def warm_up(self) -> None:
        """One short decode, and numba's compilation of the word-timestamp alignment (~2 s)."""
        from mlx_whisper.timing import dtw

        self.transcribe(np.zeros(SAMPLE_RATE, np.float32), language="en", temperature=0.0)
        dtw(np.zeros((4, 6), np.float32))

    def _mel_window(self, audio: np.ndarray) -> mx.array:
        """The first 30 s window exactly as mlx_whisper.transcribe builds it."""
        from mlx_whisper.audio import N_FRAMES, N_SAMPLES, log_mel_spectrogram, pad_or_trim

        mel = log_mel_spectrogram(audio, n_mels=self._model.dims.n_mels, padding=N_SAMPLES)
        return pad_or_trim(mel, N_FRAMES, axis=-2).astype(mx.float16 if self.fp16 else mx.float32)

    def detect_language(
        self, audio: np.ndarray, *, on_window: Callable[[], None] = _nothing
    ) -> dict[str, float]:
        """Probability of each language code in the first 30 s."""
        if not self.multilingual:
            return {"en": 1.0}
        with self._calling(on_window) as call:
            self._model.detect_language(self._mel_window(_samples(audio)))
            return dict(call.language_probs or {})

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        task: str = "transcribe",
        temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
        initial_prompt: str | None = None,
        word_timestamps: bool = False,
        language_probs: bool = False,
        on_window: Callable[[], None] = _nothing,
        **decode_options: Any,
    ) -> dict:
        """Transcribe float32 mono 16 kHz samples. `on_window` runs before every window; what
        it raises (Cancelled, a time limit) ends the transcription."""
        for name in _UNSUPPORTED_OPTIONS:
            decode_options.pop(name, None)
        ladder = _ladder(temperature, decode_options)
        if not self.multilingual:
            language, task = "en", "transcribe"
        samples = _samples(audio)
        with self._calling(on_window, ladder) as call:
            if language_probs and language is not None and self.multilingual:
                self._model.detect_language(self._mel_window(samples))
            result = self._run(
                samples,
                language=language,
                task=task,
                temperature=ladder.temperatures[0],
                initial_prompt=initial_prompt,
                logprob_threshold=ladder.logprob_threshold,
                no_speech_threshold=ladder.no_speech_threshold,
                compression_ratio_threshold=None,
                word_timestamps=word_timestamps,
                **decode_options,
            )
            probs = call.language_probs
        return self._finish(_plain(result), probs, task, language_probs)

    def transcribe_pieces(
        self,
        pieces: list[tuple[np.ndarray, int]],
        *,
        batch: int,
        language: str | None,
        task: str = "transcribe",
        temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
        initial_prompt: str | None = None,
        word_timestamps: bool = False,
        language_probs: bool = False,
        on_window: Callable[[], None] = _nothing,
        **decode_options: Any,
    ) -> dict:
        """Independent pieces of audio (samples, first sample in the original audio), none
        conditioned on another's text, their windows decoded greedily `batch` at a time
        (engine.speech.batched, no beam search); the result as `transcribe`'s, times in the
        original audio."""
        from engine.speech.batched import Decoding, split_pieces, transcribe_pieces

        if not self.multilingual:
            language, task = "en", "transcribe"
        decoding = Decoding(
            language=language,
            task=task,
            initial_prompt=initial_prompt,
            word_timestamps=word_timestamps,
            without_timestamps=bool(decode_options.get("without_timestamps")),
            ladder=_ladder(temperature, decode_options),
        )
        pieces = split_pieces([(_samples(a), start) for a, start in pieces], batch)
        probs = None
        if language_probs and language is not None and self.multilingual and pieces:
            probs = self.detect_language(pieces[0][0], on_window=on_window)
        outcome = transcribe_pieces(
            self._model._model,
            pieces,
            decoding,
            batch=batch,
            dtype=mx.float16 if self.fp16 else mx.float32,
            on_window=on_window,
        )
        probs = probs or outcome.language_probs
        return self._finish(_plain(outcome.result), probs, task, language_probs)

    def _run(self, samples: np.ndarray, **options: Any) -> dict:
        module = _transcribe_module()
        # Hand our loaded model to mlx-whisper's cache (keyed by path) so it never reloads.
        module.ModelHolder.model, module.ModelHolder.model_path = self._model, self._key
        return module.transcribe(
            samples,
            path_or_hf_repo=self._key,
            verbose=None,
            fp16=self.fp16,
            **options,
        )

    @contextmanager
    def _calling(
        self, on_window: Callable[[], None], ladder: Ladder | None = None
    ) -> Iterator[_Call]:
        """Install a call's hooks on the model; restore the enclosing call's afterwards."""
        call = _Call(on_window, ladder or Ladder())
        token = _CALL.set(call)
        try:
            yield call
        finally:
            _CALL.reset(token)

    def _finish(
        self, result: dict, probs: dict[str, float] | None, task: str, language_probs: bool
    ) -> dict:
        """Repeated segments dropped, token pieces added, and the language probabilities when
        there are some (asked for but never detected: the language given, with certainty)."""
        from mlx_whisper.tokenizer import get_tokenizer

        if language_probs and probs is None:
            probs = {result["language"]: 1.0}

        model = self._model
        tokenizer = get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=None, task=task
        )
        result = drop_repeated_segments(result)
        for segment in result["segments"]:
            segment["pieces"] = token_pieces(tokenizer.encoding, segment["tokens"], tokenizer.eot)
        if probs is not None:
            result["language_probs"] = {k: float(v) for k, v in probs.items()}
        return result


def _ladder(temperature: float | tuple[float, ...], options: dict[str, Any]) -> Ladder:
    """The fallback ladder and guards, taken out of mlx-whisper's decode options (the runner
    runs the ladder; mlx-whisper's own compression-ratio fallback never sees a second rung)."""
    temperatures = (temperature,) if isinstance(temperature, int | float) else temperature
    return Ladder(
        temperatures=tuple(float(t) for t in temperatures),
        beam_size=options.pop("beam_size", None) or 1,
        best_of=options.pop("best_of", None) or 1,
        entropy_threshold=options.pop("entropy_threshold", None),
        compression_ratio_threshold=options.pop("compression_ratio_threshold", 2.4),
        logprob_threshold=options.pop("logprob_threshold", -1.0),
        no_speech_threshold=options.pop("no_speech_threshold", 0.6),
    )


def _samples(audio: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(audio, dtype=np.float32)


def token_pieces(encoding: Any, tokens: list[int], eot: int) -> list[list[Any]]:
    """Text tokens grouped so each group is whole UTF-8 text: [[text, [token ids]], ...].

    A CJK character often spans two byte-level tokens; whisper-server counts and splits
    segments by token bytes, so `max_len` wrapping works on these pieces.
    """
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    pieces: list[list[Any]] = []
    text, ids = "", []
    for token in tokens:
        if token >= eot:
            continue
        text += decoder.decode(encoding.decode_single_token_bytes(token))
        ids.append(token)
        if not decoder.getstate()[0]:  # no incomplete character pending
            pieces.append([text, ids])
            text, ids = "", []
    text += decoder.decode(b"", final=True)
    if ids:
        pieces.append([text, ids])
    return pieces


def _plain(value: Any) -> Any:
    """numpy scalars (word timestamps come back as np.float64) to plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def smoke_test(model_dir: Path) -> None:
    """Load as the service does, then run the encoder and one decoder step on 1 s of silence
    (`mlxd convert` runs this). The encoder sees just that second (50 positions, not a padded
    30 s window): every layer and kernel still runs, at 1/30 of the cost."""
    from mlx_whisper.audio import log_mel_spectrogram
    from mlx_whisper.load_models import load_model

    model_dir = Path(model_dir)
    compute = mx.float32 if weights_dtype(model_dir) == mx.float32 else mx.float16
    model = load_model(str(model_dir), dtype=compute)
    mel = log_mel_spectrogram(mx.zeros((SAMPLE_RATE,)), n_mels=model.dims.n_mels)[:100]
    features = _encode_short(model, mel.astype(compute)[None])
    sot = 50258 if model.is_multilingual else 50257
    logits = model.logits(mx.array([[sot]]), features)
    mx.eval(logits)
    if logits.shape != (1, 1, model.dims.n_vocab):
        raise ValueError(f"smoke test: logits have shape {logits.shape}")
    if not bool(mx.all(mx.isfinite(logits)).item()):
        raise ValueError("smoke test: the decoder produced non-finite logits")


def _encode_short(model: Any, mel: mx.array) -> mx.array:
    """The encoder on fewer frames than a full window (positions sliced to match)."""
    encoder = model.encoder
    full = encoder._positional_embedding
    encoder._positional_embedding = full[: mel.shape[1] // 2]
    try:
        features = encoder(mel)
        mx.eval(features)
    finally:
        encoder._positional_embedding = full
    return features
