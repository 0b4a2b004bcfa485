"""The content-addressed artifact store: `<root>/<kind>/<key>/` with a `manifest.json`.

An artifact is built in a temporary folder beside its final place and renamed into place only
once complete, manifest last; a folder without a manifest, or whose files do not match the sizes
and hashes the manifest lists, is not an artifact. The store also keeps, per spec and stage
execution, the recipe last run (`_index/`), so `plan` can say what changed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

MANIFEST = "manifest.json"
HASH_LIMIT = 256 << 20  # files above this are checked by size only (hashing them each run costs)


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
    os.replace(tmp, path)


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def checkpoints(self, kind: str, key: str) -> Path:
        """Where a stage computing `key` keeps checkpoints to resume from (kept across failed attempts)."""
        return self.root / "_checkpoints" / kind / key

    def manifest(self, kind: str, key: str) -> dict | None:
        try:
            return json.loads((self.path(kind, key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def check(self, kind: str, key: str) -> str | None:
        """None if the artifact is present and whole, else what is wrong with it."""
        folder = self.path(kind, key)
        if not folder.exists():
            return "not built" 
        manifest = self.manifest(kind, key)
        if manifest is None or manifest.get("key") != key:
            return "no valid manifest (incomplete or damaged)"
        for rel, meta in manifest["files"].items():
            f = folder / rel
            if not f.is_file():
                return f"damaged: {rel} is missing"
            if f.stat().st_size != meta["size"]:
                return f"damaged: {rel} has {f.stat().st_size} bytes, expected {meta['size']}"
            if meta["size"] <= HASH_LIMIT and file_sha256(f) != meta["sha256"]:
                return f"damaged: {rel} does not match its hash"
        return None

    @contextlib.contextmanager
    def build(self, kind: str, key: str) -> Iterator[Path]:
        """Yield an empty temporary folder; the caller fills it and calls `commit`. On error the
        folder is removed, so nothing half-written is ever visible at the artifact's place."""
        tmp = self.root / kind / f".tmp-{key}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, tmp: Path, kind: str, key: str, manifest: dict) -> dict:
        """Write the manifest (file sizes and hashes, content fingerprint) and move into place."""
        files = {}
        for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
            rel = f.relative_to(tmp).as_posix()
            files[rel] = {"size": f.stat().st_size, "sha256": file_sha256(f)}
        fingerprint = hashlib.sha256(
            json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode()
        ).hexdigest()
        manifest = {**manifest, "key": key, "kind": kind, "files": files,
                    "fingerprint": fingerprint, "created": time.time()}
        write_json_atomic(tmp / MANIFEST, manifest)
        final = self.path(kind, key)
        if final.exists():  # a forced rebuild, or a damaged artifact being replaced
            old = final.with_name(f".old-{key}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        return manifest

    def sweep(self) -> None:
        """Remove temporary folders left by processes of this host that died (SIGKILL, power)."""
        host = socket.gethostname()
        if not self.root.exists():
            return
        for tmp in self.root.glob("*/.tmp-*"):
            parts = tmp.name.split("-")
            try:
                tmp_host, pid = "-".join(parts[2:-2]), int(parts[-2])
            except (ValueError, IndexError):
                continue
            if tmp_host == host and not _pid_alive(pid):
                shutil.rmtree(tmp, ignore_errors=True)
        # A crash between commit's two renames leaves the previous artifact as .old-<key>-*:
        # put it back if nothing replaced it (the renames are microseconds apart, hence the age).
        for old in self.root.glob("*/.old-*"):
            final = old.with_name(old.name.split("-")[1])
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
            elif time.time() - old.stat().st_ctime > 60:  # ctime: when it was renamed
                os.replace(old, final)

    # --- what each spec's stages last ran with, to explain staleness ---
    def _index_file(self, spec_name: str, node_id: str) -> Path:
        return self.root / "_index" / spec_name / f"{node_id}.json"

    def last_recipe(self, spec_name: str, node_id: str) -> dict | None:
        try:
            return json.loads(self._index_file(spec_name, node_id).read_text())
        except (OSError, ValueError):
            return None

    def record_recipe(self, spec_name: str, node_id: str, key: str, recipe: dict) -> None:
        write_json_atomic(self._index_file(spec_name, node_id), {"key": key, "recipe": recipe})
