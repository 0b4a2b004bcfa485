"""Reports over one pipeline run: a summary table and plots, logged on its parent MLflow run.

Plain functions over the flow's summary rows (one per stage execution: stage, round, key, cache,
seconds, metrics). The flow calls `log_report` once at its end:

- `summary.json`: an MLflow table (`client.log_table`), one row per stage execution, columns
  stage, round, cache and every metric; `alignflow compare` prints it back from MLflow.
- `plots/win_rate.png`: win rate by round, one line per stage that reports `win_rate`, error bars
  from `win_rate_ci_low`/`win_rate_ci_high`.
- `plots/reward_accuracy.png`: EXRM against DPORM accuracy on each set (id, prompt_shift,
  response_shift), one point per stage execution (several seeds show their spread), error bars
  from the `_ci_low`/`_ci_high` metrics.

A sweep's parent run (flows/sweep.py) gets the same over every variant: `summary.json` with
`variant` and `seed` columns, and `plots/win_rate.png` with one line per variant (its interval
over seeds, with seeds). `sweep_comparison` is what `alignflow compare` prints for it.

A plot is only drawn when its metrics are there, and is cached by the content of what it shows
(`<store>/_reports/<hash>/`; for a remote store, in its local folder under ALIGNFLOW_HOME, see
flows/store.py): a fully cached run shows the same numbers, so it logs the PNGs it
already has and never imports matplotlib.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Iterable

BASE_COLUMNS = ("stage", "round", "cache")
SWEEP_COLUMNS = ("variant", "seed")  # a sweep's rows: which variant (without its seed), which seed
LABEL_COLUMNS = ("reward",)  # what a stage's run measures (its tag alignflow.<column>), where it says
REWARDS = ("exrm", "dporm")
SETS = ("id", "prompt_shift", "response_shift")
REWARD_LABELS = {"exrm": "EXRM (explicit reward model)", "dporm": "DPORM (DPO implicit reward)"}
SUMMARY_FILE = "summary.json"


# ---------------------------------------------------------------- the table
def summary_table(rows: Iterable[dict]) -> dict[str, list]:
    """Column name -> values: (a sweep's variant and seed,) stage, round, cache, (reward, where a
    stage says one,) then every metric in order of first appearance (None where a stage has none)."""
    rows = list(rows)
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row.get("metrics") or {}))
    extra = [column for column in SWEEP_COLUMNS if any(column in row for row in rows)]
    labels = [column for column in LABEL_COLUMNS if any(row.get(column) for row in rows)]
    table: dict[str, list] = {column: [] for column in (*extra, *BASE_COLUMNS, *labels, *names)}
    for row in rows:
        for column in extra:
            table[column].append(row.get(column))
        table["stage"].append(row["stage"])
        table["round"].append(int(row["round"]))
        table["cache"].append(row["cache"])
        for column in labels:
            table[column].append(row.get(column))
        metrics = row.get("metrics") or {}
        for name in names:
            value = metrics.get(name)
            table[name].append(None if value is None else float(value))
    return table


def table_rows(table: dict[str, list]) -> list[dict]:
    """The table's rows as dicts (column -> value)."""
    columns = list(table)
    return [dict(zip(columns, values)) for values in zip(*table.values())]


def parse_table(text: str) -> dict[str, list]:
    """An MLflow table artifact (pandas' "split" JSON: columns, data) back into column -> values."""
    obj = json.loads(text)
    columns, data = obj["columns"], obj["data"]
    return {column: [row[i] for row in data] for i, column in enumerate(columns)}


# ---------------------------------------------------------------- the headline, by round
# What the parent run logs by round (step = round): the win rate, and each reward's accuracy on
# each set with DPORM - EXRM beside them; each with `_ci_low` / `_ci_high` where it has one.
HEADLINE = ("win_rate", "win_rate_vs_previous", *(f"{name}_acc_{set_}" for set_ in SETS for name in (*REWARDS, "diff")))


# Beside the headline, what a round's evaluation says about over-optimisation (with `signals`): the
# proxy (picking) reward of the policy's samples, their length, and KL to the reference. A proxy
# that rises while the gold win rate stalls is reward hacking.
ROUND_SIGNALS = ("proxy_reward_policy", "length_policy", "kl")
VERSUS_PREVIOUS = "win_rate_vs_previous"  # the win rate of evaluate stages with baseline: previous


def _versus_previous(row: dict) -> dict:
    """An evaluation against the previous round: its win rate (and interval) as win_rate_vs_previous;
    its other metrics are of the same samples as the evaluation against the start, said there."""
    metrics = {name.replace("win_rate", VERSUS_PREVIOUS): value for name, value in (row.get("metrics") or {}).items()
               if name.startswith("win_rate")}
    return {**row, "metrics": metrics}


def headline_by_round(rows: Iterable[dict], versus_previous: Iterable[str] = (),
                      signals: bool = False) -> dict[int, dict[str, float]]:
    """Round -> {metric: value} for the headline metrics, with their intervals: the win rate (the
    mean of a round's executions reporting one, as seeds; the interval: its own for one, a
    t-interval over them for several), the same for the stages named in `versus_previous`
    (evaluate against the previous round: `win_rate_vs_previous`), and EXRM vs DPORM on each set as
    `reward_comparison` has it (`exrm_acc_id`, `dporm_acc_id`, `diff_acc_id` = DPORM - EXRM, ...);
    with `signals`, also the mean of each of ROUND_SIGNALS. MLflow's chart view draws the parent's
    metrics by round."""
    versus_previous = set(versus_previous)
    table = summary_table(_versus_previous(row) if row["stage"] in versus_previous else row for row in rows)
    order = [*HEADLINE, *ROUND_SIGNALS]
    out: dict[int, dict[str, float]] = {}
    for round_ in sorted(set(table["round"])):
        part = {column: [v for v, r in zip(values, table["round"]) if r == round_] for column, values in table.items()}
        found: dict[str, tuple] = {}
        for rate in ("win_rate", VERSUS_PREVIOUS):
            rates = [(v, lo, hi) for v, lo, hi in zip(*(part.get(c, [None] * len(part["round"]))
                                                        for c in (rate, f"{rate}_ci_low", f"{rate}_ci_high")))
                     if v is not None]
            if rates:
                single = rates[0][1:] if len(rates) == 1 and None not in rates[0][1:] else None
                found[rate] = _mean_interval([r[0] for r in rates], single)
        for entry in reward_comparison(part):
            for reward in REWARDS:
                found[f"{reward}_acc_{entry['set']}"] = entry[reward]
            if "difference" in entry:
                found[f"diff_acc_{entry['set']}"] = entry["difference"]
        for name in ROUND_SIGNALS if signals else ():
            values = [v for v in part.get(name, []) if v is not None]
            if values:
                found[name] = (sum(values) / len(values), None, None)
        metrics = {}
        for name in sorted(found, key=order.index):
            mean, low, high = found[name]
            metrics[name] = mean
            if low is not None:
                metrics[f"{name}_ci_low"], metrics[f"{name}_ci_high"] = low, high
        if metrics:
            out[round_] = metrics
    return out


# ---------------------------------------------------------------- what the plots show
def win_rate_series(rows: Iterable[dict]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Stage name -> [(round, win_rate, ci_low, ci_high)] for every stage execution with a win
    rate (the `evaluate` stages), by round. A missing interval bound is the rate itself."""
    series: dict[str, list] = {}
    for row in rows:
        m = row.get("metrics") or {}
        if "win_rate" not in m:
            continue
        rate = float(m["win_rate"])
        series.setdefault(row["stage"], []).append(
            (int(row["round"]), rate, float(m.get("win_rate_ci_low", rate)), float(m.get("win_rate_ci_high", rate))))
    return {stage: sorted(points) for stage, points in series.items()}


def reward_accuracy_points(rows: Iterable[dict]) -> list[dict]:
    """One entry per stage execution reporting reward accuracies: its label and
    {"exrm_id": (acc, ci_low, ci_high), ...} for the rewards and sets it has."""
    points = []
    for result in reward_results(summary_table(rows)):
        label = result["stage"] + (f" (round {result['round']})" if result["round"] else "")
        label = " ".join(str(x) for x in (result.get("variant"), label) if x) + (
            f" seed {result['seed']}" if result.get("seed") is not None else "")
        values = {f"{result['reward']}_{set_}": (acc, acc if low is None else low, acc if high is None else high)
                  for set_, (acc, low, high) in result["sets"].items()}
        if points and points[-1]["label"] == label:  # an older run's stage that measured both rewards
            points[-1]["values"].update(values)
        else:
            points.append({"label": label, "values": values})
    return points


# ---------------------------------------------------------------- drawing (matplotlib, lazily)
def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _error(value: float, low: float, high: float) -> tuple[float, float]:
    return max(0.0, value - low), max(0.0, high - value)


def draw_win_rate(series: dict[str, list], out: Path, title: str = "Win rate by round (error bars: interval)",
                  dodge: float = 0.0, zoom: bool = False) -> None:
    """One line per series; `dodge` shifts each line's points sideways by that many rounds, so that
    error bars at one round stay apart; `zoom`: the y axis spans the values (variants to tell
    apart), not 0 to 1."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=110)
    try:
        for i, (stage, points) in enumerate(series.items()):
            rounds = [p[0] + dodge * (i - (len(series) - 1) / 2) for p in points]
            rates = [p[1] for p in points]
            errors = list(zip(*(_error(*p[1:]) for p in points)))
            ax.errorbar(rounds, rates, yerr=errors, marker="o", capsize=4, label=stage)
        low, high = 0.0, 1.0
        if zoom:
            found = [v for points in series.values() for p in points for v in p[1:]]
            pad = max(0.01, 0.1 * (max(found) - min(found)))
            low, high = max(0.0, min(found) - pad), min(1.0, max(found) + pad)
        if low <= 0.5 <= high:
            ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="tie with the baseline")
        ax.set_xlabel("round")
        ax.set_ylabel("win rate against the baseline")
        ax.set_ylim(low, high)
        rounds = sorted({p[0] for points in series.values() for p in points})
        ax.set_xticks(rounds)
        if len(rounds) == 1:
            ax.set_xlim(rounds[0] - 1, rounds[0] + 1)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize="small")
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)


def draw_reward_accuracy(points: list[dict], out: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.2, 4.4), dpi=110)
    try:
        # A reward's executions (seeds) side by side; an execution measures one reward (an older
        # run's may hold both).
        per_reward = {reward: [p for p in points if any(k.startswith(f"{reward}_") for k in p["values"])]
                      for reward in REWARDS}
        n = max(map(len, per_reward.values()))
        for r, (reward, colour) in enumerate(zip(REWARDS, ("tab:blue", "tab:orange"))):
            centre = -0.18 if r == 0 else 0.18
            mine = per_reward[reward]
            spread = 0.24 / (len(mine) - 1) if len(mine) > 1 else 0.0
            xs, ys, lows, highs, labelled = [], [], [], [], False
            for s, set_ in enumerate(SETS):
                accs = []
                for i, point in enumerate(mine):
                    value = point["values"].get(f"{reward}_{set_}")
                    if value is None:
                        continue
                    xs.append(s + centre + (i - (len(mine) - 1) / 2) * spread)
                    ys.append(value[0])
                    low, high = _error(*value)
                    lows.append(low)
                    highs.append(high)
                    accs.append(value[0])
                if len(accs) > 1:  # the mean over executions (seeds), as a short bar
                    mean = sum(accs) / len(accs)
                    ax.hlines(mean, s + centre - 0.15, s + centre + 0.15, colors=colour, linewidth=2.5,
                              label=None if labelled else f"{reward.upper()} mean")
                    labelled = True
            if xs:
                ax.errorbar(xs, ys, yerr=[lows, highs], fmt="o", color=colour, capsize=3, markersize=5,
                            label=REWARD_LABELS[reward])
        ax.axhline(0.5, color="grey", linestyle="--", linewidth=1, label="chance")
        ax.set_xticks(range(len(SETS)))
        ax.set_xticklabels(["in distribution", "prompt shift", "response shift"])
        ax.set_xlim(-0.6, len(SETS) - 0.4)
        ax.set_ylim(0, 1)
        ax.set_ylabel("preference accuracy")
        runs = f"{n} run{'s' if n != 1 else ''} (seeds) each"
        ax.set_title(f"Reward accuracy: EXRM vs DPORM ({runs}; bars: interval)")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(loc="lower left", fontsize="small")
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)


PLOTS: tuple[tuple[str, Callable[[list[dict]], object], Callable], ...] = (
    ("win_rate", win_rate_series, draw_win_rate),
    ("reward_accuracy", reward_accuracy_points, draw_reward_accuracy),
)


def _code_version() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:16]


def plot(name: str, data, draw: Callable, cache_dir: Path) -> Path:
    """The PNG of `data` drawn by `draw`, from `cache_dir` if drawn before (same data, same code)."""
    digest = hashlib.sha256(json.dumps([name, data, _code_version()], sort_keys=True, default=list)
                            .encode()).hexdigest()[:24]
    final = cache_dir / digest / f"{name}.png"
    if final.is_file() and final.stat().st_size > 0:
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=final.parent, prefix=f".{name}-", suffix=".png")
    os.close(fd)
    try:
        draw(data, Path(tmp))
        os.replace(tmp, final)  # whole or absent, also with two runs drawing at once
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return final


def plots(rows: list[dict], cache_dir: Path) -> dict[str, Path]:
    """Plot name -> PNG file, for each plot whose metrics the rows have (a sweep's: by variant)."""
    made = {}
    for name, extract, draw in SWEEP_PLOTS if any("variant" in row for row in rows) else PLOTS:
        data = extract(rows)
        if data:
            made[name] = plot(name, data, draw, cache_dir)
    return made


# ---------------------------------------------------------------- logging it
def log_report(tracker, run_id: str, rows: list[dict], cache_dir: str | Path | None = None) -> None:
    """Log the summary table and the plots on the parent run. A report that fails to build is a
    warning, never a failed pipeline: the stages and their runs are already recorded."""
    from flows import console as term

    try:
        tracker.log_table(run_id, summary_table(rows), SUMMARY_FILE)
        with tempfile.TemporaryDirectory(prefix="alignflow-report-") as scratch:
            for name, png in plots(rows, Path(cache_dir or scratch)).items():
                tracker.log_file(run_id, png, "plots")
    except Exception as exc:  # noqa: BLE001 - reported, and the run stays a success
        term.console.print(f"[yellow]warning:[/] the run's report (summary table, plots) was not logged: {exc!r}")


# ---------------------------------------------------------------- reading it back (alignflow compare)
PARENT_FILTER = "tags.`alignflow.spec_hash` LIKE '%'"  # parent runs carry it; stage runs do not


class NotFound(LookupError):
    """No such experiment or run in the tracking store (the message says which, and what exists)."""


def find_parent_run(client, experiment: str | None = None, run_id: str | None = None):
    """The parent run to report: `run_id` (a stage run's id gives its parent), else the latest
    parent run of `experiment`, else the latest parent run in the whole store."""
    from mlflow.exceptions import MlflowException

    if run_id:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise NotFound(f"no run '{run_id}' in the tracking store") from None
        parent_id = run.data.tags.get("mlflow.parentRunId")
        if parent_id and "alignflow.variant" not in run.data.tags:  # a sweep's variant is a pipeline run too
            run = client.get_run(parent_id)
        if experiment is not None:
            found = client.get_experiment_by_name(experiment)
            if found is None or found.experiment_id != run.info.experiment_id:
                raise NotFound(f"run '{run_id}' is not in experiment '{experiment}'")
        return run
    if experiment is not None:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            from flows.errors import did_you_mean

            names = [e.name for e in client.search_experiments()]
            hint = did_you_mean(experiment, names) or (f"; experiments: {', '.join(sorted(names))}" if names else
                                                       "; the store has no experiments")
            raise NotFound(f"no experiment named '{experiment}'{hint}")
        ids = [found.experiment_id]
    else:
        ids = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(ids, filter_string=PARENT_FILTER, order_by=["attribute.start_time DESC"],
                              max_results=1) if ids else []
    if not runs:
        raise NotFound(f"no alignflow run in experiment '{experiment}'" if experiment else
                       "no alignflow run in the tracking store")
    return runs[0]


def read_summary(client, run) -> dict[str, list]:
    """The run's summary table: its `summary.json`, or, for a run without one (it failed, or
    predates it), rebuilt from its stage runs' tags and metrics."""
    if SUMMARY_FILE in [a.path for a in client.list_artifacts(run.info.run_id)]:
        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(run.info.run_id, SUMMARY_FILE, tmp)
            return parse_table(Path(path).read_text())
    def children(run_id: str) -> list:
        return client.search_runs([run.info.experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{run_id}'",
                                  order_by=["attribute.start_time ASC"], max_results=5000)

    def stage_rows(run_id: str, **variant) -> list[dict]:
        rows = [{**variant, "stage": r.data.tags.get("alignflow.stage", r.info.run_name),
                 "round": int(r.data.tags.get("alignflow.round", 0)),
                 "cache": r.data.tags.get("alignflow.cache", r.info.status.lower()),
                 **{c: r.data.tags[f"alignflow.{c}"] for c in LABEL_COLUMNS if f"alignflow.{c}" in r.data.tags},
                 "metrics": r.data.metrics} for r in children(run_id)]
        return sorted(rows, key=lambda row: row["round"])  # stable: creation order within a round

    if "alignflow.sweep" not in run.data.tags:
        return summary_table(stage_rows(run.info.run_id))
    seed = lambda tags: int(tags["alignflow.seed"]) if "alignflow.seed" in tags else None  # noqa: E731
    return summary_table([row for v in children(run.info.run_id) for row in stage_rows(
        v.info.run_id, variant=v.data.tags.get("alignflow.variant_group", ""), seed=seed(v.data.tags))])


def select_columns(table: dict[str, list], patterns: list[str]) -> dict[str, list]:
    """The base columns and the metric columns matching any glob pattern (all when none given)."""
    from fnmatch import fnmatchcase

    if not patterns:
        return table
    def wanted(column: str) -> bool:
        base = column.removesuffix("_ci_low").removesuffix("_ci_high")  # an interval goes with its metric
        return any(fnmatchcase(column, p) or fnmatchcase(base, p) for p in patterns)

    return {c: v for c, v in table.items() if c in (*SWEEP_COLUMNS, *BASE_COLUMNS, *LABEL_COLUMNS) or wanted(c)}


# ---------------------------------------------------------------- alignflow compare: the default view
# What a person looks at first; `--all` shows every column. The accuracies go to the EXRM vs DPORM
# table (one row per set), so the per-stage table stays within a 120-column terminal.
HEADLINE_COLUMNS = ("win_rate", "loss")
SET_LABELS = {"id": "in distribution", "prompt_shift": "prompt shift", "response_shift": "response shift"}


def headline_columns(table: dict[str, list]) -> dict[str, list]:
    """The base columns, the win rate (with its interval) and the final training loss."""
    return select_columns(table, list(HEADLINE_COLUMNS)) if table else table


def _mean_interval(values: list[float], single: tuple[float, float] | None = None,
                   bounds: tuple[float, float] = (0.0, 1.0)) -> tuple[float, float | None, float | None]:
    """Mean and 95% t-interval over executions (seeds), clipped to `bounds`; for one execution,
    `single` (its own interval) or none."""
    import statistics

    n = len(values)
    mean = sum(values) / n
    if n == 1:
        return (mean, *single) if single else (mean, None, None)
    from scipy import stats

    half = stats.t.ppf(0.975, n - 1) * statistics.stdev(values) / n ** 0.5
    return mean, max(bounds[0], mean - half), min(bounds[1], mean + half)


def reward_results(table: dict[str, list]) -> list[dict]:
    """Every reward accuracy in a summary table, one entry per stage execution and reward, in
    table order: {"stage", "round", "reward", "pair", "sets": {set: (acc, low, high)}}.

    A reward_accuracy run logs `acc_<set>` (with `_ci_low` / `_ci_high`) and says which reward in
    the table's `reward` column (its run's tag `alignflow.reward`); runs of older versions logged
    `<reward>_acc_<set>`, both rewards in one run. `pair` matches an EXRM execution with its DPORM
    one: the stage's name without its "exrm"/"dporm" part (`exrm_acc_s1` with `dporm_acc_s1`; an
    older stage that measured both pairs with itself), its round and (a sweep's) seed."""
    import re

    def measured(row: dict, prefix: str) -> dict[str, tuple]:
        return {set_: (float(row[f"{prefix}{set_}"]),
                       *(None if row.get(f"{prefix}{set_}{end}") is None else float(row[f"{prefix}{set_}{end}"])
                         for end in ("_ci_low", "_ci_high")))
                for set_ in SETS if row.get(f"{prefix}{set_}") is not None}

    out = []
    for row in table_rows(table):
        pair = (re.sub(r"_?(exrm|dporm)_?", "_", str(row["stage"])).strip("_"), int(row["round"]), row.get("seed"))
        for reward in REWARDS:
            sets = measured(row, "acc_" if row.get("reward") == reward else f"{reward}_acc_")
            if sets:
                out.append({"stage": row["stage"], "round": int(row["round"]), "reward": reward, "pair": pair,
                            "sets": sets, "variant": row.get("variant"), "seed": row.get("seed")})
    return out


def reward_comparison(table: dict[str, list]) -> list[dict]:
    """EXRM against DPORM, one entry per set that both were measured on:
    {"set", "n", "exrm": (mean, low, high), "dporm": (...), "difference": (mean, low, high)}.

    Executions pair up as `reward_results` says (by seed). With several pairs: the mean over them,
    and a 95% t-interval over them (the paired differences for the difference); with one: its
    accuracies' own intervals, and no interval on the difference."""
    results = reward_results(table)
    out = []
    for set_ in SETS:
        found = {reward: {r["pair"]: r["sets"][set_] for r in results if r["reward"] == reward and set_ in r["sets"]}
                 for reward in REWARDS}
        if not all(found.values()):
            continue
        keys = [k for k in found["exrm"] if k in found["dporm"]]
        entry = {"set": set_, "n": len(keys)}
        for reward in REWARDS:
            values = [found[reward][k][0] for k in keys] or [v[0] for v in found[reward].values()]
            only = list(found[reward].values())[0]
            single = only[1:] if len(values) == 1 and None not in only[1:] else None
            entry[reward] = _mean_interval(values, single)
        if keys:
            entry["difference"] = _mean_interval([found["dporm"][k][0] - found["exrm"][k][0] for k in keys],
                                                 bounds=(-1.0, 1.0))
        out.append(entry)
    return out


def format_interval(value: tuple, signed: bool = False) -> str:
    """`0.620 [0.550, 0.690]` (three decimals, as every number `compare` prints), `+0.168 [...]`
    for a difference."""
    mean, low, high = value
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(mean)} [{f.format(low)}, {f.format(high)}]" if low is not None else f.format(mean)


def zero_width(value: tuple) -> bool:
    """An interval over several seeds that all gave the same value: a t-interval of width zero,
    which says that the seeds agree, not that the value is exact."""
    _, low, high = value
    return low is not None and high - low < 5e-4


def format_value(value) -> str:
    """Three decimals for a metric (a rate, an accuracy, a loss), whole numbers as integers (counts),
    large and tiny ones in four significant digits."""
    if value is None or (isinstance(value, float) and value != value):  # None or NaN: no such metric
        return ""
    if isinstance(value, float):
        if value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return f"{value:.3f}" if 1e-3 <= abs(value) < 1e4 else f"{value:.4g}"
    return str(value)


def display_columns(table: dict[str, list]) -> dict[str, list[str]]:
    """The table as text for a terminal: a metric's interval folded into its cell
    (`win_rate`, `win_rate_ci_low`, `win_rate_ci_high` -> win_rate "0.620 [0.550, 0.690]")."""
    shown: dict[str, list[str]] = {}
    for column, values in table.items():
        base = column.removesuffix("_ci_low").removesuffix("_ci_high")
        if base != column and base in table:
            continue  # shown with its metric
        low, high = table.get(f"{column}_ci_low"), table.get(f"{column}_ci_high")
        if column in (*SWEEP_COLUMNS, *BASE_COLUMNS, *LABEL_COLUMNS) or low is None or high is None:
            shown[column] = [format_value(v) for v in values]
        else:
            shown[column] = [format_interval((v, lo, hi)) if all(map(format_value, (v, lo, hi))) else format_value(v)
                             for v, lo, hi in zip(values, low, high)]
    return shown


# ---------------------------------------------------------------- a sweep: variants by round
def sweep_metrics(table: dict[str, list], patterns: list[str] = ()) -> list[str]:
    """The metrics a sweep is compared on: those matching `patterns`; by default the win rate, or
    where there is none and no EXRM vs DPORM accuracies (their own table), the sweep's first metric."""
    from fnmatch import fnmatchcase

    metrics = [c for c in table if c not in (*SWEEP_COLUMNS, *BASE_COLUMNS, *LABEL_COLUMNS)
               and not c.endswith(("_ci_low", "_ci_high"))
               and any(v is not None for v in table[c])]
    if patterns:
        return [m for m in metrics if any(fnmatchcase(m, p) for p in patterns)]
    if "win_rate" in metrics:
        return ["win_rate"]
    if reward_results(table):  # EXRM vs DPORM accuracies: compared in their own table
        return []
    return metrics[:1]


def sweep_comparison(table: dict[str, list], metric: str) -> list[dict]:
    """`metric` by variant and round, one entry per variant (its seeds together), in sweep order:
    {"variant", "seeds": n, "rounds": {round: (mean, low, high)}, "difference": {round: (mean, low,
    high)}}. A seed's value in a round is the mean of the round's executions reporting it. With
    several seeds: the mean over seeds and a 95% t-interval over them; with one, the execution's
    own interval (`<metric>_ci_low/_high`). "difference" (every variant but the first): minus the
    first variant, paired by seed, with a t-interval over the paired differences (none with one
    seed)."""
    rate = metric in HEADLINE  # a rate or an accuracy: intervals stay in [0, 1]
    bounds, spread = ((0.0, 1.0), (-1.0, 1.0)) if rate else ((-math.inf, math.inf), (-math.inf, math.inf))
    values: dict[str, dict[int, dict]] = {}  # variant -> round -> seed -> [(value, low, high)]
    for row in table_rows(table):
        if row.get(metric) is None:
            continue
        cell = values.setdefault(row.get("variant") or "", {}).setdefault(int(row["round"]), {})
        value = (row[metric], row.get(f"{metric}_ci_low"), row.get(f"{metric}_ci_high"))
        cell.setdefault(row.get("seed"), []).append(value)
    order = list(dict.fromkeys(v or "" for v in table.get("variant", [])))

    def by_seed(cells: dict) -> dict:
        return {seed: sum(c[0] for c in found) / len(found) for seed, found in cells.items()}

    out, first = [], None
    for variant in [v for v in order if v in values]:
        seeds = max(len(cells) for cells in values[variant].values())
        entry = {"variant": variant, "seeds": seeds, "rounds": {}, "difference": {}}
        for round_, cells in sorted(values[variant].items()):
            means = by_seed(cells)
            only = next(iter(cells.values()))
            single = only[0][1:] if len(cells) == 1 and len(only) == 1 and None not in only[0][1:] else None
            entry["rounds"][round_] = _mean_interval(list(means.values()), single, bounds)
            if first is not None and round_ in values[first]:
                base = by_seed(values[first][round_])
                paired = [means[s] - base[s] for s in means if s in base]
                if paired:
                    entry["difference"][round_] = _mean_interval(paired, bounds=spread)
        first = variant if first is None else first
        out.append(entry)
    return out


def variant_name(group: str) -> str:
    """A variant (its seeds together) as tables and plots name it; "" is the spec as written (only
    its seeds vary)."""
    return group or "as written"


def sweep_win_rate_series(rows: Iterable[dict]) -> dict[str, list[tuple[int, float, float, float]]]:
    """Variant -> [(round, win rate, low, high)]: the compare table's numbers (mean over seeds and
    their interval), one line per variant."""
    table = summary_table(rows)
    if "win_rate" not in table:
        return {}
    return {variant_name(entry["variant"]): [(r, m, m if lo is None else lo, m if hi is None else hi)
                                               for r, (m, lo, hi) in entry["rounds"].items()]
            for entry in sweep_comparison(table, "win_rate")}


def draw_sweep_win_rate(series: dict[str, list], out: Path) -> None:
    draw_win_rate(series, out, "Win rate by round, by variant (error bars: 95% interval)", dodge=0.06, zoom=True)


SWEEP_PLOTS: tuple[tuple[str, Callable[[list[dict]], object], Callable], ...] = (
    ("win_rate", sweep_win_rate_series, draw_sweep_win_rate),
    ("reward_accuracy", reward_accuracy_points, draw_reward_accuracy),
)
