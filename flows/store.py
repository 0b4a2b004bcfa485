"""The content-addressed artifact store: `<root>/<kind>/<key>/` with a `manifest.json`.

The root is a local folder or any fsspec URI (`s3://bucket/prefix`, `gs://...`, `memory://`,
`file:///abs/path`, which is the same as the plain path). `Store(root)` gives a `RemoteStore`
for a remote URI; callers need not care which.

Local store: an artifact is built in a temporary folder beside its final place and renamed into
place only once complete, manifest last; a folder without a manifest, or whose files do not match
the sizes and hashes the manifest lists, is not an artifact.

Remote store (see `RemoteStore`): stages still build into a local folder; commit uploads the
files and writes `manifest.json` last, so the manifest is the commit point. Stages read their
inputs from a verified local copy under `$ALIGNFLOW_HOME/cache/<kind>/<key>/`.

The store also keeps, per spec and stage execution, the recipe last run (`_index/`), so `plan` can
say what changed.

A local store owns its folder, and only its folder: `.alignflow-store` marks a folder alignflow
made (or a store made before markers, recognised by its layout, which gets one). A folder that is
not empty and not a store is refused, as are `/`, the user's home and the system's folders; the
start-up sweep removes only names alignflow makes (`.tmp-<key>-<host>-<pid>-<hex>`,
`.old-<key>-<hex>`) in the kind folders of a marked store.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator

from flows.home import home

MANIFEST = "manifest.json"
HASH_LIMIT = 256 << 20  # files above this get a sampled hash on each check (hashing them whole each run costs)
SAMPLE_BLOCK = 64 << 10  # a sampled hash reads SAMPLE_BLOCKS blocks of this size (16 MiB)
SAMPLE_BLOCKS = 256


class StoreUnavailable(Exception):
    """The store's URI cannot be used: its filesystem is not installed, or it cannot be reached.
    The CLI reports it against the spec's `store` field (exit 2) before any stage runs."""


class StoreNotOurs(Exception):
    """A store folder that is not alignflow's to write (not empty and not a store, or a system
    folder): the CLI reports it against the spec's `store` field (exit 2) before anything runs."""


class DamagedArtifact(Exception):
    """A downloaded file does not match its manifest: never used, the stage fails naming it."""


# A part of a store path (a kind, a key, a spec name, a node id): one plain folder or file name.
_PART = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.@-]{0,200}")


def plain(*parts: str) -> str:
    """The parts joined with '/', each one plain name (no separator, not `.` or `..`). Names are validated
    with the spec; this is the store's own guard against any that were not."""
    for part in parts:
        if not isinstance(part, str) or not _PART.fullmatch(part):
            raise ValueError(f"not a plain name for a store path: {part!r}")
    return "/".join(parts)


def safe_join(root: Path, *parts: str) -> Path:
    """root/part/..., each part plain, and the result (links resolved) inside root."""
    path = root / plain(*parts)
    if not path.resolve().is_relative_to(root.resolve()):
        raise ValueError(f"{path} is outside {root}")
    return path


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        os.replace(tmp, path)
    except BaseException:  # a full disk: no half-written file left beside it
        tmp.unlink(missing_ok=True)
        raise


OWNER_MARK = ".alignflow-store"
# The names alignflow makes at a store's top level, besides one folder per stage kind.
STORE_FOLDERS = ("_index", "_locks", "_prefect", "_checkpoints", "_reports")
# Folders a store must never be (nor, for the trees, be inside): the machine's own.
SYSTEM_TREES = ("/bin", "/boot", "/dev", "/etc", "/lib", "/lib32", "/lib64", "/libx32", "/proc", "/sbin", "/sys",
                "/usr", "/System", "/Library")
SYSTEM_FOLDERS = ("/", "/home", "/mnt", "/media", "/opt", "/root", "/run", "/srv", "/tmp", "/var", "/Users",
                  "/Volumes", "/private", "/private/tmp", "/private/var", "/Applications")


def refused_folder(root: Path) -> str | None:
    """Why `root` can never be a store (a system folder, the user's home or above it), or None."""
    home_dir = Path.home().resolve()
    if str(root) in SYSTEM_FOLDERS or any(root == Path(t) or root.is_relative_to(t) for t in SYSTEM_TREES):
        return "a system folder"
    if home_dir == root or home_dir.is_relative_to(root):
        return "your home directory" if home_dir == root else f"a folder holding your home directory ({home_dir})"
    return None


def _tmp_name(name: str, host: str) -> tuple[str, int] | None:
    """(key, pid) of a build folder's name `.tmp-<key>-<host>-<pid>-<8 hex>` made on `host`."""
    match = re.fullmatch(r"\.tmp-(.+)-(\d+)-[0-9a-f]{8}", name)
    if match is None or not match.group(1).endswith(f"-{host}"):
        return None
    key = match.group(1)[: -len(host) - 1]
    return (key, int(match.group(2))) if _PART.fullmatch(key) else None


def _old_name(name: str) -> str | None:
    """The key of a replaced artifact's name `.old-<key>-<8 hex>`."""
    match = re.fullmatch(r"\.old-(.+)-[0-9a-f]{8}", name)
    return match.group(1) if match and _PART.fullmatch(match.group(1)) else None


def laid_out_as_store(root: Path) -> bool:
    """Whether a folder without the marker is unmistakably a store made before markers: alignflow's
    own folders (one of _index, _locks, _prefect at least), and kind folders holding only
    artifacts (folders with a manifest) and build leftovers; nothing else."""
    entries = list(root.iterdir())
    if not {e.name for e in entries} & {"_index", "_locks", "_prefect"}:
        return False
    for entry in entries:
        if entry.is_symlink() or not entry.is_dir():
            return False
        if entry.name in STORE_FOLDERS:
            continue
        if entry.name.startswith(("_", ".")) or not _PART.fullmatch(entry.name):
            return False
        for inner in entry.iterdir():
            leftover = inner.name.startswith((".tmp-", ".old-"))
            artifact = _PART.fullmatch(inner.name) and (inner / MANIFEST).is_file()
            if inner.is_symlink() or not inner.is_dir() or not (leftover or artifact):
                return False
    return True


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sample_blocks(size: int) -> list[int]:
    """The blocks (indices of SAMPLE_BLOCK-byte blocks) a sampled hash reads: evenly spaced, first
    and last included. Fixed by the size, and listed in the manifest."""
    n = -(-size // SAMPLE_BLOCK)
    if n <= SAMPLE_BLOCKS:
        return list(range(n))
    return sorted({round(i * (n - 1) / (SAMPLE_BLOCKS - 1)) for i in range(SAMPLE_BLOCKS)})


def sampled_sha256(path: Path, blocks: list[int], block_size: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in blocks:
            handle.seek(block * block_size)
            digest.update(handle.read(block_size))
    return digest.hexdigest()


def file_record(f: Path) -> dict:
    """A file's manifest entry: size and hash, and for a large file a sampled hash to check it by."""
    record = {"size": f.stat().st_size, "sha256": file_sha256(f)}
    if record["size"] > HASH_LIMIT:
        blocks = sample_blocks(record["size"])
        record["sample"] = {"block_size": SAMPLE_BLOCK, "blocks": blocks, "sha256": sampled_sha256(f, blocks, SAMPLE_BLOCK)}
    return record


def file_problem(f: Path, rel: str, meta: dict, sealed: float | None) -> str | None:
    """What is wrong with file `f` against its manifest entry, or None. A large file is checked by
    its sampled blocks, and hashed whole when it changed after the manifest was written (`sealed`:
    its creation time): a same-size change anywhere is caught either way when made in place."""
    if not f.is_file():
        return f"damaged: {rel} is missing"
    stat = f.stat()
    if stat.st_size != meta["size"]:
        return f"damaged: {rel} has {stat.st_size} bytes, expected {meta['size']}"
    sample = meta.get("sample")
    whole = meta["size"] <= HASH_LIMIT or sample is None or sealed is None or stat.st_mtime > sealed
    if whole and file_sha256(f) != meta["sha256"]:
        return f"damaged: {rel} does not match its hash"
    if not whole and sampled_sha256(f, sample["blocks"], sample["block_size"]) != sample["sha256"]:
        return f"damaged: {rel} does not match its sampled hash (blocks listed in the manifest)"
    return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (on this machine)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_remote(root: str | Path) -> bool:
    """A URI with a protocol other than file:// (plain paths never import fsspec)."""
    text = str(root)
    return "://" in text and not text.startswith(("file://", "local://"))


def seal(tmp: Path, kind: str, key: str, manifest: dict) -> dict:
    """Write the manifest (file sizes and hashes, content fingerprint) into a built folder."""
    files = {}
    for f in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = f.relative_to(tmp).as_posix()
        files[rel] = file_record(f)
    fingerprint = hashlib.sha256(
        json.dumps({k: v["sha256"] for k, v in files.items()}, sort_keys=True).encode()
    ).hexdigest()
    manifest = {**manifest, "key": key, "kind": kind, "files": files,
                "fingerprint": fingerprint, "created": time.time()}
    write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


class Store:
    def __new__(cls, root: str | Path | None = None):
        if cls is Store and root is not None and is_remote(root):
            cls = RemoteStore  # Store("s3://...") just works, for every caller
        return super().__new__(cls)

    def __init__(self, root: str | Path):
        text = str(root)
        for scheme in ("file://", "local://"):
            text = text.removeprefix(scheme)
        self.root = Path(text).expanduser().resolve()

    @property
    def local_root(self) -> Path:
        """Where what cannot live on the store itself goes: Prefect's cache records and locks,
        checkpoints, report plots. For a local store, the store itself (as always)."""
        return self.root

    def path(self, kind: str, key: str) -> Path:
        """Where the artifact is (a symlink put there is not followed: `check` calls it damaged)."""
        return self.root / plain(kind, key)

    def _linked(self, kind: str, key: str) -> bool:
        """Whether the artifact's folder, or its kind's, is a symbolic link (never the store's own)."""
        return self.path(kind, key).is_symlink() or (self.root / plain(kind)).is_symlink()

    def local_path(self, kind: str, key: str) -> Path:
        """The artifact as a local folder, for a stage to read (a remote store downloads it)."""
        return self.path(kind, key)

    def checkpoints(self, kind: str, key: str) -> Path:
        """Where a stage computing `key` keeps checkpoints to resume from (kept across failed attempts)."""
        return safe_join(self.local_root / "_checkpoints", kind, key)

    def unavailable(self) -> str | None:
        """None if the store can be used, else why not. A local folder is made on demand; one
        that exists must be alignflow's (see `claim`)."""
        refused = refused_folder(self.root)
        if refused:
            return f"refusing to use {refused} as a store: name a folder of its own (e.g. {self.root / 'alignflow-store'})"
        if not self.root.exists() or (self.root / OWNER_MARK).is_file():
            return None
        if self.root == (home() / "cache").resolve():  # a remote store's local copies: the home's own
            return None
        if not self.root.is_dir():
            return "exists and is not a folder"
        others = [p for p in self.root.iterdir() if not p.name.startswith(f".{OWNER_MARK}.")]  # a claim under way
        if others and not laid_out_as_store(self.root):
            return (f"a folder that is not empty and is not an alignflow store (it has no {OWNER_MARK}): "
                    "alignflow writes only to a store folder of its own; name a new or empty folder")
        return None

    def claim(self) -> None:
        """Make the folder this store's: create it with its marker, or mark an empty folder or a
        store made before markers. StoreNotOurs for any other folder."""
        if (self.root / OWNER_MARK).is_file():
            return
        problem = self.unavailable()
        if problem:
            raise StoreNotOurs(f"{self.root}: {problem}")
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.root / OWNER_MARK, {"alignflow": "artifact store", "created": time.time()})

    def manifest(self, kind: str, key: str) -> dict | None:
        if self._linked(kind, key):
            return None
        try:
            return json.loads((self.path(kind, key) / MANIFEST).read_text())
        except (OSError, ValueError):
            return None

    def check(self, kind: str, key: str, download: bool = False) -> str | None:
        """None if the artifact is present and whole, else what is wrong with it. (`download`:
        for a remote store, see RemoteStore.check; a local artifact is checked where it is.)"""
        folder = self.path(kind, key)
        if self._linked(kind, key):
            return f"damaged: {kind}/{key} is a symbolic link, not a folder of the store"
        if not folder.exists():
            return "not built"
        manifest = self.manifest(kind, key)
        if manifest is None or manifest.get("key") != key:
            return "no valid manifest (incomplete or damaged)"
        for rel, meta in manifest["files"].items():
            problem = file_problem(folder / rel, rel, meta, manifest.get("created"))
            if problem:
                return problem
        return None

    @contextlib.contextmanager
    def build(self, kind: str, key: str) -> Iterator[Path]:
        """Yield an empty temporary folder; the caller fills it and calls `commit`. On error the
        folder is removed, so nothing half-written is ever visible at the artifact's place."""
        self.claim()
        if (self.root / plain(kind)).is_symlink():  # damaged (see check): the link goes, not what it names
            (self.root / plain(kind)).unlink()
        tmp = self.root / plain(kind) / f".tmp-{plain(key)}-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            yield tmp
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def commit(self, tmp: Path, kind: str, key: str, manifest: dict) -> dict:
        """Write the manifest (file sizes and hashes, content fingerprint) and move into place."""
        manifest = seal(tmp, kind, key, manifest)
        self.install(tmp, kind, key)
        return manifest

    def install(self, tmp: Path, kind: str, key: str) -> None:
        """Rename a sealed folder (one with its manifest) into the artifact's place."""
        final = self.path(kind, key)
        if final.is_symlink():  # damaged (see check): the link goes, not what it names
            final.unlink()
        if final.exists():  # a forced rebuild, or a damaged artifact being replaced
            old = final.with_name(f".old-{key}-{uuid.uuid4().hex[:8]}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)

    def sweep(self, kinds) -> None:
        """Remove build folders left by processes of this host that died (SIGKILL, power), in the
        folders of these stage kinds in a store alignflow marked as its own; nothing that
        alignflow does not name so."""
        host = socket.gethostname()
        if not (self.root / OWNER_MARK).is_file():
            return
        folders = [self.root / plain(kind) for kind in kinds]
        for folder in (f for f in folders if f.is_dir() and not f.is_symlink()):
            for entry in folder.iterdir():
                if entry.is_symlink() or not entry.is_dir():
                    continue
                made = _tmp_name(entry.name, host)
                if made is not None and not pid_alive(made[1]):
                    shutil.rmtree(entry, ignore_errors=True)
                # A crash between commit's two renames leaves the previous artifact as .old-<key>-*:
                # put it back if nothing replaced it (the renames are microseconds apart, hence the age).
                key = _old_name(entry.name)
                if key is None or not (entry / MANIFEST).is_file():
                    continue
                final = folder / key
                if final.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                elif time.time() - entry.stat().st_ctime > 60:  # ctime: when it was renamed
                    os.replace(entry, final)

    # --- what each spec's stages last ran with, to explain staleness ---
    def _index_file(self, spec_name: str, node_id: str) -> Path:
        return safe_join(self.root / "_index", spec_name, f"{node_id}.json")

    def last_recipe(self, spec_name: str, node_id: str) -> dict | None:
        try:
            return json.loads(self._index_file(spec_name, node_id).read_text())
        except (OSError, ValueError):
            return None

    def record_recipe(self, spec_name: str, node_id: str, key: str, recipe: dict) -> None:
        write_json_atomic(self._index_file(spec_name, node_id), {"key": key, "recipe": recipe})


# Hints for StoreUnavailable, by protocol: where the filesystem reads its endpoint and credentials.
_ACCESS_HINTS = {
    "s3": "check the endpoint (AWS_ENDPOINT_URL, AWS_ENDPOINT_URL_S3 or FSSPEC_S3_ENDPOINT_URL), "
          "the credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket",
    "gs": "check the credentials (GOOGLE_APPLICATION_CREDENTIALS or `gcloud auth application-default "
          "login`) and the bucket",
}
_ACCESS_HINTS["s3a"] = _ACCESS_HINTS["s3"]
_ACCESS_HINTS["gcs"] = _ACCESS_HINTS["gs"]


class RemoteStore(Store):
    """The store on an fsspec filesystem (S3, GCS, ...): same layout, same manifest.

    Credentials and endpoint come from the environment, read by the filesystem itself: for s3://
    (s3fs, botocore) AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
    AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (or AWS_ENDPOINT_URL_S3) for an S3-compatible server;
    for any protocol, fsspec's FSSPEC_<PROTOCOL>_<OPTION> variables (FSSPEC_S3_ENDPOINT_URL=...)
    and its config files.

    - Commit: object stores have no rename, so the manifest is the commit point. A rebuild first
      deletes the old manifest (from then on the folder is not an artifact), then every old file,
      then uploads the new files, and writes the new manifest last. A reader thus sees either no
      manifest, or a manifest written after all the files it lists. A reader that took the old
      manifest just before a rebuild may download new files: their hashes do not match, and the
      download fails naming the file (never used). The layout stays `<kind>/<key>/<file>`, as on
      a local store.
    - Check: the manifest and a listing of the folder (every file present, with its size). A
      stage about to reuse an artifact also checks it with `download=True`: it is fetched into the
      local cache (once per machine) and its hashes checked, so a damaged one is recomputed, like
      a damaged local artifact. `plan` lists only. Every download checks the hashes.
    - Inputs: a stage reads a verified local copy, `$ALIGNFLOW_HOME/cache/<kind>/<key>/` (itself a
      local store: downloaded into a temporary folder, renamed into place), reused while it is
      whole and has the store's fingerprint. A stage's own output is kept there too when it is
      uploaded, so downstream stages of the same run download nothing. The cache can be deleted
      at any time.
    - Local state, under `local_root` ($ALIGNFLOW_HOME/remote/<protocol>/<bucket>/<prefix>/):
      Prefect's cache records and locks (a lock cannot live on an object store; correctness does
      not depend on them, as the flow and `build` check the store itself), checkpoints (a
      resumed stage resumes on the machine that started it) and report plots. So two machines
      computing one key at once on one remote store are not serialised: they both compute it
      and the last commit wins.
    - `_index/` recipe records live on the store, each written whole in one request.
    """

    def __init__(self, root: str | Path):
        import fsspec
        from fsspec.registry import known_implementations

        uri = str(root).rstrip("/")
        protocol = uri.split("://", 1)[0]
        try:
            self.fs, self._base = fsspec.core.url_to_fs(uri)
        except ImportError as exc:  # e.g. gs:// without gcsfs
            known = known_implementations.get(protocol, {})
            package = known.get("class", "").split(".")[0]
            install = f"; install it: pip install {package}" if package else ""
            raise StoreUnavailable(f"the filesystem for {protocol}:// is not installed ({exc}){install}") from None
        except ValueError as exc:  # an unknown protocol
            raise StoreUnavailable(f"no filesystem is known for {protocol}:// ({exc}): expected a local "
                                   "folder or an fsspec URL (s3://bucket/prefix, gs://bucket/prefix, ...)") from None
        self._base = self._base.rstrip("/")
        self.protocol = protocol
        self.root = uri  # a string: the URI, as the flow hands it on to tasks
        self._local = home() / "remote" / protocol / self._base.strip("/")
        if not self._local.resolve().is_relative_to((home() / "remote").resolve()):  # e.g. s3://b/../../..
            raise StoreUnavailable(f"its local state would be outside {home() / 'remote'}: expected a bucket "
                                   "and prefix without '..'")
        self.cache = Store(home() / "cache")

    @property
    def local_root(self) -> Path:
        return self._local

    def _path(self, kind: str, key: str) -> str:
        return f"{self._base}/{plain(kind, key)}"

    def path(self, kind: str, key: str) -> str:
        return f"{self.root}/{plain(kind, key)}"

    def unavailable(self) -> str | None:
        """Whether the root's bucket can be listed: an empty or absent prefix is fine (the store
        is new), a missing bucket, bad credentials or an unreachable endpoint is not."""
        hint = _ACCESS_HINTS.get(self.protocol, f"check the credentials and the network for {self.protocol}://")
        try:
            try:
                self.fs.ls(self._base, detail=False)
            except FileNotFoundError:
                bucket = self._base.split("/")[0]
                if bucket == self._base or (bucket and not self.fs.exists(bucket)):
                    return f"bucket '{bucket}' does not exist (alignflow does not create buckets); {hint}"
        except Exception as exc:  # noqa: BLE001 - whatever the filesystem raises, said plainly
            return f"cannot reach it: {type(exc).__name__}: {exc}; {hint}"
        return None

    def manifest(self, kind: str, key: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(f"{self._path(kind, key)}/{MANIFEST}"))
        except (FileNotFoundError, ValueError):
            return None

    def _listing(self, folder: str) -> dict[str, int]:
        """Relative path -> size of every object under `folder` (one listing, not the cache's)."""
        self.fs.invalidate_cache(folder)
        found = self.fs.find(folder, detail=True)
        return {name[len(folder) + 1:]: info["size"] for name, info in found.items()
                if info.get("type") != "directory"}

    def check(self, kind: str, key: str, download: bool = False) -> str | None:
        """As Store.check, from a listing (sizes). With `download`, the artifact is also fetched
        into the local cache and its hashes checked (once per machine: a whole cached copy is not
        fetched again), so a damaged remote artifact is recomputed rather than failing its reader."""
        problem = self._listed_problem(kind, key)
        if problem is None and download:
            try:
                self.local_path(kind, key)
            except DamagedArtifact as exc:
                return f"damaged: {exc}"
        return problem

    def _listed_problem(self, kind: str, key: str) -> str | None:
        listing = self._listing(self._path(kind, key))
        if not listing:
            return "not built"
        manifest = self.manifest(kind, key) if MANIFEST in listing else None
        if manifest is None or manifest.get("key") != key:
            return "no valid manifest (incomplete or damaged)"
        # Sizes only: hashing a remote file means downloading it. Downloads check the hashes.
        for rel, meta in manifest["files"].items():
            if rel not in listing:
                return f"damaged: {rel} is missing"
            if listing[rel] != meta["size"]:
                return f"damaged: {rel} has {listing[rel]} bytes, expected {meta['size']}"
        return None

    def build(self, kind: str, key: str):
        """A local temporary folder (in the local cache, so the committed output stays there)."""
        return self.cache.build(kind, key)

    def commit(self, tmp: Path, kind: str, key: str, manifest: dict) -> dict:
        manifest = seal(tmp, kind, key, manifest)
        folder = self._path(kind, key)
        # Manifest first: from here on the old artifact is not an artifact, whatever is left of it.
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(f"{folder}/{MANIFEST}")
        old = [f"{folder}/{rel}" for rel in self._listing(folder)]  # the old files, or a crashed upload's
        if old:
            self.fs.rm(old)
        files = list(manifest["files"])
        if files:  # one call: async filesystems (s3fs, gcsfs) upload them concurrently
            self.fs.put([str(tmp / rel) for rel in files], [f"{folder}/{rel}" for rel in files])
        self.fs.pipe_file(f"{folder}/{MANIFEST}", (tmp / MANIFEST).read_bytes())  # the commit point
        # Keep it in the local cache, so downstream stages read it without a download (only a
        # convenience: if another process is putting it there at this moment, theirs will do).
        with contextlib.suppress(OSError):
            self.cache.install(tmp, kind, key)
        return manifest

    def local_path(self, kind: str, key: str) -> Path:
        """Download the artifact into the local cache, verified against its manifest, unless the
        cache already holds it whole (same fingerprint)."""
        manifest = self.manifest(kind, key)
        if manifest is None or manifest.get("key") != key:
            raise DamagedArtifact(f"{self.path(kind, key)}: no valid {MANIFEST}")
        cached = self.cache.manifest(kind, key)
        if cached and cached.get("fingerprint") == manifest["fingerprint"] and self.cache.check(kind, key) is None:
            return self.cache.path(kind, key)
        folder = self._path(kind, key)
        with self.cache.build(kind, key) as tmp:
            files = list(manifest["files"])
            for rel in files:
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            if files:  # one call: concurrent downloads on async filesystems
                self.fs.get([f"{folder}/{rel}" for rel in files], [str(tmp / rel) for rel in files])
            for rel, meta in manifest["files"].items():
                got = tmp / rel
                size = got.stat().st_size if got.is_file() else None
                if size != meta["size"] or file_sha256(got) != meta["sha256"]:
                    raise DamagedArtifact(f"{self.path(kind, key)}/{rel}: the downloaded file "
                                          f"({size} bytes) does not match the manifest "
                                          f"({meta['size']} bytes, sha256 {meta['sha256'][:12]}...)")
            created = manifest.get("created")
            if created is not None:  # verified as of the manifest: its sampled hash stands for it
                for rel in files:
                    os.utime(tmp / rel, (created, created))
            write_json_atomic(tmp / MANIFEST, manifest)
            try:
                self.cache.install(tmp, kind, key)
            except OSError:  # another process put it there meanwhile: as good, if it is whole
                if self.cache.check(kind, key) is not None:
                    raise
        return self.cache.path(kind, key)

    def sweep(self, kinds) -> None:
        """Nothing half-built is ever on the remote store; local leftovers are in the cache.
        (A crashed upload leaves files without a manifest: not an artifact, replaced when its key
        is built again.)"""
        self.cache.sweep(kinds)

    def claim(self) -> None:
        self.cache.claim()

    def _index_file(self, spec_name: str, node_id: str) -> str:
        return f"{self._base}/_index/{plain(spec_name, node_id + '.json')}"

    def last_recipe(self, spec_name: str, node_id: str) -> dict | None:
        try:
            return json.loads(self.fs.cat_file(self._index_file(spec_name, node_id)))
        except (FileNotFoundError, ValueError):
            return None

    def record_recipe(self, spec_name: str, node_id: str, key: str, recipe: dict) -> None:
        # One PUT: an object store writes it whole or not at all.
        self.fs.pipe_file(self._index_file(spec_name, node_id),
                          json.dumps({"key": key, "recipe": recipe}, indent=2, sort_keys=True, default=str).encode())
