"""Shared fixtures. The stage-function fixtures below are named for what they build
(tiny_demo_model, demo_table, run_stage); add engine fixtures alongside them."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tasks import load_stage_kinds
from tasks.base import StageContext

# Test workers (xdist) share the cores: each takes its share of torch's threads, and so do the
# runs it starts (tasks.models.set_cpu_threads reads ALIGNFLOW_TORCH_THREADS). With 2 workers of 2
# threads on 2 cores, each thread spins waiting for one the other worker holds: SmolLM2's sampling
# ran 6x slower, its training 2.4x (measured side by side, 1 thread each against 2 each).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    os.environ.setdefault("ALIGNFLOW_TORCH_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# The tiny model every stage test uses: small enough that a stage runs in about a second.
TINY_MODEL = {"kind": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}


def run_stage_in(out: Path, params: dict, inputs: dict[str, Path] | None = None, seed: int = 0, log=None):
    """Run a stage kind's function directly: validate params, build the context, run."""
    kind = load_stage_kinds()[params["kind"]]
    out.mkdir(parents=True, exist_ok=False)
    context = StageContext(out=out, inputs=dict(inputs or {}), params=kind.params.model_validate(params), seed=seed)
    if log is not None:
        context.log_metrics = lambda metrics, step: log.append((step, metrics))
    return kind.run(context)


@pytest.fixture
def run_stage(tmp_path):
    """run_stage(params, inputs={}, seed=0, log=None) -> (out folder, metrics), each in a fresh folder."""
    counter = iter(range(10_000))

    def run(params: dict, inputs: dict[str, Path] | None = None, seed: int = 0, log=None):
        out = tmp_path / f"{params['kind']}-{next(counter)}"
        return out, run_stage_in(out, params, inputs, seed, log)

    return run


@pytest.fixture(scope="session")
def tiny_demo_model(tmp_path_factory) -> Path:
    """A random-init tiny Llama + word tokenizer for the demo task (a "model" artifact folder)."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny_model"
    run_stage_in(out, TINY_MODEL, seed=0)
    return out


@pytest.fixture(scope="session")
def demo_table(tmp_path_factory):
    """demo_table(split, size, seed=0) -> folder of a synthetic demo split (cached per session)."""
    root = tmp_path_factory.mktemp("demo_tables")
    made = {}

    def make(split: str, size: int, seed: int = 0) -> Path:
        key = (split, size, seed)
        if key not in made:
            made[key] = root / f"{split}-{size}-{seed}"
            run_stage_in(made[key], {"kind": "synthetic", "split": split, "size": size}, seed=seed)
        return made[key]

    return make


@pytest.fixture(scope="session")
def tiny_sft_model(tmp_path_factory, tiny_demo_model, demo_table) -> Path:
    """The tiny model after a short SFT on demo data: a policy that writes demo-shaped responses."""
    out = tmp_path_factory.mktemp("artifacts") / "tiny_sft"
    run_stage_in(
        out,
        {"kind": "sft", "model": "m", "data": "d", "epochs": 2, "lr": 1e-2, "batch_size": 32},
        {"model": tiny_demo_model, "data": demo_table("sft", 800)},
    )
    return out


# ---------------------------------------------------------------- engine fixtures
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import yaml  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEMO_SPEC = REPO / "pipelines" / "demo.yaml"


def small_demo(tmp_path: Path, rounds: int = 2, name: str = "demo-small") -> Path:
    """pipelines/demo.yaml shrunk to run in well under a minute: the same graph, tiny sizes."""
    spec = yaml.safe_load(DEMO_SPEC.read_text())
    spec["name"] = name
    spec["models"]["base"].update(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    sizes = {"sft_data": 200, "rm_pairs": 200, "rm_heldout": 50, "train_prompts": 16, "eval_prompts": 32}
    for dataset, size in sizes.items():
        spec["datasets"][dataset]["size"] = size
    for stage in ("sft", "reward_model", "dpo"):
        spec["stages"][stage]["epochs"] = 1
    spec["rounds"]["count"] = rounds
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def alignflow(*args, home: Path, env: dict | None = None, check: bool = False, **kwargs):
    """Run the real CLI in a subprocess, with its own ALIGNFLOW_HOME."""
    full_env = {**os.environ, "ALIGNFLOW_HOME": str(home), "PYTHONPATH": str(REPO / "tests" / "plugins"),
                **(env or {})}
    full_env.pop("PREFECT_API_URL", None)
    full_env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, "-m", "flows.cli", *map(str, args)], cwd=REPO, env=full_env,
                            capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise AssertionError(f"alignflow {' '.join(map(str, args))} exited {result.returncode}:\n{result.stderr[-4000:]}")
    return result


def stage_runs(home: Path, experiment: str, parent_run_id: str | None = None) -> list:
    """The nested stage runs in MLflow (of one parent run, or of the latest)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id], max_results=5000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    if parent_run_id is None:
        parent_run_id = max(parents, key=lambda r: r.info.start_time).info.run_id
    return [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent_run_id]


def paired_reward_gain(evaluate_run) -> tuple[float, float, float]:
    """An evaluate run's mean judge reward of the policy minus the baseline's, paired by prompt,
    with its 95% t-interval (scipy's, independent of flows/report.py): (mean, low, high). A
    learning test asserts the low end above 0, an improvement over the measured baseline."""
    import pyarrow.parquet as pq
    from scipy import stats

    samples = pq.read_table(Path(evaluate_run.data.tags["alignflow.uri"]) / "samples.parquet").to_pydict()
    gains = [p - b for p, b in zip(samples["policy_reward"], samples["baseline_reward"])]
    mean = sum(gains) / len(gains)
    low, high = stats.t.interval(0.95, len(gains) - 1, loc=mean, scale=stats.sem(gains))
    return mean, float(low), float(high)
