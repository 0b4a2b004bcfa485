"""Store integrity: a same-size change in a large file is caught, a damaged remote artifact is
recomputed, an adapter-only LoRA artifact finds its base by store key."""
from __future__ import annotations

import json
import os
import uuid

import pytest

import flows.store as store_module
from flows.store import MANIFEST, Store


def build_one(store, payload: bytes, key="k1"):
    with store.build("toy", key) as tmp:
        (tmp / "model.bin").write_bytes(payload)
        return store.commit(tmp, "toy", key, {})


@pytest.mark.parametrize("in_place", [True, False])
def test_a_flipped_byte_in_a_large_file_is_caught(tmp_path, monkeypatch, in_place):
    """Above HASH_LIMIT a file is checked by a sampled hash of fixed blocks (listed in the manifest),
    and hashed whole when it changed after its manifest was written."""
    monkeypatch.setattr(store_module, "HASH_LIMIT", 1 << 16)
    monkeypatch.setattr(store_module, "SAMPLE_BLOCK", 1 << 10)
    monkeypatch.setattr(store_module, "SAMPLE_BLOCKS", 16)
    store = Store(tmp_path)
    manifest = build_one(store, os.urandom(1 << 20))  # 1024 blocks, 16 sampled
    sample = manifest["files"]["model.bin"]["sample"]
    assert sample["block_size"] == 1 << 10 and len(sample["blocks"]) == 16 and sample["blocks"][-1] == 1023
    assert store.check("toy", "k1") is None
    path = store.path("toy", "k1") / "model.bin"
    created = manifest["created"]
    # A flip inside a sampled block, with the file's time put back (a copy that kept times, say):
    # the sampled hash catches it. Made in place (mtime after the manifest): the whole hash does.
    offset = sample["blocks"][5] * 1024 + 17 if not in_place else 12345 * 3 + 1
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))
    if not in_place:
        os.utime(path, (created - 1, created - 1))
        assert "does not match its sampled hash" in store.check("toy", "k1")
    else:
        assert "does not match its hash" in store.check("toy", "k1")


def test_a_damaged_remote_download_is_recomputed_not_fatal(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    store = Store(f"memory://tests/{uuid.uuid4().hex}")
    try:
        build_one(store, b"x" * 1000)
        import shutil

        shutil.rmtree(store.cache.root)
        store.fs.pipe_file(f"{store._base}/toy/k1/model.bin", b"y" * 1000)  # same size, other content
        assert store.check("toy", "k1") is None  # a listing sees sizes only (plan)
        assert "the downloaded file" in store.check("toy", "k1", download=True)  # a run: so it rebuilds
        build_one(store, b"x" * 1000)
        assert store.check("toy", "k1", download=True) is None
    finally:
        store.fs.rm(store._base, recursive=True)


def test_an_adapter_artifact_names_its_base_by_store_key(tmp_path, run_stage, tiny_demo_model, demo_table):
    """LoRA with merge: false keeps the base as a store key; the artifacts load from wherever the
    store is (here: the store folder moved)."""
    import shutil

    from tasks.models import load_causal_lm

    root = tmp_path / "store"
    base = root / "model" / "basekey"
    shutil.copytree(tiny_demo_model, base)
    (base / MANIFEST).write_text(json.dumps({"key": "basekey", "kind": "model"}))
    out = root / "model" / "adapterkey"
    from conftest import run_stage_in

    run_stage_in(out, {"kind": "sft", "model": "m", "data": "d", "epochs": 1, "batch_size": 32,
                       "lora": {"r": 4, "merge": False}}, {"model": base, "data": demo_table("sft", 64)})
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "alignflow-store:model/basekey"
    moved = tmp_path / "elsewhere"
    shutil.move(root, moved)
    model, _ = load_causal_lm(moved / "model" / "adapterkey", device="cpu")
    assert model is not None
