"""A full disk: a real one, a small tmpfs mounted in a mount namespace of the test's own (so that
nothing stays mounted, whatever happens). The run says `no space left on device: <path>` in one
line and exits 1, commits nothing partial, and the next run, once there is space, finishes."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import yaml

from conftest import REPO

SCENARIO = """
set -u
mount -t tmpfs -o size=1m tmpfs "$DISK"
cd "$REPO"
"$PYTHON" -m flows.cli run "$SPEC" > "$OUT/first.txt" 2>&1; echo $? > "$OUT/first.rc"
find "$DISK" > "$OUT/after-first.txt"
mount -o remount,size=256m "$DISK"
"$PYTHON" -m flows.cli run "$SPEC" > "$OUT/second.txt" 2>&1; echo $? > "$OUT/second.rc"
find "$DISK" > "$OUT/after-second.txt"
"""


def on_a_small_disk(tmp_path, spec: dict, home_on_disk: bool) -> dict:
    """Run the spec twice in a mount namespace: on a 1 MiB tmpfs, then with 256 MiB."""
    if not shutil.which("unshare") or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("needs `unshare -rm` (a mount namespace) for a small tmpfs")
    disk, out = tmp_path / "disk", tmp_path / "out"
    disk.mkdir()
    out.mkdir()
    spec_file = tmp_path / "spec.yaml"
    if not home_on_disk:
        spec = {**spec, "store": str(disk / "store")}
    spec_file.write_text(yaml.safe_dump(spec))
    env = {**os.environ, "DISK": str(disk), "OUT": str(out), "REPO": str(REPO), "PYTHON": sys.executable,
           "SPEC": str(spec_file), "ALIGNFLOW_HOME": str(disk / "home" if home_on_disk else tmp_path / "home"),
           "ALIGNFLOW_PLUGINS": "hostile_stages", "PYTHONPATH": str(REPO / "tests" / "plugins")}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI"):
        env.pop(name, None)
    subprocess.run(["unshare", "-rm", "bash", "-c", textwrap.dedent(SCENARIO)], env=env, check=True, timeout=600)
    return {name.removesuffix(".txt").removesuffix(".rc") + ("_rc" if name.endswith(".rc") else ""):
            (p.read_text().strip() if name.endswith(".rc") else p.read_text()) for name, p in
            ((p.name, p) for p in out.iterdir())}


SPEC = {
    "name": "disk",
    "datasets": {"prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
    "stages": {"a": {"kind": "toy_steps", "data": "prompts", "steps": 1, "seconds": 0}},
}


def one_line(output: str) -> str:
    lines = [line for line in output.splitlines() if "no space left on device" in line]
    assert len(lines) == 1 and "Traceback" not in output, output[-3000:]
    return lines[0]


def test_a_full_disk_on_a_homes_first_run_leaves_it_usable(tmp_path):
    got = on_a_small_disk(tmp_path, SPEC, home_on_disk=True)
    assert got["first_rc"] == "1", got["first"][-3000:]
    line = one_line(got["first"])
    assert f"error: no space left on device: {tmp_path / 'disk' / 'home'}/" in line  # mlflow.db or prefect's
    assert got["second_rc"] == "0", got["second"][-3000:]
    assert "2 ran, 0 cached" in got["second"]
    assert ".tmp" not in got["after-second"].replace(".alignflow", "")  # no half-made database beside it


def test_a_full_disk_in_mid_run_commits_nothing_and_the_next_run_finishes(tmp_path):
    spec = {**SPEC, "stages": {**SPEC["stages"], "big": {"kind": "toy_write", "data": "prompts", "mib": 2}}}
    got = on_a_small_disk(tmp_path, spec, home_on_disk=False)
    assert got["first_rc"] == "1", got["first"][-3000:]
    assert one_line(got["first"]) == f"error: no space left on device: {tmp_path / 'disk' / 'store'}"
    committed = [line for line in got["after-first"].splitlines() if line.endswith("manifest.json")]
    assert committed and not any("toy_write/" in line for line in committed)  # what finished, never big
    assert "/.tmp-" not in got["after-first"], "nothing half-written left"
    assert got["second_rc"] == "0", got["second"][-3000:]
    assert "1 ran, 2 cached" in got["second"]
