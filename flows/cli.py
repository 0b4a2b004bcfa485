"""The `alignflow` command: run, plan, export, serve, server, compare, ui.

Exit codes: 0 success; 2 a bad spec, option or input (nothing written); 1 a failure while running.
Heavy imports (prefect, mlflow, torch) happen only in the commands that need them.
"""
from __future__ import annotations

import os
import sys
import time
from typing import List, Optional

import typer
from rich.markup import escape

from flows import timings
from flows.console import console
from flows.errors import Problem, SpecError, StageFailed, did_you_mean
from flows.home import configure_environment, mlflow_artifact_root, quiet_telemetry, store_root, tracking_uri
from tasks.base import BadInput

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative preference-alignment pipelines on Prefect and MLflow.")

SET_HELP = "Override a spec value: dotted.key=value (value parsed as YAML). Repeatable."
SWEEP_HELP = ("Sweep a spec value over a list: dotted.key=V1,V2,... (values parsed as YAML); with several, "
              "every combination runs. Repeatable; adds to (or replaces a key of) the spec's `sweep:`.")
SEEDS_HELP = "Run every variant with this many seeds (the spec's seed, +1, ...); sets the spec's `seeds:` count."


def _load(spec: str, overrides: list[str], rounds: int | None, force: list[str] = (), sweep: list[str] = (),
          seeds: int | None = None):
    """The spec's variants (flows/sweep.py; a plain spec is one), checked and resolved."""
    from flows.sweep import expand

    expanded = expand(spec, overrides, rounds, sweep, seeds)
    loaded = expanded.spec
    for name in force:
        if name not in loaded.nodes:
            raise SpecError(Problem(spec, f"--force {name}", f"no stage named '{name}'{did_you_mean(name, loaded.nodes)}"))
    _check_store(spec, loaded.store)
    return expanded


def _check_store(spec: str, store: str | None) -> None:
    """A store that cannot be used (a protocol not installed, an unreachable bucket, a folder
    that is not alignflow's) is a spec error, found before anything runs or is written."""
    from flows.store import Store, StoreUnavailable

    root = store_root(store)
    try:
        problem = Store(root).unavailable()
    except StoreUnavailable as err:
        problem = str(err)
    if problem:
        raise SpecError(Problem(spec, "store", f"{root}: {problem}"))


def _spec_store(spec: str) -> tuple[str, str]:
    """A spec's experiment name and tracking URI (exit 2 on a bad spec)."""
    from flows.spec import load_spec

    try:
        loaded = load_spec(spec)
    except SpecError as err:
        _fail_spec(err)
    return loaded.name, tracking_uri(loaded.tracking_uri)


def _fail_spec(err: SpecError) -> None:
    for problem in err.problems:
        console.print(f"[red]error:[/] {escape(str(problem))}", markup=True, highlight=False, soft_wrap=True)
    raise typer.Exit(2)


@app.command()
def run(
    spec: str = typer.Argument(..., help="Path to the pipeline spec (YAML)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    force: List[str] = typer.Option([], "--force", help="Recompute this stage and everything downstream."),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=0, help="Number of rounds (overrides rounds.count)."),
    sweep: List[str] = typer.Option([], "--sweep", help=SWEEP_HELP),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help=SEEDS_HELP),
):
    """Run a pipeline: every stage whose artifact is not already in the store. A sweep runs every
    variant in one flow run, each stage key once.

    Ctrl-C (SIGINT), SIGTERM or SIGHUP stops it within seconds: stages computing are cancelled,
    uncommitted, finished stages are kept (exit 130, 143, 129); a second Ctrl-C stops at once."""
    from flows import stopping

    context: dict = {}  # what _run has set up so far, to say where a full disk was met
    with stopping.signal_handlers():
        try:
            _run(spec, set_, force, rounds, sweep, seeds, context)
        except (typer.Exit, SystemExit):
            raise
        except BaseException as err:
            _exit_on_known_failure(err, context)
            raise


def _exit_on_known_failure(err: BaseException, context: dict) -> None:
    """Whatever raised it: a damaged MLflow database is exit 2, naming it and how to recover; a
    full disk is one line, `no space left on device: <path>`, exit 1."""
    from pathlib import Path

    from flows.full_disk import no_space_at
    from flows.tracking import DamagedDatabase

    cause = err
    while cause is not None and not isinstance(cause, DamagedDatabase):
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "cause", None)
    if cause is not None:
        console.print(f"[red]error:[/] {escape(str(cause))}", soft_wrap=True)
        raise typer.Exit(2)
    uri = context.get("tracking_uri", "")
    server = context.get("server")
    prefect_home = Path(os.environ.get("PREFECT_HOME", "~/.prefect")).expanduser()
    path = no_space_at(err, server.stderr_tail if server else (),
                       mlflow_db=Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None,
                       prefect_db=prefect_home / "prefect.db" if server else None,
                       places=[p for p in (context.get("store"), prefect_home) if p])
    if path is not None:
        console.print(f"[red]error:[/] no space left on device: {escape(str(path))}", soft_wrap=True)
        raise typer.Exit(1)


def _run(spec: str, set_: list[str], force: list[str], rounds: int | None, sweep: list[str], seeds: int | None,
         context: dict) -> None:
    from pathlib import Path

    from flows import stopping
    from flows.errors import SweepFailed
    from flows.inputs import check_local_inputs

    started = time.time()

    def phase(text: str) -> None:  # a line as each phase of the start begins: never a silent minute
        console.print(f"[dim]{time.time() - started:5.1f}s[/] {text}", highlight=False)

    phase(f"{escape(spec)}: checking the spec, its data files and its stages' keys")
    try:
        with timings.phase("spec and keys"):
            expanded = _load(spec, set_, rounds, force, sweep, seeds)
            loaded, nodes = expanded.spec, expanded.unique()
            check_local_inputs(nodes, store_root(loaded.store))  # a bad data file: exit 2 before anything is written
    except SpecError as err:
        _fail_spec(err)
    context.update(tracking_uri=tracking_uri(loaded.tracking_uri), store=Path(store_root(loaded.store)))
    configure_environment()
    from flows.prefect_server import start_if_needed

    server = context["server"] = start_if_needed()  # boots in parallel with the imports and MLflow set-up below
    phase(("starting a temporary Prefect server; " if server is not None else "") + "loading Prefect and MLflow")
    with timings.phase("imports"):
        from flows.pipeline import pipeline
        from flows.tracking import get_tracker, quiet_mlflow

        quiet_mlflow()
    uri = tracking_uri(loaded.tracking_uri)
    phase(f"opening MLflow ({escape(uri)})")
    with timings.phase("mlflow open"):
        get_tracker(uri, loaded.name)
    if server is not None:
        phase("waiting for the Prefect server")
        with timings.phase("prefect wait"):
            server.wait_ready()
    executions = sum(len(v.nodes) for v in expanded.variants)
    variants = f"sweep of {len(expanded.variants)} variants, " if expanded.is_sweep else ""
    unique = f" ({len(nodes)} unique)" if expanded.is_sweep else ""
    console.print(f"[bold]{loaded.name}[/]: {variants}{executions} stage executions{unique}, "
                  f"store {store_root(loaded.store)}")
    phase("running the stages")
    failed = None
    try:
        if stopping.requested():
            raise stopping.Stopped(stopping.requested())
        with timings.phase("flow"):
            result = pipeline(spec, list(set_), rounds, list(force), list(sweep), seeds)
    except stopping.Stopped as stopped:
        stopping.report(stopped.request)
        raise typer.Exit(stopped.request.exit_code)
    except SweepFailed as err:  # the other variants finished: report them, then the failures
        result, failed = err.result, err
    except StageFailed as err:
        import traceback

        _exit_on_known_failure(err, context)
        console.print("".join(traceback.format_exception(err.cause)).rstrip(), style="dim", markup=False)
        console.print(f"[red]error:[/] {escape(str(err))}")
        console.print("Finished stages are kept; `alignflow run` again resumes from them.")
        raise typer.Exit(1)
    except BadInput as err:  # the user's data, found malformed while running
        console.print(f"[red]error:[/] {escape(str(err))}")
        raise typer.Exit(2)
    except BaseException:
        request = stopping.requested()
        if request is None or request.error is not None:
            raise
        stopping.report(request)  # stopping: whatever the flow raised on its way out is fallout
        raise typer.Exit(request.exit_code)
    ran = sum(s["cache"] == "miss" for s in result["stages"])
    stages = len(result["stages"])
    timings.write(stages=stages, per_stage=round(timings.PHASES["flow"] / max(1, stages), 4), ran=ran,
                  ran_seconds=round(sum(s["seconds"] for s in result["stages"] if s["cache"] == "miss"), 3))
    what = f" (stage keys; {executions} stage executions in {len(expanded.variants)} variants)" if expanded.is_sweep \
        else ""
    console.print(f"done in {time.time() - started:.1f}s: {ran} ran, {len(result['stages']) - ran} cached{what}; "
                  f"MLflow {tracking_uri(loaded.tracking_uri)} (run {result['parent_run_id']})")
    for variant in result.get("variants", []):
        shown = "; ".join(f"round {r}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items()
                                                     if not k.endswith(("_ci_low", "_ci_high")))
                          for r, metrics in variant["headline"].items())
        state = "[red]failed[/]" if variant["failed"] else (shown or "finished")
        console.print(f"  {escape(variant['label'])}: {state}", highlight=False, soft_wrap=True)
    _print_headline(result.get("headline") or {}, result.get("summary", result["stages"]))
    import shlex

    program, make = program_hint()
    if make:
        given = "" if os.path.normpath(spec) == os.path.join("pipelines", "demo.yaml") else f" SPEC={shlex.quote(spec)}"
        make = f" (or: make compare{given}, make ui{given})"
    console.print(f"look further{make or ''}:\n  {program} compare {shlex.quote(spec)}\n  {program} ui {shlex.quote(spec)}",
                  highlight=False, soft_wrap=True, markup=False)

    if failed is not None:
        import traceback

        for cause in {id(e): e for _, e in failed.failures}.values():  # a shared stage's failure once
            console.print("".join(traceback.format_exception(cause.cause)).rstrip(), style="dim", markup=False)
        console.print(f"[red]error:[/] {len(failed.failures)} of {len(result['variants'])} variants failed:")
        for label, err in failed.failures:
            console.print(f"  {escape(label)}: {escape(str(err))}", highlight=False, soft_wrap=True)
        console.print("Finished stages are kept; `alignflow run` again resumes from them.")
        raise typer.Exit(1)


def _print_headline(headline: dict[int, dict[str, float]], stages: list[dict]) -> None:
    """The end of a run: the win rate by round, and EXRM against DPORM by set (compare's table)."""
    from flows.report import format_interval, reward_comparison, summary_table

    for name, against in (("win_rate", "the baseline"), ("win_rate_vs_previous", "the previous round")):
        rates = {r: (m[name], m.get(f"{name}_ci_low"), m.get(f"{name}_ci_high")) for r, m in headline.items() if name in m}
        if rates:
            console.print(f"win rate against {against} [95% interval; a round's seeds: their mean, a t-interval]:",
                          markup=False)
            for round_, value in rates.items():
                console.print(f"  {'round ' + str(round_) if round_ else 'win_rate':<9} {format_interval(value)}",
                              markup=False)
    comparison = reward_comparison(summary_table(stages))
    if comparison:  # at compare's width: in a log or a narrow terminal too, no number cut
        from rich.console import Console

        Console(stderr=True, width=120, soft_wrap=True).print(versus_table(comparison))


def program_hint() -> tuple[str, bool]:
    """How to type this program again: `alignflow` where PATH finds this one, else its path as
    typed from here (`.venv/bin/alignflow`: `make demo` runs it without activating the venv); and
    whether this folder's Makefile has the `compare` and `ui` targets that run it."""
    import shutil
    from pathlib import Path

    me = Path(sys.argv[0])
    if me.name != "alignflow":  # `python -m flows.cli`
        return f"{Path(sys.executable).name} -m flows.cli", False
    found = shutil.which("alignflow")
    if found and Path(found).resolve() == me.resolve():
        return "alignflow", False
    try:
        shown = str(me.absolute().relative_to(Path.cwd()))
    except ValueError:
        shown = str(me.absolute())
    makefile = Path("Makefile")
    make = makefile.is_file() and "\nui:" in makefile.read_text(errors="replace")
    return shown, make


@app.command()
def plan(
    spec: str = typer.Argument(..., help="Path to the pipeline spec (YAML)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    rounds: Optional[int] = typer.Option(None, "--rounds", min=0),
    sweep: List[str] = typer.Option([], "--sweep", help=SWEEP_HELP),
    seeds: Optional[int] = typer.Option(None, "--seeds", min=1, help=SEEDS_HELP),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per row, for scripts."),
):
    """Show every stage of every round as fresh, stale or missing, and why. Runs nothing. For a
    sweep: each variant's counts, and how many stages are to compute in all."""
    from rich.table import Table

    from flows.plan import plan as make_plan
    from flows.store import Store

    try:
        expanded = _load(spec, set_, rounds, (), sweep, seeds)
    except SpecError as err:
        _fail_spec(err)
    loaded, store = expanded.spec, Store(store_root(expanded.spec.store))
    plans = [(v, make_plan(v.recipes, v.nodes, store)) for v in expanded.variants]
    if as_json:
        import json

        for variant, rows in plans:
            for row in rows:
                print(json.dumps({**({"variant": variant.label} if expanded.is_sweep else {}),
                                  "stage": row.node.name, "round": row.node.round, "kind": row.node.kind,
                                  "status": row.status, "key": row.node.key, "reason": row.reason}))
        return
    from rich.console import Console

    if expanded.is_sweep:
        table = Table(title=f"{loaded.name}: plan of a sweep of {len(plans)} variants")
        for column in ("variant", "stage executions", "fresh", "stale", "missing"):
            table.add_column(column, justify="left" if column == "variant" else "right")
        for variant, rows in plans:
            counts = [sum(r.status == status for r in rows) for status in ("fresh", "stale", "missing")]
            table.add_row(escape(variant.label), str(len(rows)), *map(str, counts))
        screen = Console(width=max(120, console.width), soft_wrap=True)
        screen.print(table)
        todo = {r.node.key for _, rows in plans for r in rows if r.status != "fresh"}
        executions = sum(len(rows) for _, rows in plans)
        screen.print(f"{len(todo)} unique stage executions to compute in all, of {len(expanded.unique())} stage keys "
                      f"({executions} stage executions in the variants); `--json` lists each with its reason.")
        return
    rows = plans[0][1]
    table = Table(title=f"{loaded.name}: plan", show_lines=False)
    for column in ("round", "stage", "kind", "status", "key", "reason"):
        table.add_column(column, overflow="fold")
    colour = {"fresh": "green", "stale": "yellow", "missing": "red"}
    for row in rows:
        table.add_row(str(row.node.round), row.node.name, row.node.kind,
                      f"[{colour[row.status]}]{row.status}[/]", row.node.key[:12], row.reason)

    Console(width=max(160, console.width), soft_wrap=True).print(table)


@app.command()
def export(
    spec: str = typer.Argument(..., help="Path to the pipeline spec (YAML)."),
    stage: str = typer.Argument(..., help="The stage (or model) whose model to export."),
    out: str = typer.Argument(..., metavar="DIR", help="The folder to write (from_pretrained loads it)."),
    round_: Optional[int] = typer.Option(None, "--round", min=0, help="Which round (default: the last)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace DIR if it exists."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Write a stage's trained model as a folder AutoModelForCausalLM (a reward model:
    AutoModelForSequenceClassification) .from_pretrained loads, with its tokenizer, LoRA merged."""
    from flows.export import export as export_stage

    try:
        folder = export_stage(spec, stage, out, round_, overwrite, list(set_))
    except SpecError as err:
        _fail_spec(err)
    console.print(f"exported {stage} to {folder}")


@app.command()
def serve(
    spec: str = typer.Argument(..., help="Path to the pipeline spec (YAML)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    cron: Optional[str] = typer.Option(None, "--cron", help="A cron expression, e.g. '0 2 * * *' (02:00 daily)."),
    interval: Optional[float] = typer.Option(None, "--interval", help="Seconds between runs."),
):
    """Schedule a pipeline on a Prefect server; each run adds rounds by the spec's rounds.serve rule."""
    import urllib.request

    if (cron is None) == (interval is None):
        console.print("[red]error:[/] serve: give exactly one of --cron EXPR and --interval SECONDS")
        raise typer.Exit(2)
    if interval is not None and interval <= 0:
        console.print(f"[red]error:[/] serve: --interval: expected a positive number of seconds, got {interval}")
        raise typer.Exit(2)
    try:
        loaded = _load(spec, set_, None).spec
    except SpecError as err:
        _fail_spec(err)
    api = os.environ.get("PREFECT_API_URL")
    if not api:
        console.print(
            "[red]error:[/] serve: no Prefect server configured (PREFECT_API_URL is not set). Schedules need a "
            "server: its scheduler creates the runs, which the temporary API that `alignflow run` starts cannot. "
            "Start one with `alignflow server` in another terminal, then "
            "`export PREFECT_API_URL=http://127.0.0.1:4200/api`."
        )
        raise typer.Exit(2)
    try:
        urllib.request.urlopen(f"{api.rstrip('/')}/health", timeout=10).close()
    except OSError as err:
        console.print(f"[red]error:[/] serve: no Prefect server answers at PREFECT_API_URL={api} ({err}); "
                      "start one with `alignflow server`, or fix the URL")
        raise typer.Exit(2)
    configure_environment()
    if cron is not None:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=cron)
        except ValueError:
            console.print(f"[red]error:[/] serve: --cron: {cron!r} is not a cron expression (e.g. '0 2 * * *')")
            raise typer.Exit(2)
    from flows.serve import serve as serve_spec

    when = f"cron '{cron}'" if cron else f"every {interval:g}s"
    rule = loaded.rounds.serve
    console.print(f"[bold]{loaded.name}[/]: serving on {api}, {when}; each run adds {rule.add} round(s) up to "
                  f"{loaded.rounds.serve_max}. Ctrl+C stops it.")
    serve_spec(os.path.abspath(spec), list(set_), cron, interval)


@app.command()
def server(
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(4200, help="Port to listen on."),
    ui: bool = typer.Option(True, "--ui/--no-ui", help="Serve Prefect's web UI too."),
):
    """Start a local Prefect server (what `alignflow serve` needs), its database under ALIGNFLOW_HOME."""
    import subprocess

    os.environ.setdefault("PREFECT_UI_ENABLED", "true" if ui else "false")
    configure_environment()
    os.environ.pop("PREFECT_LOGGING_LEVEL", None)  # configure_environment quiets Prefect; a server should talk
    console.print(f"Prefect server on http://{host}:{port} (home {os.environ['PREFECT_HOME']}). In another terminal:\n"
                  f"  export PREFECT_API_URL=http://{host}:{port}/api\n  alignflow serve SPEC --cron '0 2 * * *'")
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", host, "--port", str(port),
               "--ui" if ui else "--no-ui"]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    raise typer.Exit(subprocess.call(command, env=env))


@app.command()
def compare(
    experiment: Optional[str] = typer.Argument(
        None, help="An experiment name, or a spec file (its name and tracking store). "
                   "Default: the experiment of the most recent run in the tracking store."),
    run_id: Optional[str] = typer.Option(None, "--run", help="Show this parent run (or a stage run's parent) "
                                                             "instead of the latest."),
    metric: List[str] = typer.Option([], "--metric", "-m", help="Only metric columns matching this glob "
                                                                "(e.g. 'win_rate*'). Repeatable."),
    all_: bool = typer.Option(False, "--all", help="Every metric column (default: the headline ones, "
                                                   "to fit a 120-column terminal)."),
):
    """Print a run's summary: one row per stage execution (stage, round, cache, the win rate and final
    loss; --all: every metric), and, when the run measured both rewards, EXRM against DPORM per set."""
    from pathlib import Path

    uri = tracking_uri(None)
    if experiment and (experiment.endswith((".yaml", ".yml")) or Path(experiment).is_file()):
        experiment, uri = _spec_store(experiment)
    if uri.startswith("sqlite:") and not Path(uri.removeprefix("sqlite:///")).is_file():
        console.print(f"[red]error:[/] no tracking store at {uri}: nothing has run here yet "
                      "(set ALIGNFLOW_HOME or MLFLOW_TRACKING_URI, or name a spec)")
        raise typer.Exit(2)
    quiet_telemetry()  # reading only: no folders made, no phoning home
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from flows.report import (BASE_COLUMNS, LABEL_COLUMNS, NotFound, display_columns, find_parent_run,
                              headline_columns, read_summary, reward_comparison, select_columns)
    from flows.tracking import DamagedDatabase, open_local_store, quiet_mlflow

    try:
        open_local_store(uri)
    except DamagedDatabase as err:
        console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2)
    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        run = find_parent_run(client, experiment, run_id)
    except NotFound as err:
        console.print(f"[red]error:[/] {err} (tracking store {uri})")
        raise typer.Exit(2)
    summary = read_summary(client, run)
    if "variant" in summary:  # a sweep's parent run
        _compare_sweep(client, run, summary, metric, all_)
        return
    chosen = select_columns(summary, metric) if metric or all_ else headline_columns(summary)
    table = display_columns(chosen)
    name = client.get_experiment(run.info.experiment_id).name
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000))
    out = Table(title=f"{name}: run {run.info.run_id} ({run.info.status.lower()}, started {started})",
                caption="metric \\[interval low, high]; empty: the stage has no such metric"
                        + ("" if all_ or metric else "; --all: every metric"))
    for column, cells in table.items():  # a header may fold; a value never does
        out.add_column(column, overflow="fold", justify="left" if column in (*BASE_COLUMNS, *LABEL_COLUMNS) else "right",
                       min_width=max(map(len, cells), default=1))
    colour = {"hit": "dim", "miss": "green", "failed": "red", "killed": "yellow"}
    for cells in zip(*table.values()):
        if metric and not any(cells[len(BASE_COLUMNS) + sum(c in table for c in LABEL_COLUMNS):]):
            continue  # --metric: only the stages that have one of them
        out.add_row(*(Text(cell, style=colour.get(cell, "") if i == 2 else "") for i, cell in enumerate(cells)))
    width = 120 if not (all_ or metric) else max(160, console.width)
    if not sys.stdout.isatty():  # a file or a pipe: as wide as the table wants, nothing folded
        width = max(width, Console(width=10_000).measure(out).maximum)
    Console(width=width, soft_wrap=True).print(out)

    if not metric:
        _print_reward_comparison(reward_comparison(summary))


def _print_reward_comparison(comparison: list[dict], variant: str = "") -> None:
    """EXRM against DPORM by set (flows/report.py's reward_comparison), as a table of 120 columns."""
    from rich.console import Console

    if comparison:
        Console(width=120, soft_wrap=True).print(versus_table(comparison, f" ({variant})" if variant else ""))


SWEEP_CELL = 23  # "0.620 [0.550, 0.690]" and a column's borders


def _compare_sweep(client, run, summary: dict[str, list], metric: list[str], all_: bool) -> None:
    """A sweep's parent run: per metric, the variants by round with their intervals (over seeds,
    with seeds), then each variant's difference from the first, paired by seed; then EXRM against
    DPORM per variant where they were measured. Fits 120 columns (--all: every round)."""
    from rich.console import Console
    from rich.table import Table

    from flows.report import (format_interval, reward_comparison, sweep_comparison, sweep_metrics, table_rows,
                              variant_name)

    name = client.get_experiment(run.info.experiment_id).name
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run.info.start_time / 1000))
    groups = list(dict.fromkeys(summary["variant"]))
    seeds = len({s for s in summary["seed"] if s is not None})
    screen = Console(width=120 if not all_ else max(120, console.width), soft_wrap=True)
    # Wrapped at the screen's width (a long experiment name and a run id pass 120 columns).
    screen.print(f"{name}: sweep run {run.info.run_id} ({run.info.status.lower()}, started {started}), "
                  f"{len(groups)} variant{'s' if len(groups) != 1 else ''}" + (f" x {seeds} seeds" if seeds else ""),
                  highlight=False, soft_wrap=False)
    failed = {v for v, cache in zip(summary["variant"], summary["cache"]) if cache in ("failed", "killed")}
    label = lambda v: variant_name(v) + (" (failed)" if v in failed else "")  # noqa: E731
    for chosen in sweep_metrics(summary, metric):
        entries = sweep_comparison(summary, chosen)
        rounds = sorted({r for e in entries for r in e["rounds"]})
        width = max(len("variant"), *(len(label(e["variant"])) for e in entries))
        fits = max(1, (120 - 4 - width) // SWEEP_CELL)
        shown = rounds if all_ or len(rounds) <= fits else rounds[:1] + rounds[len(rounds) - fits + 1:]
        n = max(e["seeds"] for e in entries)
        over = f"mean over {n} seeds \\[95% t-interval over seeds]" if n > 1 else "value \\[95% interval of its own]"
        left_out = ", ".join(str(r) for r in rounds if r not in shown)
        hidden = f"; rounds {left_out} not shown (--all)" if left_out else ""
        tables = [(f"{chosen} by round", "rounds", over + hidden)]
        if len(entries) > 1:
            paired = ("paired by seed, 95% t-interval over the paired differences" if n > 1 else
                      "one seed: no interval (--seeds N gives one)")
            tables.append((f"{chosen}: difference from {label(entries[0]['variant'])}", "difference", paired + hidden))
        for title, part, caption in tables:
            out = Table(title=title, caption=caption)
            out.add_column("variant", overflow="fold")
            for r in shown:
                out.add_column(f"round {r}", justify="right", no_wrap=True)
            for entry in entries[1:] if part == "difference" else entries:
                out.add_row(label(entry["variant"]), *(format_interval(entry[part][r]) if r in entry[part] else ""
                                                      for r in shown))
            screen.print(out)
    if not metric:
        for group in groups:
            rows = [row for row in table_rows(summary) if row["variant"] == group]
            table = {column: [row[column] for row in rows] for column in summary}
            _print_reward_comparison(reward_comparison(table), group)


def versus_table(comparison: list[dict], title: str = ""):
    """EXRM against DPORM, one row per set (flows.report.reward_comparison's entries): each
    accuracy with its interval, three decimals; a zero-width interval over seeds marked and said why."""
    from rich.table import Table

    from flows.report import SET_LABELS, format_interval, zero_width

    pairs = max(entry["n"] for entry in comparison)
    marked: list[bool] = []

    def cell(value: tuple, signed: bool = False) -> str:
        flat = pairs > 1 and zero_width(value)
        marked.append(flat)
        return format_interval(value, signed) + (" *" if flat else "")

    versus = Table(title=f"EXRM vs DPORM{title}: preference accuracy on held-out pairs, by set")
    for column in ("set", "EXRM", "DPORM", "DPORM - EXRM"):
        versus.add_column(column, justify="left" if column == "set" else "right", no_wrap=True)
    for entry in comparison:
        versus.add_row(SET_LABELS[entry["set"]], cell(entry["exrm"]), cell(entry["dporm"]),
                       cell(entry["difference"], signed=True) if "difference" in entry else "")
    versus.caption = ((f"mean over {pairs} seeds \\[95% t-interval over seeds]; DPORM - EXRM paired by seed"
                       if pairs > 1 else "accuracy \\[95% Wilson interval]; one seed: no interval on the difference")
                      + ("\n* zero width: every seed gave the same value, so the t-interval over seeds cannot show"
                         "\nthe sampling error (each seed's own interval: --all)" if any(marked) else ""))
    return versus


UI_READY_S = 180  # MLflow's server takes tens of seconds to boot on a busy 2-core machine


@app.command()
def ui(
    spec: Optional[str] = typer.Argument(None, help="A spec whose tracking store and experiment to open."),
    port: int = typer.Option(5000, help="Port for the MLflow UI."),
    host: str = typer.Option("127.0.0.1"),
    open_browser: bool = typer.Option(False, "--open", help="Also open the URL in a web browser."),
):
    """Open the MLflow UI on the spec's (or the default local) tracking store, at the experiment's runs.

    The URL is printed once the server answers. Ctrl+C, SIGTERM or SIGHUP stops the server it
    started, which also stops itself if this process dies."""
    import shlex
    import signal
    import socket
    import subprocess
    import urllib.request

    from flows.children import owned_command, port_holder
    from flows.tracking import DamagedDatabase, open_local_store

    experiment, uri = _spec_store(spec) if spec else (None, tracking_uri(None))
    try:
        open_local_store(uri)  # a moved home's artifacts shown from where they are now
    except DamagedDatabase as err:
        console.print(f"[red]error:[/] {escape(str(err))}", soft_wrap=True)
        raise typer.Exit(2)
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server will: TIME_WAIT is free
        try:
            probe.bind((host, port))
        except OSError as err:
            console.print(f"[red]error:[/] ui: --port {port}: {host}:{port} is not free ({err.strerror}); "
                          "stop what uses it, or give another --port")
            raise typer.Exit(2)
    # One worker: enough for one person, and several would race to open (migrate) a fresh sqlite store.
    args = ["ui", "--backend-store-uri", uri, "--host", host, "--port", str(port), "--workers", "1"]
    if uri.startswith("sqlite:"):
        args += ["--default-artifact-root", mlflow_artifact_root()]
    cmd = [sys.executable, "-m", "mlflow", *args]
    # Its own process group: stopping it stops the web workers it starts, too. It watches this
    # process and stops itself when this one dies (SIGKILL, a closed terminal): flows/children.py.
    # Its start-up notes and warnings (registry URI, security middleware, deprecations) and request
    # log go to a file, shown when it fails: the terminal gets the URLs.
    import tempfile

    log = tempfile.NamedTemporaryFile("w+", prefix="alignflow-mlflow-ui-", suffix=".log", delete=False)
    server = subprocess.Popen(owned_command("mlflow", args), start_new_session=True, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT,
                              env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # GenAI jobs: 7 idle workers, 1.7 GB
                                   **os.environ, "PYTHONWARNINGS": "ignore"})
    stopping: list[float] = []  # when a signal asked to stop

    def port_lost(holder: str) -> typer.Exit:
        console.print(f"[red]error:[/] ui: --port {port}: {host}:{port} is taken by {holder}, not this UI's "
                      "server; stop what uses it, or give another --port", soft_wrap=True)
        return typer.Exit(2)

    def signal_group(signum: int) -> None:
        try:
            os.killpg(server.pid, signum)
        except ProcessLookupError:  # already gone
            pass

    def on_signal(signum, frame):  # no Popen.wait here: the main thread may hold its lock
        stopping.append(time.time())
        signal_group(signal.SIGTERM)

    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, on_signal)
    try:
        pages = ui_pages(uri, experiment)  # read while the server boots
        local = "127.0.0.1" if host in ("0.0.0.0", "::") else host
        base = f"http://{'[' + local + ']' if ':' in local else local}:{port}"
        deadline = time.time() + UI_READY_S
        while not stopping:
            if server.poll() is not None:
                if holder := port_holder(port, server.pid):  # another took the port first
                    raise port_lost(holder)
                log.seek(0)
                console.print(f"[red]error:[/] ui: the MLflow server exited ({server.returncode}) before it answered: "
                              f"{shlex.join(cmd)}\n{escape(log.read()[-3000:])}")
                raise typer.Exit(1)
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2).close()
            except OSError:
                if time.time() > deadline:
                    console.print(f"[red]error:[/] ui: no answer from {base} after {UI_READY_S}s")
                    raise typer.Exit(1)
                time.sleep(0.5)
                continue
            if holder := port_holder(port, server.pid):  # what answered is another's server
                raise port_lost(holder)
            console.print(f"MLflow UI for {uri}:\n" + "".join(f"  {label + ': ' if label else ''}{base}/{page}\n"
                                                                for label, page in pages)
                          + f"Ctrl+C stops it. (MLflow's own log: {log.name})",
                          highlight=False, soft_wrap=True, markup=False)
            if open_browser:
                import webbrowser

                webbrowser.open(f"{base}/{pages[0][1]}")
            break
        while server.poll() is None:
            if stopping and time.time() - stopping[0] > 15:
                signal_group(signal.SIGKILL)
            time.sleep(0.3)
        if stopping:
            console.print("MLflow UI stopped.")
            log.close()
            os.unlink(log.name)  # it stopped as asked: nothing in its log to read
            raise typer.Exit(0)
        if holder := port_holder(port, server.pid):  # it died of losing the port to another
            raise port_lost(holder)
        raise typer.Exit(server.returncode)
    finally:
        if server.poll() is None:  # an error here: take the server down with us
            signal_group(signal.SIGTERM)
            try:
                server.wait(timeout=15)
            except subprocess.TimeoutExpired:
                signal_group(signal.SIGKILL)
                server.wait()


def ui_pages(uri: str, experiment: str | None) -> list[tuple[str, str]]:
    """The UI's pages to print, (what it shows, its path): the experiment's runs (the spec's, else
    the most recent run's) in MLflow's model-training view with the headline metrics as columns
    (alignflow's saved view, flows/tracking.py); the latest run's charts by round; where it measured
    EXRM and DPORM, those runs side by side (a saved view too). The experiments list when there is none."""
    from pathlib import Path

    if uri.startswith("sqlite:") and not Path(uri.removeprefix("sqlite:///")).is_file():
        return [("", "")]
    quiet_telemetry()
    from flows.report import PARENT_FILTER, NotFound, find_parent_run
    from flows.tracking import HEADLINE_VIEW, MODEL_TRAINING, REWARDS_VIEW, VIEW_PREFIX, quiet_mlflow

    quiet_mlflow()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    try:
        if experiment is not None:
            found = client.get_experiment_by_name(experiment)
            if found is None:
                return [("", "")]
        else:
            found = client.get_experiment(find_parent_run(client).info.experiment_id)
    except NotFound:
        return [("", "")]
    runs = f"#/experiments/{found.experiment_id}/runs"

    def view(name: str) -> str:
        return f"{runs}?viewStateShareKey={name}&{MODEL_TRAINING}"

    pages = [("", view(HEADLINE_VIEW) if VIEW_PREFIX + HEADLINE_VIEW in found.tags else f"{runs}?{MODEL_TRAINING}")]
    latest = client.search_runs([found.experiment_id], filter_string=PARENT_FILTER,
                                order_by=["attribute.start_time DESC"], max_results=1)
    if latest:
        pages.append(("the latest run's charts, by round",
                      f"{runs}/{latest[0].info.run_id}/model-metrics?{MODEL_TRAINING}"))
    if VIEW_PREFIX + REWARDS_VIEW in found.tags:
        pages.append(("its EXRM and DPORM runs side by side", view(REWARDS_VIEW)))
    return pages


_QUICK_EXIT: list[int] = []  # the exit code, after a success or a stop


def _exit_without_teardown() -> None:
    """The last exit handler of the `alignflow` program: after a success, and once every other
    exit handler has run (Prefect's event flush, the temporary server's stop, ...), end the
    process without the interpreter's teardown of the ~3000 modules prefect and mlflow bring,
    which takes 0.7 s on a quiet machine and 4 s on a busy one: a no-change run's tenth, and
    a stopped run's deadline (flows/stopping.py)."""
    if not _QUICK_EXIT:
        return  # a failure: the ordinary exit, which prints and flushes whatever it has to
    import logging

    from flows.tracking import checkpoint_local_stores

    checkpoint_local_stores()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(_QUICK_EXIT[0])


def main() -> None:
    import atexit

    atexit.register(_exit_without_teardown)  # registered first, so it runs last
    try:
        app()
    except SystemExit as done:
        from flows import stopping

        request = stopping.requested()
        if done.code in (0, None) or (request is not None and done.code == request.exit_code):
            _QUICK_EXIT.append(done.code or 0)
        raise


if __name__ == "__main__":
    main()
