import json
from pathlib import Path

import pytest

from engine.store import ModelMissing, Store, StoreError
from engine.store.manifest import verify, write_manifest


def make_model(directory: Path, config: dict) -> Path:
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config))
    (directory / "model.safetensors").write_bytes(bytes(range(256)) * 4)
    return directory


def test_resolve_store_id_and_kind(tmp_path: Path) -> None:
    store = Store(tmp_path)
    make_model(store.path("my-bge"), {"model_type": "bert"})
    info = store.resolve("my-bge", "embeddings")
    assert info.id == "my-bge" and info.kind == "embeddings"
    assert [m.id for m in store.list()] == ["my-bge"]


def test_missing_id_names_the_install_command(tmp_path: Path) -> None:
    with pytest.raises(ModelMissing, match=r"mlxd pull gemma-4-e4b"):
        Store(tmp_path).resolve("gemma-4-e4b", "chat")
    with pytest.raises(ModelMissing, match=r"mlxd pull org-model --kind stt"):
        Store(tmp_path).resolve("org-model", "stt")


def test_resolve_local_directory_without_manifest(tmp_path: Path) -> None:
    model = make_model(tmp_path / "somewhere" / "whisper-tiny", {"n_audio_state": 384})
    info = Store(tmp_path / "home").resolve(str(model))
    assert info.id == "whisper-tiny" and info.kind == "stt" and info.manifest is None
    with pytest.raises(ModelMissing, match="does not exist"):
        Store(tmp_path).resolve(str(tmp_path / "nope"))


def test_invalid_id_is_refused(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="invalid model id"):
        Store(tmp_path).path("..evil")


def test_manifest_verify_detects_a_flipped_byte(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", {"model_type": "bert"})
    manifest = write_manifest(model, id="m", kind="embeddings", dtype="float16")
    assert manifest["size_bytes"] == sum(e["size"] for e in manifest["files"].values())
    assert verify(model) == []
    weights = model / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[100] ^= 0x01
    weights.write_bytes(bytes(data))
    assert verify(model) == ["checksum mismatch: model.safetensors"]
    (model / "extra.bin").write_bytes(b"x")
    (model / "config.json").unlink()
    problems = verify(model)
    assert "missing file: config.json" in problems and "unexpected file: extra.bin" in problems
