"""bench/online_vs_trl.py runs end to end (both sides of rloo and grpo, the smallest settings) and
ends with the line the issue asks for. The numbers themselves are the bench's business."""
from __future__ import annotations

import re
import subprocess
import sys

from conftest import REPO


def test_online_vs_trl_bench_runs():
    result = subprocess.run(
        [sys.executable, str(REPO / "bench" / "online_vs_trl.py"), "--model", "tiny", "--warmup", "1", "--steps", "1",
         "--prompts-per-step", "2", "--samples", "2", "--max-new-tokens", "4", "--sft-examples", "0",
         "--no-process-warmup"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"online_vs_trl: rloo time ratio \d+\.\d\d, memory ratio \d+\.\d\d; "
                        r"grpo time ratio \d+\.\d\d, memory ratio \d+\.\d\d", lines[-1]), lines[-1]
    for side in ("alignflow rloo", "trl RLOOTrainer", "alignflow grpo", "trl GRPOTrainer"):
        assert any(line.startswith(side) for line in lines), f"no row for {side}:\n{result.stdout}"
