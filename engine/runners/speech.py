"""Speech-to-text with mlx-whisper. Runs only on the worker's single model thread.

The model is loaded once from a local directory (never the hub) and handed to
`mlx_whisper.transcribe` through its process-wide `ModelHolder` cache, wrapped so that the
cancellation callback is checked before every 30 s window is decoded (and before every
temperature-fallback retry of a window). A cancelled request raises `Cancelled`.
"""

from __future__ import annotations

import importlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from engine.scheduler import Cancelled

SAMPLE_RATE = 16_000
DEFAULT_TEMPERATURES = (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
# mlx-whisper 0.4.3 raises NotImplementedError for beam search; decode greedily instead.
_UNSUPPORTED_OPTIONS = ("beam_size", "patience", "fp16", "verbose", "path_or_hf_repo")


def _never() -> bool:
    return False


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


class _CancellableModel:
    """Delegates to a Whisper model; checks for cancellation before each decode call."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.check: Callable[[], None] = lambda: None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._model(*args, **kwargs)

    def decode(self, mel: mx.array, options: Any) -> Any:
        self.check()
        return self._model.decode(mel, options)

    def detect_language(self, mel: mx.array, tokenizer: Any = None) -> Any:
        self.check()
        return self._model.detect_language(mel, tokenizer)


class SpeechRunner:
    """A loaded Whisper model; `transcribe` returns mlx_whisper.transcribe's result dict."""

    def __init__(self, model: Any, model_dir: Path, model_id: str, dtype: mx.Dtype) -> None:
        self.model_id = model_id
        self.model_dir = model_dir
        self.dtype = dtype
        self.fp16 = dtype != mx.float32
        self._model = _CancellableModel(model)
        self._key = str(model_dir)

    @classmethod
    def load(cls, model_dir: Path, model_id: str) -> SpeechRunner:
        """Load once from an existing local directory, then warm up on one second of silence."""
        from mlx_whisper.load_models import load_model

        model_dir = Path(model_dir).resolve()
        if not (model_dir / "config.json").is_file():
            raise FileNotFoundError(f"no Whisper model at {model_dir} (config.json missing)")
        dtype = weights_dtype(model_dir)
        compute = mx.float32 if dtype == mx.float32 else mx.float16
        runner = cls(load_model(str(model_dir), dtype=compute), model_dir, model_id, dtype)
        runner.transcribe(np.zeros(SAMPLE_RATE, np.float32), language="en", temperature=0.0)
        return runner

    def transcribe(
        self,
        audio: np.ndarray,
        *,
        language: str | None,
        task: str = "transcribe",
        temperature: float | tuple[float, ...] = DEFAULT_TEMPERATURES,
        initial_prompt: str | None = None,
        word_timestamps: bool = False,
        is_cancelled: Callable[[], bool] = _never,
        **decode_options: Any,
    ) -> dict:
        """Transcribe float32 mono 16 kHz samples; raises Cancelled between windows."""

        def check() -> None:
            if is_cancelled():
                raise Cancelled("transcription cancelled")

        check()
        for name in _UNSUPPORTED_OPTIONS:
            decode_options.pop(name, None)
        module = _transcribe_module()
        # Hand our loaded model to mlx-whisper's cache (keyed by path) so it never reloads.
        module.ModelHolder.model, module.ModelHolder.model_path = self._model, self._key
        self._model.check = check
        try:
            result = module.transcribe(
                np.ascontiguousarray(audio, dtype=np.float32),
                path_or_hf_repo=self._key,
                verbose=None,
                fp16=self.fp16,
                language=language,
                task=task,
                temperature=temperature,
                initial_prompt=initial_prompt,
                word_timestamps=word_timestamps,
                **decode_options,
            )
        finally:
            self._model.check = lambda: None
        return _plain(result)


def _plain(value: Any) -> Any:
    """numpy scalars (word timestamps come back as np.float64) to plain Python values."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value
