"""Hostile and clumsy specs: each is exit 2 with the field and the rule, no traceback, and
nothing written (not even ALIGNFLOW_HOME), whatever it asks for."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from flows.cli import app
from flows.errors import SpecError
from flows.spec import load_spec
from flows.store import Store


def small_spec(**edits) -> dict:
    spec = {
        "name": "hostile",
        "models": {"base": {"kind": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "datasets": {"prompts": {"kind": "synthetic", "task": "demo", "split": "prompts", "size": 8},
                     "sft_data": {"kind": "synthetic", "task": "demo", "split": "sft", "size": 8}},
        "stages": {
            "sft": {"kind": "sft", "model": "base", "data": "sft_data", "epochs": 1},
            "generate": {"kind": "generate", "policy": "sft", "prompts": "prompts", "n": 2},
        },
    }
    for path, value in edits.items():
        node = spec
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[k]
        node[keys[-1]] = value
    return spec


def write(tmp_path: Path, spec, text: str | bytes | None = None) -> Path:
    path = tmp_path / "spec.yaml"
    if text is None:
        text = yaml.safe_dump(spec, sort_keys=False)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


def rejected(tmp_path, monkeypatch, spec_path, *args) -> str:
    """Run `alignflow run` and `plan` on it: exit 2, no traceback, nothing written anywhere."""
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    before = set(tmp_path.rglob("*"))
    outputs = []
    for command in ("run", "plan"):
        result = CliRunner().invoke(app, [command, str(spec_path), *args])
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        assert "Traceback" not in result.output
        outputs.append(result.output)
    assert not home.exists(), "a rejected spec must leave nothing behind"
    assert set(tmp_path.rglob("*")) == before
    return outputs[0]


def problems(path) -> list[str]:
    with pytest.raises(SpecError) as err:
        load_spec(path)
    return [str(p) for p in err.value.problems]


BAD_NAMES = ["../../../../tmp/x/PWNED", "/tmp/x/ABS", "", "caf\u00e9", "a\u202eb", "a\nb", "gen@1", "policy",
             "reference", "x" * 65, "1abc", ".hidden", "a b"]


@pytest.mark.parametrize("name", BAD_NAMES)
@pytest.mark.parametrize("section", ["models", "datasets", "stages"])
def test_bad_node_names_are_spec_errors(tmp_path, monkeypatch, section, name):
    spec = small_spec()
    spec[section][name] = spec[section].pop({"models": "base", "datasets": "prompts", "stages": "generate"}[section])
    out = rejected(tmp_path, monkeypatch, write(tmp_path, spec))
    assert f"{section}." in out and ("not allowed" in out or "reserved" in out), out
    # One root cause, one message: the nodes that referred to the old name say nothing more
    # only when the name itself is the problem; here the old name is gone, so they may.
    assert out.count("error:") >= 1


def test_good_names_pass(tmp_path):
    spec = small_spec()
    spec["stages"]["_gen-2_x"] = spec["stages"].pop("generate")
    spec["models"]["M" + "x" * 63] = spec["models"].pop("base")
    spec["stages"]["sft"]["model"] = "M" + "x" * 63
    assert load_spec(write(tmp_path, spec)).nodes


def test_one_root_cause_one_message(tmp_path):
    spec = small_spec()
    spec["stages"]["sft"]["learning_rate"] = 1e-3  # sft fails; generate refers to it
    found = problems(write(tmp_path, spec))
    assert len(found) == 1, found
    assert "stages.sft.learning_rate" in found[0] and "use lr" in found[0]
    spec["stages"]["bad name"] = {"kind": "generate", "policy": "sft", "prompts": "prompts"}
    spec["stages"]["sft"].pop("learning_rate")
    spec["stages"]["score"] = {"kind": "score", "candidates": "bad name", "reward_fn": "demo_gold"}
    found = problems(write(tmp_path, spec))
    assert len(found) == 1 and "not allowed" in found[0], found


@pytest.mark.parametrize("key, hint", [
    ("learning_rate", "use lr"),
    ("per_device_train_batch_size", "use micro_batch_size"),
    ("gradient_accumulation_steps", "micro_batch_size and batch_size"),
    ("num_train_epochs", "use epochs"),
    ("loss_type", "kind"),
    ("lora_r", "lora: {r"),
    ("lora_alpha", "lora: {alpha"),
    ("bf16", "dtype: bfloat16"),
    ("torch_dtype", "use dtype"),
])
def test_trl_keys_name_alignflows_key(tmp_path, key, hint):
    spec = small_spec()
    spec["stages"]["sft"][key] = 1
    [message] = problems(write(tmp_path, spec))
    assert f"stages.sft.{key}" in message and hint in message


@pytest.mark.parametrize("text, field", [
    ("stages.sft.epochs: .inf", "stages.sft.epochs"),
    ("stages.sft.lr: .nan", "stages.sft.lr"),
    ("stages.sft.lr: 1e400", "stages.sft.lr"),
    ("stages.sft.lr: -.inf", "stages.sft.lr"),
    ("seed: 99999999999999999999999", "seed"),
    ("seed: -1", "seed"),
    ("seed: 4294967296", "seed"),
    ("stages.sft.seed: -1", "stages.sft.seed"),
    ("stages.sft.epochs: 99999999999999999999999", "stages.sft.epochs"),
    ("datasets.prompts.size: 10000000000", "datasets.prompts.size"),
    ("stages.generate.n: 1", "stages.generate.n"),
])
def test_bad_values_are_spec_errors_naming_the_field(tmp_path, monkeypatch, text, field):
    key, _, value = text.partition(": ")
    spec = small_spec()
    spec["stages"].update(score={"kind": "score", "candidates": "generate", "reward_fn": "demo_gold"},
                          pairs={"kind": "pairs", "scored": "score", "reference": "sft"})
    path = write(tmp_path, spec)
    out = rejected(tmp_path, monkeypatch, path, "--set", f"{key}={value}")
    assert field in out, out
    # The same value written in the file, not through --set.
    raw = yaml.safe_load(path.read_text())
    node = raw
    for k in key.split(".")[:-1]:
        node = node[k]
    node[key.split(".")[-1]] = "__VALUE__"
    (tmp_path / "file.yaml").write_text(yaml.safe_dump(raw).replace("__VALUE__", value))
    assert any(field in p for p in problems(tmp_path / "file.yaml"))


def test_seed_bounds_are_accepted(tmp_path):
    assert load_spec(write(tmp_path, small_spec(seed=2**32 - 1))).seed == 2**32 - 1
    assert load_spec(write(tmp_path, small_spec(seed=0))).seed == 0


def test_deep_yaml_is_a_spec_error(tmp_path, monkeypatch):
    deep = "name: deep\nx: " + "[" * 500 + "]" * 500 + "\n"
    out = rejected(tmp_path, monkeypatch, write(tmp_path, None, deep))
    assert "nested more than 100 deep" in out and len(out.splitlines()) < 5


def test_alias_bomb_is_a_spec_error(tmp_path):
    lines = ["name: bomb", "a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]" for i in range(1, 9)]
    [message] = problems(write(tmp_path, None, "\n".join(lines) + "\n"))
    assert "at most 100000 values" in message


def test_big_spec_is_a_spec_error(tmp_path, monkeypatch):
    out = rejected(tmp_path, monkeypatch, write(tmp_path, None, "name: big\n" + "#" * (2 << 20) + "\n"))
    assert "at most 1 MiB" in out


def test_too_many_nodes_is_a_spec_error(tmp_path):
    spec = small_spec()
    spec["datasets"].update({f"d{i}": {"kind": "synthetic", "split": "prompts", "size": 1} for i in range(1001)})
    [message] = problems(write(tmp_path, spec))
    assert "at most 1000" in message


def test_too_many_executions_is_a_spec_error(tmp_path):
    spec = small_spec(rounds={"count": 1000, "repeat": ["generate"] * 11})
    assert any("rounds.count" in p for p in problems(write(tmp_path, spec)))


@pytest.mark.parametrize("text", [b"name: x\nseed: \xff\n", "name: x\n".encode("utf-16")])
def test_non_utf8_spec_names_the_line(tmp_path, monkeypatch, text):
    out = rejected(tmp_path, monkeypatch, write(tmp_path, None, text))
    assert "UTF-8" in out


def test_special_file_as_spec(tmp_path, monkeypatch):
    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    result = CliRunner().invoke(app, ["run", "/dev/zero"])
    assert result.exit_code == 2 and "regular file" in result.output


@pytest.mark.parametrize("parts", [("..", "x"), ("a/b", "x"), ("/abs", "x"), ("ok", ""), ("ok", "a\nb")])
def test_store_paths_stay_under_the_root(tmp_path, parts):
    store = Store(tmp_path / "store")
    with pytest.raises(ValueError):
        store.path(*parts)
    with pytest.raises(ValueError):
        store.record_recipe(parts[0], parts[1], "k", {})
    assert not (tmp_path / "store").exists()


HOSTILE_SPECS = sorted((Path(__file__).parent / "hostile_specs").glob("*.yaml"))
OUTSIDE = Path("/tmp/alignflow-hostile")  # where the hostile specs try to write


@pytest.mark.parametrize("spec", HOSTILE_SPECS, ids=[p.stem for p in HOSTILE_SPECS])
def test_hostile_specs_are_rejected_and_write_nothing(tmp_path, monkeypatch, spec):
    home = tmp_path / "home"
    monkeypatch.setenv("ALIGNFLOW_HOME", str(home))
    for command in ("run", "plan"):
        result = CliRunner().invoke(app, [command, str(spec)])
        assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
        assert "Traceback" not in result.output and "error:" in result.output
        assert str(spec) in result.output  # the message names the file (and the field, after it)
    assert not home.exists() and not OUTSIDE.exists()


def test_remote_store_uri_cannot_place_local_state_outside_home(tmp_path, monkeypatch):
    from flows.store import StoreUnavailable

    monkeypatch.setenv("ALIGNFLOW_HOME", str(tmp_path / "home"))
    with pytest.raises(StoreUnavailable, match="outside"):
        Store("memory://bucket/../../../../../tmp/alignflow-hostile")
    assert Store("memory://bucket/prefix").local_root.is_relative_to(tmp_path / "home" / "remote")
