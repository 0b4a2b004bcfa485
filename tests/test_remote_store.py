"""The store on an fsspec URI: unit tests on `memory://` (fast), and the demo pipeline through the
real CLI against a local S3-compatible server (moto, on loopback, started and stopped here)."""
from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import shutil
import uuid

import pytest

from conftest import alignflow, small_demo, stage_runs
from flows.store import MANIFEST, DamagedArtifact, RemoteStore, Store, StoreUnavailable


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A RemoteStore on a fresh memory:// prefix (the memory filesystem is global to the process)."""
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    made = Store(f"memory://tests/{uuid.uuid4().hex}")
    yield made
    if made.fs.exists(made._base):
        made.fs.rm(made._base, recursive=True)


def build_one(store: Store, key="k1", files=None) -> dict:
    files = files if files is not None else {"data.bin": b"x" * 1000, "sub/meta.json": b"{}"}
    with store.build("toy", key) as tmp:
        for rel, payload in files.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).write_bytes(payload)
        return store.commit(tmp, "toy", key, {"metrics": {"m": 1.0}})


def remote(store: RemoteStore, rel: str) -> str:
    return f"{store._base}/toy/k1/{rel}"


def test_uri_picks_the_store(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    assert type(Store(tmp_path)) is Store and type(Store(f"file://{tmp_path}")) is Store
    assert Store(f"file://{tmp_path}").root == tmp_path
    s3 = Store("memory://bucket/prefix/")
    assert isinstance(s3, RemoteStore) and s3.root == "memory://bucket/prefix"
    assert s3.path("toy", "k") == "memory://bucket/prefix/toy/k"
    # What cannot live on an object store is local, under ALIGNFLOW_HOME.
    assert s3.local_root == tmp_path / "home" / "remote" / "memory" / "bucket" / "prefix"
    assert s3.checkpoints("toy", "k") == s3.local_root / "_checkpoints" / "toy" / "k"


def test_commit_uploads_manifest_last_and_keeps_a_local_copy(store, monkeypatch):
    order = []
    put, pipe = store.fs.put, store.fs.pipe_file
    monkeypatch.setattr(store.fs, "put", lambda lpaths, rpaths, **kw: (order.extend(rpaths), put(lpaths, rpaths, **kw)))
    monkeypatch.setattr(store.fs, "pipe_file", lambda path, data, **kw: (order.append(path), pipe(path, data, **kw)))
    manifest = build_one(store)
    assert order[-1].endswith(f"toy/k1/{MANIFEST}") and len(order) == 3
    assert store.check("toy", "k1") is None
    assert sorted(store._listing(f"{store._base}/toy/k1")) == ["data.bin", MANIFEST, "sub/meta.json"]
    assert store.manifest("toy", "k1")["fingerprint"] == manifest["fingerprint"]
    # The stage's own output stays in the local cache: downstream stages need not download it.
    assert store.local_path("toy", "k1") == store.cache.path("toy", "k1")
    assert store.cache.check("toy", "k1") is None
    assert not list(store.cache.root.glob("toy/.tmp-*"))


def test_check_finds_missing_and_resized_files(store):
    assert store.check("toy", "k1") == "not built"
    build_one(store)
    store.fs.pipe_file(remote(store, "data.bin"), b"x" * 10)
    assert store.check("toy", "k1") == "damaged: data.bin has 10 bytes, expected 1000"
    store.fs.rm_file(remote(store, "data.bin"))
    assert store.check("toy", "k1") == "damaged: data.bin is missing"
    store.fs.rm_file(remote(store, MANIFEST))
    assert store.check("toy", "k1") == "no valid manifest (incomplete or damaged)"


def test_downloads_are_verified_and_reused(store):
    build_one(store)
    shutil.rmtree(store.cache.root)
    local = store.local_path("toy", "k1")  # a download
    assert (local / "data.bin").read_bytes() == b"x" * 1000 and store.cache.check("toy", "k1") is None
    store.fs.rm_file(remote(store, "data.bin"))
    assert store.local_path("toy", "k1") == local, "a whole local copy with the same fingerprint is reused"
    store.fs.pipe_file(remote(store, "data.bin"), b"y" * 1000)  # same size, other content
    assert store.check("toy", "k1") is None, "check() compares sizes only (hashing means downloading)"
    shutil.rmtree(store.cache.root)
    with pytest.raises(DamagedArtifact, match="toy/k1/data.bin: the downloaded file"):
        store.local_path("toy", "k1")
    assert not store.cache.path("toy", "k1").exists(), "a damaged download is never kept"
    assert not list(store.cache.root.glob("toy/.tmp-*"))


def test_a_stale_local_copy_is_replaced(store):
    build_one(store)
    build_one(store, files={"data.bin": b"z" * 7})  # another machine rebuilt it, say
    assert (store.local_path("toy", "k1") / "data.bin").read_bytes() == b"z" * 7


def test_rebuild_never_shows_a_manifest_with_other_files(store, monkeypatch):
    """After every write or delete of a rebuild, a manifest that is there lists exactly files
    that are there with its sizes and hashes (or there is no manifest: not an artifact)."""
    build_one(store, files={"data.bin": b"a" * 10, "old-only.bin": b"o" * 5, "sub/meta.json": b"{}"})
    seen = []

    def consistent():
        manifest = store.manifest("toy", "k1")
        seen.append(manifest and manifest["files"]["data.bin"]["size"])
        if manifest is None:
            return
        for rel, meta in manifest["files"].items():
            data = store.fs.cat_file(remote(store, rel))
            assert (len(data), hashlib.sha256(data).hexdigest()) == (meta["size"], meta["sha256"]), rel

    for name in ("put_file", "pipe_file", "rm_file", "rm"):
        method = getattr(store.fs, name)
        monkeypatch.setattr(store.fs, name, lambda *a, _m=method, **kw: (_m(*a, **kw), consistent())[0])
    build_one(store, files={"data.bin": b"b" * 20, "sub/meta.json": b"{}"})
    monkeypatch.undo()
    assert seen[0] is None and seen[-1] == 20 and 10 not in seen[1:]
    assert store.check("toy", "k1") is None
    assert sorted(store._listing(f"{store._base}/toy/k1")) == ["data.bin", MANIFEST, "sub/meta.json"]


def test_a_failed_upload_is_not_an_artifact(store, monkeypatch):
    build_one(store)

    def broken(lpaths, rpaths, **kw):
        store.fs.pipe_file(rpaths[0], b"half")
        raise ConnectionError("network down")

    monkeypatch.setattr(store.fs, "put", broken)
    with pytest.raises(ConnectionError):
        build_one(store, files={"data.bin": b"n" * 50})
    monkeypatch.undo()
    assert store.check("toy", "k1") == "no valid manifest (incomplete or damaged)"
    build_one(store, files={"data.bin": b"n" * 50})
    assert store.check("toy", "k1") is None
    assert sorted(store._listing(f"{store._base}/toy/k1")) == ["data.bin", MANIFEST]


def test_recipes_on_the_store(store):
    store.record_recipe("demo", "dpo@1", "abc", {"config": {"beta": 0.1}})
    assert store.last_recipe("demo", "dpo@1") == {"key": "abc", "recipe": {"config": {"beta": 0.1}}}
    assert store.last_recipe("demo", "dpo@2") is None
    assert json.loads(store.fs.cat_file(f"{store._base}/_index/demo/dpo@1.json"))["key"] == "abc"


@pytest.mark.skipif(importlib.util.find_spec("gcsfs") is not None, reason="gcsfs is installed")
def test_protocol_not_installed_is_a_spec_error(tmp_path):
    with pytest.raises(StoreUnavailable, match="pip install gcsfs"):
        Store("gs://bucket/prefix")
    spec, home = small_demo(tmp_path, rounds=1), tmp_path / "home"
    out = alignflow("plan", spec, "--set", "store=gs://bucket/prefix", home=home)
    assert out.returncode == 2, out.stderr
    assert f"{spec}: store: gs://bucket/prefix: the filesystem for gs:// is not installed" in " ".join(out.stderr.split())
    assert not home.exists(), "nothing written"


# ---------------------------------------------------------------- S3 (moto's server on loopback)
@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), a bucket, and the environment that points
    s3fs at it. Stopped at the end of the module."""
    pytest.importorskip("s3fs")
    server_mod = pytest.importorskip("moto.server")
    import boto3

    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # not a line per request
    host, port = server.get_host_and_port()
    none = tmp_path_factory.mktemp("aws") / "none"
    env = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_CONFIG_FILE": str(none), "AWS_SHARED_CREDENTIALS_FILE": str(none)}
    client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                          aws_access_key_id="testing", aws_secret_access_key="testing")
    client.create_bucket(Bucket="alignflow-test")
    try:
        yield {"env": env, "client": client, "bucket": "alignflow-test"}
    finally:
        server.stop()


def objects(s3, prefix: str) -> dict[str, int]:
    pages = s3["client"].get_paginator("list_objects_v2").paginate(Bucket=s3["bucket"], Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def statuses(runs) -> dict[str, str]:
    return {f"{r.data.tags['alignflow.stage']}@{r.data.tags['alignflow.round']}": r.data.tags["alignflow.cache"]
            for r in runs}


@pytest.mark.slow  # the demo twice and a repair on moto's S3, about a minute; .ci/run runs it
def test_demo_pipeline_on_s3(s3, tmp_path):
    spec, home = small_demo(tmp_path, rounds=1, name="demo-s3"), tmp_path / "home"
    store = f"s3://{s3['bucket']}/runs/demo"
    args = ("--set", f"store={store}")
    alignflow("run", spec, *args, home=home, env=s3["env"], check=True)

    # Every stage's artifact is in the bucket, manifest and all; nothing went to a local store.
    rows = [json.loads(line) for line in alignflow("plan", spec, "--json", *args, home=home, env=s3["env"],
                                                   check=True).stdout.splitlines()]
    assert len(rows) == 8 + 5 and all(r["status"] == "fresh" for r in rows), rows
    keys = set(objects(s3, "runs/demo/"))
    for row in rows:
        assert f"runs/demo/{row['kind']}/{row['key']}/{MANIFEST}" in keys, row
    assert any(k.startswith("runs/demo/_index/demo-s3/") for k in keys)
    assert not (home / "store").exists()
    assert (home / "remote" / "s3" / s3["bucket"] / "runs" / "demo" / "_prefect" / "records").is_dir()
    runs = stage_runs(home, "demo-s3")
    assert set(statuses(runs).values()) == {"miss"}
    assert all(r.data.tags["alignflow.uri"].startswith(f"{store}/") for r in runs)

    # Another machine (a fresh ALIGNFLOW_HOME: no Prefect records, no local copies) reuses it all.
    other = tmp_path / "other"
    out = alignflow("run", spec, *args, home=other, env=s3["env"], check=True)
    assert "0 ran" in out.stderr and set(statuses(stage_runs(other, "demo-s3")).values()) == {"hit"}

    # One file of one artifact deleted in the bucket: that stage, and only it, is recomputed (its
    # downstream stages' keys hang on its key, not its content, as on a local store).
    score = next(r for r in rows if (r["stage"], r["round"]) == ("score", 1))
    folder = f"runs/demo/score/{score['key']}/"
    victim = next(k for k in objects(s3, folder) if not k.endswith(MANIFEST))
    s3["client"].delete_object(Bucket=s3["bucket"], Key=victim)
    after = {(r["stage"], r["round"]): r for r in map(json.loads, alignflow(
        "plan", spec, "--json", *args, home=home, env=s3["env"], check=True).stdout.splitlines())}
    assert after["score", 1]["status"] == "missing"
    assert f"{victim.removeprefix(folder)} is missing" in after["score", 1]["reason"]
    alignflow("run", spec, *args, home=home, env=s3["env"], check=True)
    cache = statuses(stage_runs(home, "demo-s3"))
    assert {k for k, v in cache.items() if v == "miss"} == {"score@1"}
    assert victim in objects(s3, folder)


def test_missing_bucket_is_a_spec_error(s3, tmp_path):
    spec, home = small_demo(tmp_path, rounds=1), tmp_path / "home"
    out = alignflow("run", spec, "--set", "store=s3://no-such-bucket/x", home=home, env=s3["env"])
    assert out.returncode == 2, out.stderr
    message = " ".join(out.stderr.split())
    assert "store: s3://no-such-bucket/x: bucket 'no-such-bucket' does not exist" in message
    assert "AWS_ENDPOINT_URL" in message
    assert not home.exists(), "nothing written"
