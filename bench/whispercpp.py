"""whisper.cpp (the `pywhispercpp` wheel bundles it) on the same Whisper weights the MLX side runs,
for bench/stt.py's comparison.

    python bench/whispercpp.py [--model DIR] [--ggml OUT.bin] [--threads 2] WAV

DIR is an MLX Whisper directory (`mlxd convert stt` output); the default is Whisper base from the
PyPI packages, converted once (tests/real_weights.py). `ggml_from_mlx` writes whisper.cpp's ggml
model file from it; nothing is downloaded. The file, as whisper.cpp's `whisper_model_load` reads
it, little-endian throughout:

- int32 magic "ggml", then 11 int32 hparams: the ten Whisper dims in whisper.cpp's order and
  ftype 1 (matrices float16; the wheel's CPU build aborts in the conv on a float32 file);
- the mel filterbank: int32 n_mels, int32 n_freq, float32 [n_mels, n_freq];
- the byte-level BPE vocabulary: int32 count, then each token as int32 length + bytes, in rank
  order (special tokens are not stored: whisper.cpp names them from n_vocab);
- every tensor: int32 n_dims, int32 name length, int32 type (0 f32, 1 f16), the dims innermost
  first (numpy's shape reversed), the name, the data. Names are OpenAI's (`mlp.0`, `mlp.2`
  where MLX says `mlp1`, `mlp2`), conv kernels are (out, in, kernel), conv biases (n, 1);
  matrices and conv kernels are float16, vectors, conv biases and both positional tables
  float32; the encoder's sinusoidal table, which MLX computes, is stored.

Decoding matches what mlx_whisper.transcribe does by default: greedy, one sample per temperature
on the 0..1 ladder by 0.2, previous text as the prompt, non-speech tokens suppressed, language en.
"""

from __future__ import annotations

import argparse
import atexit
import json
import struct
import sys
import time
from functools import lru_cache
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

GGML_MAGIC = 0x67676D6C
GGML_F32, GGML_F16 = 0, 1
HPARAMS = (
    "n_vocab",
    "n_audio_ctx",
    "n_audio_state",
    "n_audio_head",
    "n_audio_layer",
    "n_text_ctx",
    "n_text_state",
    "n_text_head",
    "n_text_layer",
    "n_mels",
)
ALWAYS_F32 = frozenset(
    {
        "encoder.conv1.bias",
        "encoder.conv2.bias",
        "encoder.positional_embedding",
        "decoder.positional_embedding",
    }
)
CONV_WEIGHTS = frozenset({"encoder.conv1.weight", "encoder.conv2.weight"})
CONV_BIASES = frozenset({"encoder.conv1.bias", "encoder.conv2.bias"})
MULTILINGUAL_VOCAB = 51865

MISMATCH = (
    "whisper.cpp gets the same Whisper base values (the PyPI checkpoint is float16, so its float16 "
    "ggml file loses nothing), but stores and multiplies matrices and conv kernels in float16 as "
    "OpenAI's ggml-base.bin does, while the MLX side computes in float32 (the conversion "
    "bench/stt.py uses by default)."
)

DECODING: dict[str, Any] = {
    "language": "en",
    "temperature": 0.0,
    "temperature_inc": 0.2,
    "greedy": {"best_of": 1},
    "no_context": False,
    "suppress_nst": True,
    "print_progress": False,
    "print_realtime": False,
    "print_timestamps": False,
}


def available() -> bool:
    """Whether pywhispercpp (and the whisper.cpp library in its wheel) imports here."""
    try:
        import pywhispercpp.model  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


# ------------------------------------------------------------------------------ ggml writer


def read_dims(model_dir: Path) -> dict[str, int]:
    config = json.loads((model_dir / "config.json").read_text())
    if "quantization" in config:
        raise ValueError(
            f"{model_dir} is quantized; whisper.cpp needs float weights: convert with "
            "--dtype float16 or float32"
        )
    return {name: int(config[name]) for name in HPARAMS}


def read_weights(model_dir: Path) -> dict[str, np.ndarray]:
    """The MLX parameters as float32 numpy arrays (safetensors or npz; any float dtype)."""
    import mlx.core as mx

    for name in ("weights.safetensors", "weights.npz"):
        if (model_dir / name).is_file():
            loaded = mx.load(str(model_dir / name))
            break
    else:
        raise FileNotFoundError(f"no weights.safetensors or weights.npz in {model_dir}")
    loaded.pop("alignment_heads", None)
    return {name: np.array(value.astype(mx.float32)) for name, value in loaded.items()}


def openai_layout(weights: dict[str, np.ndarray], dims: dict[str, int]) -> dict[str, np.ndarray]:
    """MLX names and layouts -> the PyTorch checkpoint's, plus the encoder's positional table."""
    from mlx_whisper.whisper import sinusoids

    tensors = {}
    for name, value in weights.items():
        name = name.replace(".mlp1.", ".mlp.0.").replace(".mlp2.", ".mlp.2.")
        if name in CONV_WEIGHTS:
            value = value.transpose(0, 2, 1)  # MLX (out, kernel, in) -> (out, in, kernel)
        elif name in CONV_BIASES:
            value = value.reshape(-1, 1)
        tensors[name] = value
    positions = sinusoids(dims["n_audio_ctx"], dims["n_audio_state"])
    tensors["encoder.positional_embedding"] = np.array(positions, dtype=np.float32)
    return tensors


def ggml_type(name: str, value: np.ndarray) -> int:
    return GGML_F16 if value.ndim >= 2 and name not in ALWAYS_F32 else GGML_F32


def write_tensor(out: BinaryIO, name: str, value: np.ndarray, kind: int) -> None:
    encoded = name.encode()
    out.write(struct.pack("<3i", value.ndim, len(encoded), kind))
    out.write(struct.pack(f"<{value.ndim}i", *reversed(value.shape)))
    out.write(encoded)
    out.write(np.ascontiguousarray(value, dtype="<f2" if kind == GGML_F16 else "<f4").tobytes())


def write_mel_filters(out: BinaryIO, n_mels: int) -> None:
    from mlx_whisper.audio import mel_filters

    filters = np.array(mel_filters(n_mels), dtype="<f4")
    out.write(struct.pack("<2i", *filters.shape))
    out.write(filters.tobytes())


def vocabulary(n_vocab: int) -> list[bytes]:
    """The BPE tokens in rank order, from the tiktoken file mlx_whisper ships for this vocab."""
    import base64

    import mlx_whisper

    name = "multilingual" if n_vocab >= MULTILINGUAL_VOCAB else "gpt2"
    path = Path(mlx_whisper.__file__).parent / "assets" / f"{name}.tiktoken"
    ranked = []
    for line in path.read_bytes().splitlines():
        if line:
            token, rank = line.split()
            ranked.append((int(rank), base64.b64decode(token)))
    return [token for _, token in sorted(ranked)]


def write_vocabulary(out: BinaryIO, n_vocab: int) -> None:
    tokens = vocabulary(n_vocab)
    out.write(struct.pack("<i", len(tokens)))
    for token in tokens:
        out.write(struct.pack("<i", len(token)) + token)


def ggml_from_mlx(model_dir: Path, out: Path) -> Path:
    """Write whisper.cpp's ggml model file (float16 matrices, like OpenAI's ggml files) for the
    MLX Whisper directory `model_dir` to `out`."""
    dims = read_dims(model_dir)
    tensors = openai_layout(read_weights(model_dir), dims)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with partial.open("wb") as handle:
        handle.write(struct.pack("<I11i", GGML_MAGIC, *(dims[n] for n in HPARAMS), GGML_F16))
        write_mel_filters(handle, dims["n_mels"])
        write_vocabulary(handle, dims["n_vocab"])
        for name, value in tensors.items():
            write_tensor(handle, name, value, ggml_type(name, value))
    partial.replace(out)
    return out


# ------------------------------------------------------------------------------ transcription


@lru_cache(maxsize=1)
def loaded_model(ggml: Path, threads: int) -> Any:
    from pywhispercpp.model import Model

    return Model(str(ggml), redirect_whispercpp_logs_to=None, n_threads=threads, **DECODING)


# Free the model before the interpreter tears modules down (pywhispercpp's __del__ needs them).
atexit.register(loaded_model.cache_clear)


def transcribe(ggml: Path, wav: Path, threads: int = 2) -> tuple[str, float]:
    """whisper.cpp's text for `wav` and the wall seconds it took, decoding included (the model
    is loaded before the clock starts and kept for the next call)."""
    from mlx_whisper.audio import load_audio

    model = loaded_model(Path(ggml), threads)
    started = time.perf_counter()
    segments = model.transcribe(np.array(load_audio(str(wav))))
    elapsed = time.perf_counter() - started
    return " ".join(segment.text for segment in segments).strip(), elapsed


def audio_seconds(wav: Path) -> float:
    from mlx_whisper.audio import SAMPLE_RATE, load_audio

    return len(load_audio(str(wav))) / SAMPLE_RATE


def default_model() -> Path:
    sys.path.insert(0, str(ROOT))
    from tests.real_weights import whisper_base_mlx

    return whisper_base_mlx()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("wav", type=Path)
    parser.add_argument("--model", type=Path, help="MLX Whisper directory (default: base)")
    parser.add_argument("--ggml", type=Path, help="ggml file to write (default: DIR-ggml-f16.bin)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    if not available():
        print("pywhispercpp is not installed: pip install pywhispercpp", file=sys.stderr)
        return 1
    model = args.model or default_model()
    ggml = args.ggml or model.with_name(model.name + "-ggml-f16.bin")
    if not ggml.is_file():
        ggml_from_mlx(model, ggml)
    text, wall = transcribe(ggml, args.wav, args.threads)
    seconds = audio_seconds(args.wav)
    print(text)
    print(f"\naudio {seconds:.1f} s, whisper.cpp wall {wall:.2f} s with {args.threads} threads:")
    print(f"real-time factor {seconds / wall:.2f} (audio s / wall s; higher is faster)")
    print(f"weights: {MISMATCH}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
