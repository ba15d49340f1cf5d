"""Tiny random bge-shaped BERT checkpoints, built offline for tests.

`build_bge_hf` writes a Hugging Face layout directory (what BAAI/bge-base-zh-v1.5 ships,
shrunk); `build_bge_mlx` converts it with mlx-embeddings' own converter (float32).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

SEED = 1234
HIDDEN = 32
LAYERS = 2
HEADS = 2
INTERMEDIATE = 64
MAX_POSITIONS = 512
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

CORPUS = [
    "今天天气很好，我们去公园散步吧。",
    "北京是中华人民共和国的首都。",
    "机器学习模型可以把文本变成向量。",
    "我喜欢喝茶，也喜欢读书和写字。",
    "上海的夜景非常漂亮，人也很多。",
    "请问最近的地铁站在哪里？",
    "语言模型需要大量的数据来训练。",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map sentences to vectors for semantic search.",
    "Hello world, this is a tiny tokenizer for testing purposes only.",
    "Apple silicon runs machine learning models in unified memory.",
    "Please find the nearest subway station and buy a ticket.",
    "Green tea and books make a quiet afternoon.",
    "Numbers like 2024, 512 and 3.14 also appear in text!",
    "春天来了，花开了，小鸟在树上唱歌。",
    "这家饭馆的饺子和面条都很好吃。",
    "他每天早上六点起床，然后跑步半个小时。",
    "中文分词和英文分词的方法不一样。",
    "Vectors with unit norm make cosine similarity a dot product.",
    "Whisper transcribes speech, and BERT encodes sentences.",
]


def _pretokenize(text: str) -> list[str]:
    normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    words = pre_tokenizers.BertPreTokenizer().pre_tokenize_str(normalizer.normalize_str(text))
    return [w for w, _ in words]


def _vocab() -> list[str]:
    """A deterministic WordPiece vocab: every character (plain and ##-continuation) plus
    the corpus' whole words. (tokenizers' WordPieceTrainer breaks ties differently on every
    run, so its vocab is not reproducible.)"""
    words = sorted({w for line in CORPUS for w in _pretokenize(line)})
    chars = sorted({c for w in words for c in w})
    latin = [c for c in chars if c.isascii() and c.isalnum()]
    whole = [w for w in words if len(w) > 1]
    return SPECIALS + chars + [f"##{c}" for c in latin] + whole


def _build_tokenizer() -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(_vocab())}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.add_special_tokens(SPECIALS)
    return tok


def _write_tokenizer(tok: Tokenizer, dest: Path) -> int:
    tok.save(str(dest / "tokenizer.json"))
    vocab = sorted(tok.get_vocab().items(), key=lambda kv: kv[1])
    (dest / "vocab.txt").write_text("".join(f"{t}\n" for t, _ in vocab), encoding="utf-8")
    specials = {
        "unk_token": "[UNK]",
        "sep_token": "[SEP]",
        "pad_token": "[PAD]",
        "cls_token": "[CLS]",
        "mask_token": "[MASK]",
    }
    tok_config = {
        "tokenizer_class": "BertTokenizer",
        "do_lower_case": True,
        "do_basic_tokenize": True,
        "tokenize_chinese_chars": True,
        "strip_accents": None,
        "model_max_length": MAX_POSITIONS,
        "clean_up_tokenization_spaces": True,
        **specials,
    }
    _dump(dest / "tokenizer_config.json", tok_config)
    _dump(dest / "special_tokens_map.json", specials)
    return len(vocab)


def _config(vocab_size: int) -> dict:
    return {
        "_name_or_path": "tiny-bge-base-zh",
        "architectures": ["BertModel"],
        "attention_probs_dropout_prob": 0.1,
        "classifier_dropout": None,
        "hidden_act": "gelu",
        "hidden_dropout_prob": 0.1,
        "hidden_size": HIDDEN,
        "initializer_range": 0.02,
        "intermediate_size": INTERMEDIATE,
        "layer_norm_eps": 1e-12,
        "max_position_embeddings": MAX_POSITIONS,
        "model_type": "bert",
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
        "torch_dtype": "float32",
        "type_vocab_size": 2,
        "use_cache": True,
        "vocab_size": vocab_size,
    }


def _shapes(vocab_size: int) -> dict[str, tuple[int, ...]]:
    h, i = HIDDEN, INTERMEDIATE
    shapes: dict[str, tuple[int, ...]] = {
        "embeddings.word_embeddings.weight": (vocab_size, h),
        "embeddings.position_embeddings.weight": (MAX_POSITIONS, h),
        "embeddings.token_type_embeddings.weight": (2, h),
        "embeddings.LayerNorm.weight": (h,),
        "embeddings.LayerNorm.bias": (h,),
        "pooler.dense.weight": (h, h),
        "pooler.dense.bias": (h,),
    }
    per_layer = {
        "attention.self.query": (h, h),
        "attention.self.key": (h, h),
        "attention.self.value": (h, h),
        "attention.output.dense": (h, h),
        "intermediate.dense": (i, h),
        "output.dense": (h, i),
    }
    for n in range(LAYERS):
        pre = f"encoder.layer.{n}."
        for name, shape in per_layer.items():
            shapes[f"{pre}{name}.weight"] = shape
            shapes[f"{pre}{name}.bias"] = (shape[0],)
        for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
            shapes[f"{pre}{ln}.weight"] = (h,)
            shapes[f"{pre}{ln}.bias"] = (h,)
    return shapes


def _weights(vocab_size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    out: dict[str, np.ndarray] = {}
    for name, shape in _shapes(vocab_size).items():
        if "LayerNorm.weight" in name:
            arr = 1.0 + 0.1 * rng.standard_normal(shape)
        elif "LayerNorm.bias" in name or name.endswith(".bias"):
            arr = 0.02 * rng.standard_normal(shape)
        else:
            arr = 0.2 * rng.standard_normal(shape)
        out[name] = arr.astype(np.float32)
    # Old HF checkpoints (bge included) carry this buffer; loaders must drop it.
    out["embeddings.position_ids"] = np.arange(MAX_POSITIONS, dtype=np.int64)[None, :]
    return out


def _dump(path: Path, obj: dict | list) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _write_sentence_transformers(dest: Path, pooling: str) -> None:
    (dest / "1_Pooling").mkdir(exist_ok=True)
    _dump(
        dest / "1_Pooling" / "config.json",
        {
            "word_embedding_dimension": HIDDEN,
            "pooling_mode_cls_token": pooling == "cls",
            "pooling_mode_mean_tokens": pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": pooling == "last",
            "include_prompt": True,
        },
    )
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    _dump(dest / "modules.json", modules)


def build_bge_hf(dest: Path, *, pooling: str = "cls") -> Path:
    """Write a tiny bge-shaped BERT in Hugging Face layout to `dest`; return `dest`.

    `pooling` sets sentence-transformers' 1_Pooling/config.json ("cls" as bge ships it).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(_build_tokenizer(), dest)
    _dump(dest / "config.json", _config(vocab_size))
    save_file(_weights(vocab_size), str(dest / "model.safetensors"), metadata={"format": "pt"})
    _write_sentence_transformers(dest, pooling)
    return dest


def build_bge_mlx(dest: Path, *, pooling: str = "cls") -> Path:
    """The same tiny model converted by `mlx_embeddings.convert` (float32); return `dest`."""
    from mlx_embeddings.convert import convert

    dest = Path(dest)
    hf_dir = dest.parent / f".{dest.name}-hf-src"
    build_bge_hf(hf_dir, pooling=pooling)
    with contextlib.redirect_stdout(io.StringIO()):
        convert(hf_path=str(hf_dir), mlx_path=str(dest), dtype="float32")
    # convert() copies only top-level *.json; sentence-transformers' pooling lives below.
    shutil.copytree(hf_dir / "1_Pooling", dest / "1_Pooling", dirs_exist_ok=True)
    shutil.rmtree(hf_dir)
    return dest
