"""A user's reward module beside the spec is loaded from its file under a private name: named
like a standard module (random.py), beside files named like one (json.py) or like alignflow's own
package (tasks.py), it replaces nothing in the process; its sibling imports still work; and one
whose import would get another module than the one beside it is a spec error saying so."""
from __future__ import annotations

import json
import random
import sys

import pytest
import yaml

import tasks
from conftest import alignflow
from flows.errors import SpecError
from flows.spec import load_spec

POISON = "raise ImportError('this file is not the module the process needs')\n"
RANDOM_PY = '''
import math

from helpers import words


def score(prompt, response):
    return math.sqrt(words(response))
'''


def spec_beside(tmp_path, module: str) -> object:
    (tmp_path / "candidates.jsonl").write_text("".join(
        json.dumps({"prompt": f"p{i}", "response": "a b c d"[: 2 * i + 1]}) + "\n" for i in range(4)))
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump({
        "name": "beside",
        "datasets": {"candidates": {"kind": "jsonl", "path": "candidates.jsonl"}},
        "stages": {"score": {"kind": "score", "candidates": "candidates", "reward_fn": f"{module}:score"}},
    }))
    return spec


def test_a_reward_module_named_like_standard_modules_runs(tmp_path):
    (tmp_path / "random.py").write_text(RANDOM_PY)
    (tmp_path / "helpers.py").write_text("def words(text):\n    return len(text.split())\n")
    (tmp_path / "json.py").write_text(POISON)
    (tmp_path / "tasks.py").write_text(POISON)
    spec = spec_beside(tmp_path, "random")
    result = alignflow("run", spec, home=tmp_path / "home", check=True)
    assert "2 ran, 0 cached" in result.stderr
    import pyarrow.parquet as pq

    table = pq.read_table(next((tmp_path / "home" / "store" / "score").glob("*/data.parquet")))
    assert table.column("reward").to_pylist() == [1.0, 2 ** 0.5, 3 ** 0.5, 2.0]

    load_spec(spec)  # and in this process: nothing of the process's own is replaced
    assert sys.modules["random"] is random and sys.modules["json"] is json and sys.modules["tasks"] is tasks
    assert "helpers" not in sys.modules


def test_a_module_that_would_import_another_than_the_one_beside_it_is_a_spec_error(tmp_path):
    (tmp_path / "myreward.py").write_text("import json\n\ndef score(prompt, response):\n    return 0.0\n")
    (tmp_path / "json.py").write_text("def dumps(x):\n    return 'mine'\n")
    with pytest.raises(SpecError) as error:
        load_spec(spec_beside(tmp_path, "myreward"))
    problem = error.value.problems[0]
    assert problem.path == "stages.score.reward_fn"
    assert "myreward.py imports 'json', which is Python's own module, not json.py beside the spec: rename json.py" \
        in problem.message
    result = alignflow("run", tmp_path / "spec.yaml", home=tmp_path / "home")
    assert result.returncode == 2 and "rename json.py" in result.stderr and not (tmp_path / "home").exists()
