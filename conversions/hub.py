"""Downloads from the Hugging Face hub for `mlxd pull` (never used at serve time)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from conversions.common import ConversionError
from conversions.progress import download_bars

# What a converter reads; everything else in a repo (ONNX, GGUF, other frameworks) is skipped.
CONFIG_PATTERNS = ["*.json", "*.txt", "*.model", "*.jinja", "*.tiktoken", "1_Pooling/*"]
WEIGHT_SUFFIXES = (".safetensors",)
FALLBACK_WEIGHTS = ("pytorch_model.bin",)


@dataclass(frozen=True)
class Download:
    path: Path
    repo: str
    revision: str


def _offline_hint(repo: str, kind: str | None) -> str:
    kind_arg = kind or "chat|embeddings|stt"
    return (
        f"download {repo} on a machine with network access (e.g. `hf download {repo}`), copy "
        f"the folder here and run `mlxd convert {kind_arg} FOLDER --as ID`"
    )


def _weight_patterns(files: list[str]) -> list[str]:
    if any(f.endswith(WEIGHT_SUFFIXES) for f in files):
        return [f"*{suffix}" for suffix in WEIGHT_SUFFIXES]
    fallback = [f for f in files if f.rsplit("/", 1)[-1] in FALLBACK_WEIGHTS]
    if not fallback:
        raise ConversionError("the repository has no safetensors or pytorch_model.bin weights")
    return fallback


def download(repo: str, revision: str | None = None, kind: str | None = None) -> Download:
    """Fetch what a converter needs from `repo` into the hub cache (resumable; HF_TOKEN used)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        info = HfApi().model_info(repo, revision=revision)
        files = [s.rfilename for s in info.siblings or []]
        patterns = CONFIG_PATTERNS + _weight_patterns(files)
        path = snapshot_download(
            repo, revision=info.sha, allow_patterns=patterns, tqdm_class=download_bars()
        )
    except GatedRepoError as exc:
        raise ConversionError(
            f"{repo} is gated: accept its licence on huggingface.co and set HF_TOKEN ({exc})"
        ) from None
    except RepositoryNotFoundError:
        raise ConversionError(f"no such model repository on the hub: {repo}") from None
    except RevisionNotFoundError:
        raise ConversionError(f"{repo} has no revision {revision!r}") from None
    except ConversionError:
        raise
    except Exception as exc:  # no network, DNS, proxy: the HTTP client's own error types
        raise ConversionError(
            f"could not download {repo} from the Hugging Face hub ({type(exc).__name__}: "
            f"{exc}). Offline? {_offline_hint(repo, kind)}"
        ) from None
    return Download(Path(path), repo, info.sha or revision or "main")
