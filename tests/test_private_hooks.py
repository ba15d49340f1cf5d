"""The private internals of mlx-lm, mlx-vlm, mlx-whisper and transformers that mlxd relies on.

pyproject.toml pins each of these libraries to a compatible release; when an upgrade moves one
of these hooks, its test fails with a message naming the hook and the installed version.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import version

import pytest


def check(distribution: str, hook: str, condition: Callable[[], bool]) -> None:
    try:
        held = condition()
    except (AttributeError, ImportError, TypeError, KeyError) as exc:
        held, detail = False, f"{type(exc).__name__}: {exc}"
    else:
        detail = "the check returned False"
    if not held:
        pytest.fail(
            f"{distribution} {version(distribution)}: private hook moved: {hook} ({detail})"
        )


def source_of(module: str, name: str) -> str:
    return inspect.getsource(getattr(importlib.import_module(module), name))


def test_mlx_lm_tokenizer_wrapper_keeps_the_hf_tokenizer() -> None:
    """engine.chat.runner.ChatRunner.load takes `wrapper._tokenizer` from mlx_lm.load."""
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    )
    check("mlx-lm", "TokenizerWrapper._tokenizer", lambda: TokenizerWrapper(hf)._tokenizer is hf)


def test_mlx_lm_model_remapping() -> None:
    """engine.chat.runner.is_text_only maps model types through mlx_lm.utils.MODEL_REMAPPING."""
    from mlx_lm import utils

    check("mlx-lm", "mlx_lm.utils.MODEL_REMAPPING", lambda: isinstance(utils.MODEL_REMAPPING, dict))


@pytest.mark.parametrize(
    ("distribution", "module"),
    [
        ("mlx-lm", "mlx_lm.models.gemma3_text"),
        ("mlx-lm", "mlx_lm.models.gemma4_text"),
        ("mlx-vlm", "mlx_vlm.models.gemma4.language"),
    ],
)
def test_attention_is_a_module_level_function(distribution: str, module: str) -> None:
    """engine.chat.batch wraps the model module's `scaled_dot_product_attention` so that a
    batched decode step attends over each row's own keys (ragged, no padding)."""
    loaded = importlib.import_module(module)
    check(
        distribution,
        f"{module}.scaled_dot_product_attention (called from the attention layer)",
        lambda: (
            callable(loaded.scaled_dot_product_attention)
            and "scaled_dot_product_attention(" in inspect.getsource(loaded)
        ),
    )


@pytest.mark.parametrize(
    ("distribution", "module"),
    [("mlx-lm", "mlx_lm.models.cache"), ("mlx-vlm", "mlx_vlm.models.cache")],
)
def test_kv_caches_are_plain_attributes(distribution: str, module: str) -> None:
    """engine.chat.batch clones a cache by copying its attributes (arrays and ints) and hands
    each layer a stand-in with `offset`, `update_and_fetch` and `make_mask`."""
    import mlx.core as mx

    caches = importlib.import_module(module)

    def plain() -> bool:
        cache = caches.KVCache()
        cache.update_and_fetch(mx.zeros((1, 1, 2, 4)), mx.zeros((1, 1, 2, 4)))
        rotating = caches.RotatingKVCache(max_size=4)
        return {"keys", "values", "offset"} <= set(vars(cache)) and hasattr(rotating, "make_mask")

    check(distribution, f"{module}.KVCache / RotatingKVCache attributes", plain)


def test_mlx_vlm_gemma4_embeddings_and_language_model_call() -> None:
    """engine.chat.batch prefills a VLM prompt from `get_input_embeddings` (vision merged) in
    chunks through the language model's `inputs_embeds` / `per_layer_inputs`."""
    from mlx_vlm.models.gemma4 import gemma4, language

    def shaped() -> bool:
        embed = inspect.signature(gemma4.Model.get_input_embeddings).parameters
        call = inspect.signature(language.LanguageModel.__call__).parameters
        wanted = {"inputs", "inputs_embeds", "per_layer_inputs", "cache", "kwargs"}
        return {"input_ids", "pixel_values", "kwargs"} <= set(embed) and wanted <= set(call)

    check("mlx-vlm", "gemma4 get_input_embeddings / LanguageModel.__call__ parameters", shaped)


def test_mlx_vlm_gemma4_audio_path() -> None:
    """engine.chat.audio_tower runs the processor's feature extractor, the model's audio tower
    (mask True on padding) and embedder, and scatters with gemma4's `masked_scatter`."""
    from mlx_vlm.models.gemma4 import audio, gemma4, processing_gemma4

    def shaped() -> bool:
        tower = list(inspect.signature(audio.AudioEncoder.__call__).parameters)
        processor = source_of(processing_gemma4.__name__, "Gemma4Processor")
        held = ("self.audio_ms_per_token", "self.audio_seq_length", "self.feature_extractor")
        return (
            tower == ["self", "audio_mel", "audio_mel_mask"]
            and callable(gemma4.masked_scatter)
            and "self.embed_audio" in source_of(gemma4.__name__, "Model")
            and all(name in processor for name in held)
        )

    check("mlx-vlm", "gemma4 audio tower / masked_scatter / processor audio attributes", shaped)


def test_mlx_lm_sampling_steps() -> None:
    """engine.chat.batch samples each row with mlx-lm's own top-p, min-p and top-k steps."""
    from mlx_lm import sample_utils

    names = ("apply_top_p", "apply_min_p", "apply_top_k", "make_logits_processors")
    check(
        "mlx-lm",
        "mlx_lm.sample_utils." + "/".join(names),
        lambda: all(callable(getattr(sample_utils, n)) for n in names),
    )


def test_mlx_vlm_skip_multimodal_module() -> None:
    """conversions.gemma keeps the towers unquantized with mlx-vlm's own rule."""
    from mlx_vlm import utils

    check(
        "mlx-vlm",
        "mlx_vlm.utils.skip_multimodal_module",
        lambda: utils.skip_multimodal_module("vision_tower.x") is True,
    )


def test_mlx_whisper_model_holder_caches_by_path() -> None:
    """engine.speech.runner hands its loaded model to transcribe() through ModelHolder."""
    module = importlib.import_module("mlx_whisper.transcribe")
    sentinel = object()
    saved = module.ModelHolder.model, module.ModelHolder.model_path
    try:
        module.ModelHolder.model, module.ModelHolder.model_path = sentinel, "mlxd-key"
        check(
            "mlx-whisper",
            "mlx_whisper.transcribe.ModelHolder.get_model",
            lambda: module.ModelHolder.get_model("mlxd-key", None) is sentinel,
        )
    finally:
        module.ModelHolder.model, module.ModelHolder.model_path = saved


@pytest.mark.parametrize(
    ("module", "function", "call"),
    [
        ("mlx_whisper.transcribe", "transcribe", "model.decode("),
        ("mlx_whisper.transcribe", "transcribe", "model.detect_language("),
        ("mlx_whisper.timing", "find_alignment", "model.forward_with_cross_qk("),
        ("mlx_whisper.decoding", "detect_language", "model.encoder("),
    ],
)
def test_mlx_whisper_calls_the_hooked_model_methods(module: str, function: str, call: str) -> None:
    """engine.speech.runner._HookedModel intercepts these calls (window hook, encoder reuse)."""
    check(
        "mlx-whisper",
        f"{module}.{function} calls {call}...)",
        lambda: call in source_of(module, function),
    )


def test_mlx_whisper_encoder_positional_embedding() -> None:
    """engine.speech.runner.smoke_test slices the encoder's positions for a 1 s input."""
    from mlx_whisper.whisper import ModelDimensions, Whisper

    dims = ModelDimensions(80, 20, 8, 2, 1, 64, 4, 8, 2, 1)
    check(
        "mlx-whisper",
        "AudioEncoder._positional_embedding",
        lambda: Whisper(dims).encoder._positional_embedding.shape == (20, 8),
    )


def test_transformers_gguf_tokenizer_conversion() -> None:
    """conversions.gemma rebuilds a GGUF's tokenizer with transformers' integration."""
    from transformers.integrations import gguf

    check(
        "transformers",
        "transformers.integrations.gguf.get_gguf_tokenizer / convert_gguf_tokenizer",
        lambda: callable(gguf.get_gguf_tokenizer) and callable(gguf.convert_gguf_tokenizer),
    )
