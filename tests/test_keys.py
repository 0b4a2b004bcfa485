"""Stage keys: a config change makes that stage and everything downstream stale, nothing upstream;
an edit to a stage's code or a helper it imports does the same, a comment or unrelated edit not."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from conftest import DEMO_SPEC, REPO
from flows.graph import expand
from flows.keys import assign_keys
from flows.spec import load_spec


def keys(*overrides, rounds=3) -> dict[str, str]:
    nodes = expand(load_spec(DEMO_SPEC, list(overrides), rounds))
    assign_keys(nodes, 0)
    return {n.id: n.key for n in nodes}


def changed(a: dict, b: dict) -> set[str]:
    return {i for i in a if a[i] != b[i]}


def test_keys_are_deterministic_and_distinct():
    first, second = keys(), keys()
    assert first == second
    assert len(set(first.values())) == len(first)  # no two executions share a key


def test_evaluate_seed_changes_only_evaluate():
    assert changed(keys(), keys("stages.evaluate.seed=7")) == {"evaluate@1", "evaluate@2", "evaluate@3"}


def test_dpo_beta_changes_dpo_and_everything_after_it():
    diff = changed(keys(), keys("stages.dpo.beta=0.2"))
    assert diff == {"dpo@1", "evaluate@1"} | {f"{s}@{r}" for r in (2, 3)
                                             for s in ("generate", "score", "pairs", "dpo", "evaluate")}


def test_upstream_change_propagates_downstream_only():
    diff = changed(keys(), keys("datasets.train_prompts.size=100"))
    assert "sft" not in diff and "reward_model" not in diff and "eval_prompts" not in diff
    assert {"train_prompts", "generate@1", "dpo@3", "evaluate@3"} <= diff


def test_more_rounds_reuse_the_first_rounds():
    two, three = keys(rounds=2), keys(rounds=3)
    assert all(three[i] == k for i, k in two.items())


def _keys_in_copy(tmp_path, edit_file=None, edit=None) -> dict[str, str]:
    tree = tmp_path / "tree"
    if not tree.exists():
        tree.mkdir()
        for part in ("flows", "tasks", "pipelines"):
            shutil.copytree(REPO / part, tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    if edit_file:
        path = tree / edit_file
        path.write_text(edit(path.read_text()))
    code = ("import json; from flows.spec import load_spec; from flows.graph import expand; "
            "from flows.keys import assign_keys; n = expand(load_spec('pipelines/demo.yaml')); "
            "assign_keys(n, 0); print(json.dumps({x.id: x.key for x in n}))")
    out = subprocess.run([sys.executable, "-c", code], cwd=tree, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_code_edits(tmp_path):
    base = _keys_in_copy(tmp_path)
    # a comment and a docstring change nothing
    after_comment = _keys_in_copy(tmp_path, "tasks/train/dpo.py", lambda s: "# a new comment\n" + s.replace('"""', '"""Reworded. ', 1))
    assert after_comment == base
    # an unused definition changes nothing either: keys follow the code a stage really calls
    after_unused = _keys_in_copy(tmp_path, "tasks/train/dpo.py", lambda s: s + "\n\nUNUSED_CONSTANT = 1\n")
    assert after_unused == base
    # an edit to the DPO stage's code: dpo and everything downstream of it
    after_dpo = _keys_in_copy(tmp_path, "tasks/train/dpo.py", lambda s: s.replace("losses.mean(), metrics", "losses.mean() * 1, metrics"))
    assert changed(base, after_dpo) == changed(keys(), keys("stages.dpo.beta=0.2"))
    # an edit to a helper the DPO stage calls (the losses) does the same
    after_losses = _keys_in_copy(tmp_path, "tasks/train/losses.py", lambda s: _edit_function(s, "preference_loss"))
    assert {"dpo@1", "dpo@3"} <= changed(after_dpo, after_losses)
    assert "sft" not in changed(after_dpo, after_losses)
    # an edit to an unrelated stage (evaluate) leaves the others alone
    after_eval = _keys_in_copy(tmp_path, "tasks/evaluate.py", lambda s: _edit_function(s, "evaluate"))
    assert changed(after_losses, after_eval) == {"evaluate@1", "evaluate@2", "evaluate@3"}


def _edit_function(source: str, name: str) -> str:
    """`source` with a harmless statement added at the top of function `name`'s body."""
    import ast

    tree = ast.parse(source)
    (node,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    first = node.body[1] if isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant) else node.body[0]
    lines = source.splitlines(keepends=True)
    indent = lines[first.lineno - 1][: first.col_offset]
    lines.insert(first.lineno - 1, f"{indent}_edited = 1\n")
    return "".join(lines)


def test_edits_reach_only_the_stages_that_call_the_edited_code(tmp_path):
    """The synthetic data and the tiny model do not go stale when the rewards or LoRA change."""
    base = _keys_in_copy(tmp_path)
    data_and_model = {"base", "sft_data", "rm_pairs", "rm_heldout", "train_prompts", "eval_prompts"}
    after_rewards = _keys_in_copy(tmp_path, "tasks/rewards.py", lambda s: _edit_function(s, "resolve_reward_fn"))
    assert not changed(base, after_rewards) & data_and_model
    assert {"score@1", "evaluate@1"} <= changed(base, after_rewards)
    after_lora = _keys_in_copy(tmp_path, "tasks/train/lora.py", lambda s: _edit_function(s, "add_lora"))
    assert not changed(after_rewards, after_lora) & data_and_model
    assert {"sft", "dpo@1"} <= changed(after_rewards, after_lora)


def test_the_shard_merge_is_in_the_keys_of_the_stages_it_merges(tmp_path):
    base = _keys_in_copy(tmp_path)
    after = _keys_in_copy(tmp_path, "flows/pipeline.py", lambda s: _edit_function(s, "merge_shards"))
    assert {"generate@1", "score@1"} <= changed(base, after)
    assert not changed(base, after) & {"base", "sft", "reward_model", "sft_data"}


def test_package_upgrades_change_keys_and_plan_says_which(monkeypatch):
    import flows.keys as flows_keys

    before = expand(load_spec(DEMO_SPEC, [], 1))
    assign_keys(before, 0)
    real = flows_keys.package_version
    monkeypatch.setattr(flows_keys, "package_version",
                        lambda name: "9.99" if name == "transformers" else real(name))
    after = expand(load_spec(DEMO_SPEC, [], 1))
    assign_keys(after, 0)
    assert all(a.key != b.key for a, b in zip(before, after))
    reasons = flows_keys.explain_change(before[0].recipe, after[0].recipe, {})
    assert reasons == [f"transformers {real('transformers')} -> 9.99"]


def test_a_hub_model_needs_a_pinned_revision(tmp_path):
    import pytest

    from flows.errors import SpecError

    spec = {"name": "hub", "models": {"m": {"kind": "pretrained", "path": "someone/some-model"}},
            "stages": {}}
    (tmp_path / "spec.yaml").write_text(json.dumps(spec))
    with pytest.raises(SpecError, match=r"models.m.revision.*revision \(commit sha or tag\) for hub model 'someone/some-model'"):
        load_spec(tmp_path / "spec.yaml")


def test_a_spec_named_by_a_relative_path_has_the_keys_of_its_absolute_path(tmp_path, monkeypatch):
    """A data file's path is in its node's key: `alignflow run pipelines/x.yaml` from the project's
    folder must reuse what `alignflow run /abs/.../pipelines/x.yaml` computed (they once differed)."""
    from flows.keys import resolve
    from flows.spec import load_spec

    (tmp_path / "pipelines" / "data").mkdir(parents=True)
    (tmp_path / "pipelines" / "data" / "p.jsonl").write_text('{"prompt": "hi"}\n')
    spec = tmp_path / "pipelines" / "x.yaml"
    spec.write_text("name: x\ndatasets:\n  prompts: {kind: jsonl, path: data/p.jsonl}\n"
                    "stages:\n  first: {kind: slice, table: prompts, rows: 1}\n")
    absolute = {n.name: n.key for n in resolve(load_spec(spec))}
    monkeypatch.chdir(tmp_path)
    relative = {n.name: n.key for n in resolve(load_spec("pipelines/x.yaml"))}
    monkeypatch.chdir(tmp_path / "pipelines")
    assert absolute == relative == {n.name: n.key for n in resolve(load_spec("x.yaml"))}
