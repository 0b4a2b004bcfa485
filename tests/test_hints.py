"""What the end of a run tells a person to type next works as typed: the program as PATH finds it,
else its path from here (`make demo` runs `.venv/bin/alignflow` without activating the venv), and
`make compare` / `make ui` where this folder's Makefile has them. compare's EXRM vs DPORM table: a
zero-width interval over seeds is marked and said why."""
from __future__ import annotations

import sys

from rich.console import Console

from conftest import REPO
from flows import report
from flows.cli import program_hint, versus_table


def fake_program(tmp_path, monkeypatch, on_path: bool):
    program = tmp_path / ".venv" / "bin" / "alignflow"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(program), "run", "pipelines/demo.yaml"])
    monkeypatch.setenv("PATH", f"{program.parent}:/usr/bin:/bin" if on_path else "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)


def test_the_venvs_program_by_its_path_and_makes_targets(tmp_path, monkeypatch):
    fake_program(tmp_path, monkeypatch, on_path=False)
    assert program_hint() == (".venv/bin/alignflow", False)
    (tmp_path / "Makefile").write_text((REPO / "Makefile").read_text())
    assert program_hint() == (".venv/bin/alignflow", True)


def test_the_name_where_path_finds_it(tmp_path, monkeypatch):
    fake_program(tmp_path, monkeypatch, on_path=True)
    assert program_hint() == ("alignflow", False)


def test_makefile_has_the_targets_the_hint_names():
    makefile = (REPO / "Makefile").read_text()
    assert "\ncompare:" in makefile and "\nui:" in makefile and "$(BIN)/alignflow ui $(SPEC)" in makefile


def test_zero_width_interval_over_seeds_is_marked_and_explained():
    rows = [{"stage": f"{reward}_acc_s{seed}", "round": 0, "cache": "miss", "reward": reward,
             "metrics": {"acc_id": 0.9375 if reward == "exrm" else 0.9 + 0.01 * seed}}
            for seed in range(3) for reward in report.REWARDS]
    comparison = report.reward_comparison(report.summary_table(rows))
    assert report.zero_width(comparison[0]["exrm"]) and not report.zero_width(comparison[0]["dporm"])
    console = Console(width=120, record=True)
    console.print(versus_table(comparison))
    text = console.export_text()
    assert "0.938 [0.938, 0.938] *" in text and "0.910 [0.885, 0.935] │" in text and "-0.027 [-0.052, -0.003] │" in text
    assert "* zero width: every seed gave the same value" in text
    assert max(map(len, text.splitlines())) <= 120
