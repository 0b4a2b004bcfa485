"""Broken specs and options: exit code 2, a message naming file, field and expectation, no
traceback, and nothing written (no ALIGNFLOW_HOME, no store, no MLflow database)."""
from __future__ import annotations

import pytest
import yaml
from typer.testing import CliRunner

from conftest import DEMO_SPEC
from flows.cli import app
from flows.errors import SpecError
from flows.graph import expand
from flows.spec import load_spec


def write_demo(tmp_path, edit=lambda spec: None):
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    edit(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def run_cli(tmp_path, monkeypatch, *args):
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert not home.exists(), "a rejected spec must leave nothing behind"
    return result


def set_(path, value):
    def edit(spec):
        node = spec
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return edit


def delete(path):
    def edit(spec):
        node = spec
        keys = path.split(".")
        for k in keys[:-1]:
            node = node[k]
        del node[keys[-1]]
    return edit


CASES = [
    # (what is wrong, edit, dotted path expected in the message, words expected in it)
    ("unknown stage kind", set_("stages.dpo.kind", "dpoo"), "stages.dpo.kind", ["unknown", "did you mean 'dpo'"]),
    ("misspelled key", lambda s: s["stages"]["dpo"].update(betta=0.2), "stages.dpo.betta", ["unknown key", "did you mean 'beta'"]),
    ("reference to a missing stage", set_("stages.score.candidates", "generat"), "stages.score.candidates", ["no model, dataset or stage named 'generat'", "did you mean 'generate'"]),
    ("wrong type", set_("stages.dpo.beta", "high"), "stages.dpo.beta", ["expected", "'high'"]),
    ("out of range", set_("stages.dpo.beta", -1), "stages.dpo.beta", ["greater than 0"]),
    ("wrong artifact type", set_("stages.dpo.pairs", "reward_model"), "stages.dpo.pairs", ["outputs a reward_model", "expected a table"]),
    ("missing file", lambda s: s["datasets"].update(extra={"kind": "jsonl", "path": "nope/prefs.jsonl"}), "datasets.extra.path", ["file not found"]),
    ("round name outside rounds", set_("stages.sft.model", "policy"), "stages.sft.model", ["only inside rounds"]),
    ("unknown repeated stage", set_("rounds.repeat", ["generate", "scor"]), "rounds.repeat[1]", ["no stage named 'scor'"]),
    ("missing kind", delete("stages.pairs.kind"), "stages.pairs.kind", ["required"]),
    ("unknown top-level key", lambda s: s.update(stagez={}), "stagez", ["unknown key", "did you mean 'stages'"]),
    ("one-off stage reading a repeated one", set_("stages.reward_model.data", "pairs"), "stages.reward_model.data", ["repeats every round"]),
]


@pytest.mark.parametrize("what,edit,path,words", CASES, ids=[c[0] for c in CASES])
def test_broken_spec_exits_2_naming_file_and_field(tmp_path, monkeypatch, what, edit, path, words):
    spec = write_demo(tmp_path, edit)
    for command in (["plan", spec], ["run", spec]):
        result = run_cli(tmp_path, monkeypatch, *command)
        assert result.exit_code == 2, result.output
        assert f"{spec}: {path}:" in result.output, result.output
        for word in words:
            assert word in result.output, result.output
        assert "Traceback" not in result.output


def test_cycle_is_named(tmp_path, monkeypatch):
    def edit(spec):
        spec["stages"]["a"] = {"kind": "score", "candidates": "b", "reward_fn": "demo_gold"}
        spec["stages"]["b"] = {"kind": "score", "candidates": "a", "reward_fn": "demo_gold"}
    result = run_cli(tmp_path, monkeypatch, "run", write_demo(tmp_path, edit))
    assert result.exit_code == 2
    assert "cycle: a -> b -> a" in result.output or "cycle: b -> a -> b" in result.output


@pytest.mark.parametrize("args,words", [
    (["--set", "stages.dpoo.beta=0.2"], ["stages.dpoo.beta", "no 'stages.dpoo'", "did you mean 'dpo'"]),
    (["--set", "stages.dpo.beta"], ["expected dotted.key=value"]),
    (["--set", "stages.dpo.beta=[1"], ["not valid YAML"]),
    (["--set", "stages.dpo.betta=0.2"], ["stages.dpo.betta", "(from --set)", "did you mean 'beta'"]),
    (["--force", "dppo"], ["--force dppo", "did you mean 'dpo'"]),
])
def test_bad_options_exit_2(tmp_path, monkeypatch, args, words):
    result = run_cli(tmp_path, monkeypatch, "run", DEMO_SPEC, *args)
    assert result.exit_code == 2, result.output
    for word in words:
        assert word in result.output, result.output


def test_invalid_yaml_and_missing_spec(tmp_path, monkeypatch):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nstages: [unclosed\n")
    result = run_cli(tmp_path, monkeypatch, "plan", bad)
    assert result.exit_code == 2 and "not valid YAML at line" in result.output
    result = run_cli(tmp_path, monkeypatch, "plan", tmp_path / "absent.yaml")
    assert result.exit_code == 2 and "spec file not found" in result.output


def test_every_problem_is_reported_at_once(tmp_path):
    def edit(spec):
        spec["stages"]["dpo"]["beta"] = -1
        spec["stages"]["evaluate"]["judge_typo"] = 1
    with pytest.raises(SpecError) as err:
        load_spec(write_demo(tmp_path, edit))
    paths = {p.path for p in err.value.problems}
    assert {"stages.dpo.beta", "stages.evaluate.judge_typo"} <= paths


def test_overrides_are_parsed_as_yaml():
    spec = load_spec(DEMO_SPEC, ["stages.dpo.beta=0.2", "stages.generate.n=8", "rounds.count=2"])
    assert spec.nodes["dpo"].params.beta == 0.2
    assert spec.nodes["generate"].params.n == 8
    assert spec.rounds.count == 2


def test_rounds_carry_policy_and_reference():
    fixed = {n.id: n for n in expand(load_spec(DEMO_SPEC, rounds=3))}
    assert fixed["generate@1"].inputs["policy"] == "sft"
    assert fixed["generate@3"].inputs["policy"] == "dpo@2"
    assert fixed["dpo@3"].inputs["policy"] == "dpo@2"
    assert fixed["pairs@3"].inputs["reference"] == "sft"  # rounds.reference: fixed
    moving = {n.id: n for n in expand(load_spec(DEMO_SPEC, ["rounds.reference=previous"], rounds=3))}
    assert moving["pairs@1"].inputs["reference"] == "sft"
    assert moving["pairs@3"].inputs["reference"] == "dpo@2"
    # --rounds extends the same graph: the first rounds are the same executions
    assert [n.id for n in expand(load_spec(DEMO_SPEC, rounds=2))] == [i for i in fixed if not i.endswith("@3")]
