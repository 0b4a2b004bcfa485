"""Bad input data is exit 2 and writes nothing: local files are read and checked before any stage
runs; bad data found only while running stops the run and cancels what computes, uncommitted."""
from __future__ import annotations

import io

import pytest
import yaml
from typer.testing import CliRunner

from conftest import alignflow
from flows.cli import app
from tasks.base import BadInput, text_lines

GOOD = '{"prompt": "a", "chosen": "b", "rejected": "c"}\n'


def spec_reading(tmp_path, path: str) -> object:
    """An SFT branch beside a preference file: the SFT must not be trained and committed."""
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "bad-input",
        "models": {"base": {"kind": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "datasets": {"sft_data": {"kind": "synthetic", "split": "sft", "size": 8},
                     "prefs": {"kind": "jsonl", "path": path, "format": "preferences"}},
        "stages": {"sft": {"kind": "sft", "model": "base", "data": "sft_data", "epochs": 1},
                   "rm": {"kind": "reward_model", "model": "base", "data": "prefs", "epochs": 1}},
    }))
    return spec


def run_rejected(tmp_path, monkeypatch, spec) -> str:
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    result = CliRunner().invoke(app, ["run", str(spec)])
    assert result.exit_code == 2, (result.output, result.exception)
    assert "Traceback" not in result.output
    assert not home.exists(), "exit 2 writes nothing: no store, no MLflow, no Prefect home"
    return " ".join(result.output.split())


def test_truncated_file_stops_before_any_stage(tmp_path, monkeypatch):
    (tmp_path / "prefs.jsonl").write_text(GOOD * 3 + '{"prompt": "a", "chos')
    out = run_rejected(tmp_path, monkeypatch, spec_reading(tmp_path, "prefs.jsonl"))
    assert "prefs.jsonl: line 4" in out


def test_non_utf8_byte_names_the_line(tmp_path, monkeypatch):
    (tmp_path / "prefs.jsonl").write_bytes(GOOD.encode() * 2 + b'{"prompt": "\xff", "chosen": "b", "rejected": "c"}\n')
    out = run_rejected(tmp_path, monkeypatch, spec_reading(tmp_path, "prefs.jsonl"))
    assert "prefs.jsonl: line 3: UTF-8 text (byte 0xff" in out


def test_folder_as_data_file(tmp_path, monkeypatch):
    (tmp_path / "prefs.jsonl").mkdir()
    out = run_rejected(tmp_path, monkeypatch, spec_reading(tmp_path, "prefs.jsonl"))
    assert "datasets.prefs.path: expected a regular file" in out and "a folder" in out


@pytest.mark.parametrize("special", ["/dev/zero", "/dev/null"])
def test_special_file_as_data_file(tmp_path, monkeypatch, special):
    out = run_rejected(tmp_path, monkeypatch, spec_reading(tmp_path, special))
    assert "datasets.prefs.path: expected a regular file" in out and "special file" in out


def test_fifo_as_data_file_does_not_block(tmp_path, monkeypatch):
    import os

    os.mkfifo(tmp_path / "pipe.jsonl")
    out = run_rejected(tmp_path, monkeypatch, spec_reading(tmp_path, "pipe.jsonl"))
    assert "special file" in out


def test_a_line_without_end_is_read_to_a_bound(monkeypatch):
    import tasks.base

    monkeypatch.setattr(tasks.base, "MAX_LINE_BYTES", 1000)
    lines = text_lines(io.BytesIO(b"{}\n" + b"x" * 5000), "f.jsonl")
    assert next(lines) == (1, "{}\n")
    with pytest.raises(BadInput, match="line 2"):
        next(lines)


def test_bad_data_found_while_running_cancels_the_other_branch(tmp_path):
    """A remote source fails 1 s in; a 6 s training beside it stops at its next step, uncommitted."""
    spec = tmp_path / "late.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "late-bad-input",
        "datasets": {"remote": {"kind": "toy_late_bad_input", "seconds": 1.0},
                     "prompts": {"kind": "synthetic", "split": "prompts", "size": 8}},
        "stages": {"train": {"kind": "toy_steps", "data": "prompts", "steps": 60, "seconds": 0.1},
                   "use": {"kind": "toy_steps", "data": "remote", "steps": 1}},
    }))
    home = tmp_path / "home"
    out = alignflow("run", spec, home=home, env={"ALIGNFLOW_PLUGINS": "hostile_stages"})
    assert out.returncode == 2, out.stderr
    assert "hub://someone/data: row 7" in out.stderr and "Traceback" not in out.stderr
    assert not list((home / "store").glob("toy_steps/*")), "the training beside it was committed"
    assert not list((home / "store").glob("toy_steps/.tmp-*"))


def test_max_length_below_the_prompt_is_bad_input(tmp_path, run_stage, tiny_demo_model):
    from tasks.tables import write_table

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    write_table({"prompt": ["tell me about cats and dogs"] * 2, "chosen": ["good"] * 2, "rejected": ["bad"] * 2}, pairs)
    with pytest.raises(BadInput, match="row 1: a prompt shorter than max_length=3"):
        run_stage({"kind": "dpo", "policy": "p", "pairs": "x", "max_length": 3, "batch_size": 2},
                  inputs={"policy": tiny_demo_model, "pairs": pairs})
