"""Cold run against warm (fully cached) run of a spec, in a fresh ALIGNFLOW_HOME.

    python bench/cache_speedup.py [pipelines/demo.yaml]

Baseline: the cold run of the same spec in the same process tree, measured just before.
Last line: `cache_speedup: warm/cold X.XXX (cold C s, warm W s)`; the target is <= 0.05.
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def timed_run(spec: str, home: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "flows.cli", "run", spec], cwd=REPO, check=True,
                   env={**os.environ, "ALIGNFLOW_HOME": home})
    return time.perf_counter() - started


def main() -> None:
    spec = sys.argv[1] if len(sys.argv) > 1 else "pipelines/demo.yaml"
    with tempfile.TemporaryDirectory() as home:
        cold = timed_run(spec, home)
        warm = [timed_run(spec, home) for _ in range(3)]
    best = min(warm)
    print(f"cold {cold:.1f}s; warm runs {', '.join(f'{w:.1f}s' for w in warm)}")
    print(f"cache_speedup: warm/cold {best / cold:.3f} (cold {cold:.1f} s, warm {best:.1f} s)")


if __name__ == "__main__":
    main()
