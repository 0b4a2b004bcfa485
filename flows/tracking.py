"""MLflow, at the edge: an experiment per spec, a parent run per invocation, a nested run per
stage execution. Runs are addressed by id through MlflowClient, never through mlflow's
thread-local "active run", so a stage running in a worker thread still nests under its parent."""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path

from flows.home import mlflow_artifact_root
from flows.timings import timed

LOGGING = "mlflow logging"  # the phase (flows/timings.py) the calls below count to
BATCH = 500  # MLflow accepts up to 1000 metrics per log_batch call
# MLflow 3's UI opens an experiment without this tag on its GenAI "Traces" view, which hides the
# runs, metrics and charts a pipeline logs; this value opens it on the model-training view.
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"


def run_name(stage: str, round: int, reward: str | None = None, seed: int | None = None) -> str:
    """A stage run's name as a person reads it in MLflow's run list: `dpo · round 2`, or `sft`; a
    reward's accuracy run by its reward and the seed that reward was trained with, `EXRM · seed 0`
    (the name that tells an EXRM run from a DPORM one on MLflow's Compare page)."""
    name = f"{reward.upper()} · seed {seed}" if reward else stage
    return f"{name} · round {round}" if round else name


def pipeline_run_name(spec_name: str, variant: str | None = None, variants: int = 0, *,
                      changed: list[str] = (), headline: dict[int, dict[str, float]] | None = None,
                      cached: bool = False) -> str:
    """A pipeline run's name, what tells runs apart in MLflow's run list: the spec, what the
    command line changed (`dpo.beta=0.2 rounds=5`), and, once the run has finished, its headline
    (`win_rate 0.952 → 0.984 → 0.991`, or DPORM - EXRM by set) and `all cached` when nothing ran.
    A sweep's parent is `demo · sweep of 4`, a variant what differs (`beta=0.05 seed=1`)."""
    if variant:
        parts = [variant]
    else:
        parts = [f"{spec_name} · sweep of {variants}" if variants else spec_name, *changed]
    rounds = headline or {}
    rates = [m["win_rate"] for r, m in sorted(rounds.items()) if "win_rate" in m]
    if rates:
        shown = [f"{x:.3f}" for x in rates]
        parts.append("win_rate " + " → ".join(shown if len(shown) <= 4 else [*shown[:2], "…", shown[-1]]))
    final = next((m for _, m in sorted(rounds.items(), reverse=True) if "diff_acc_id" in m), None)
    if final:
        from flows.report import SET_LABELS

        parts.append("DPORM − EXRM " + ", ".join(f"{label} {final[f'diff_acc_{s}']:+.3f}"
                                                 for s, label in SET_LABELS.items() if f"diff_acc_{s}" in final))
    if cached:
        parts.append("all cached")
    return " · ".join(parts)


def changed_settings(overrides: list[str], rounds: int | None) -> list[str]:
    """What a run's command line changed in its spec, short: `--set stages.dpo.beta=0.2 --rounds 5`
    is `dpo.beta=0.2`, `rounds=5`."""
    return [o.strip().removeprefix("stages.") for o in overrides] + ([f"rounds={rounds}"] if rounds is not None else [])


# ---------------------------------------------------------------- what MLflow's UI opens on
# MLflow 3.17's runs page opens a saved view named in its URL (`?viewStateShareKey=<id>`): an
# experiment tag `mlflow.sharedViewState.<id>` = {"name", "createdAt", "state"}, the state being the
# page's own JSON (search filter, sort, columns shown with their order and widths). alignflow keeps
# two per experiment, listed in the page's Views menu too: the pipeline runs with their headline
# metrics as columns, and the latest run's EXRM and DPORM runs side by side.
VIEW_PREFIX = "mlflow.sharedViewState."
# Every stage run names the pipeline run it belongs to (a plain run's parent, or a sweep's: stage
# runs sit under their variant there), so one search finds a run's stages at any depth.
PIPELINE_RUN_TAG = "alignflow.pipeline_run"
HEADLINE_VIEW, REWARDS_VIEW = "alignflow-headline", "alignflow-rewards"
VIEW_NAMES = {HEADLINE_VIEW: "alignflow: headline metrics", REWARDS_VIEW: "alignflow: EXRM vs DPORM, latest run"}
MODEL_TRAINING = "workflowType=machine_learning"  # the UI's model-training navigation, not its GenAI one
ROUND_COLUMN = "win_rate_round_{}"
MAX_ROUND_COLUMNS = 12  # the latest rounds': beyond, a wide table nobody scrolls


def headline_columns(headline: dict[int, dict[str, float]]) -> tuple[dict[str, float], list[str]]:
    """What a pipeline run's row in MLflow's runs list shows: (metrics to log once, the columns).
    The list shows a metric's last value, so the win rate of each round is a metric of its own,
    `win_rate_round_2` (round 0's is `win_rate`); each reward's accuracy by set, EXRM beside DPORM
    (`exrm_acc_id`, `dporm_acc_id`, `exrm_acc_prompt_shift`, ...)."""
    from flows.report import REWARDS, SETS

    measured = {name for metrics in headline.values() for name in metrics}
    extra, columns = {}, [f"{reward}_acc_{set_}" for set_ in SETS for reward in REWARDS
                          if f"{reward}_acc_{set_}" in measured]
    for round_, metrics in sorted(headline.items()):
        if "win_rate" in metrics:
            name = ROUND_COLUMN.format(round_) if round_ else "win_rate"
            if round_:
                extra[name] = metrics["win_rate"]
            columns.append(name)
    return extra, columns


def _column_order(name: str) -> tuple:
    number = name.removeprefix("win_rate_round_")
    if number != name and number.isdigit():
        return (2, int(number))
    return (0 if "_acc_" in name else 1, 0)


NAME_COLUMN = "attributes.`Run Name`"


def runs_view(columns: list[str], search: str = "", order_by: str = "attributes.start_time",
              ascending: bool = False, width: int = 100, name_width: int = 300) -> dict:
    """The runs page's state: these metric columns right after the run's name and start time, each
    wide enough for its name (and `width` px at least); the runs `search` finds, sorted."""
    keys = [f"metrics.`{name}`" for name in columns]
    return {"searchFilter": search, "orderByKey": order_by, "orderByAsc": ascending,
            "selectedColumns": keys, "columnOrder": [NAME_COLUMN, "runDateAndNestInfo", *keys, "duration"],
            "columnWidths": {NAME_COLUMN: name_width, **{k: max(width, 7 * len(n) + 32) for k, n in zip(keys, columns)}}}


def view_columns(tags: dict[str, str], view: str) -> tuple[list[str], int]:
    """The metric columns and the name column's width of one of alignflow's saved views in an
    experiment's tags (none, 0 if there is none)."""
    with contextlib.suppress(ValueError, KeyError, TypeError, AttributeError):  # edited by hand: none
        state = json.loads(json.loads(tags[VIEW_PREFIX + view])["state"])
        return ([key[len("metrics.`"):-1] for key in state["selectedColumns"] if key.startswith("metrics.`")],
                int(state["columnWidths"][NAME_COLUMN]))
    return [], 0


def is_remote(uri: str) -> bool:
    """A tracking server (or Databricks), as opposed to a store this process opens itself."""
    return uri.split(":", 1)[0].lower() in ("http", "https", "databricks")


def _flatten(prefix: str, value, out: dict) -> dict:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else k, v, out)
    else:
        if value is not None:  # an unset option (a DPORM run's `exrm`) is no param: Compare shows no "None"
            out[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


def quiet_mlflow() -> None:
    """MLflow's own logger at WARNING: after its import, as mlflow sets the level on import."""
    import logging

    import mlflow  # noqa: F401

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    # It logs a database error's traceback before raising it; the CLI reports the error itself (a
    # full disk in one line).
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)


def _store_lock(uri: str):
    """A lock beside a local sqlite database (none for a server, which serialises itself)."""
    import contextlib
    from pathlib import Path

    from flows.locks import file_lock

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri.removeprefix("sqlite:///"))
    return file_lock(db.with_name(f".{db.name}.lock"), what=f"MLflow's database {db}")


_WAL_STORES: set[str] = set()


def _wal_commits(uri: str) -> None:
    """A local sqlite store commits in WAL mode with synchronous=NORMAL: a commit appends to the
    log, without syncing the disk. MLflow makes about seven commits a stage run, which on a default
    (rollback-journal, synchronous=FULL) database was half the logging time of a no-change run.
    SQLite's trade (https://www.sqlite.org/wal.html, /pragma.html#pragma_synchronous): the
    database is never corrupted; a power cut (not a crash of this process) may lose the last
    commits. Prefect's own database runs in WAL mode already."""
    import sqlite3
    from pathlib import Path

    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    if not uri.startswith("sqlite:///") or uri in _WAL_STORES:
        return
    _WAL_STORES.add(uri)
    db = Path(uri.removeprefix("sqlite:///")).resolve()

    def on_connect(connection, _record) -> None:  # every connection SQLAlchemy opens in this process
        if not isinstance(connection, sqlite3.Connection):
            return
        cursor = connection.cursor()
        try:
            main = next(row for row in cursor.execute("PRAGMA database_list") if row[1] == "main")
            if main[2] and Path(main[2]).resolve() == db:
                cursor.execute("PRAGMA busy_timeout = 20000")  # switching modes waits for other writers
                cursor.execute("PRAGMA journal_mode = WAL")  # kept by the file; a no-op once set
                cursor.execute("PRAGMA synchronous = NORMAL")  # per connection
        except sqlite3.Error:
            pass  # left as it was: slower, as correct
        finally:
            cursor.close()

    event.listen(Engine, "connect", on_connect)


def checkpoint_local_stores() -> None:
    """Copy the WAL of each local store this process wrote into its database file, so that the
    file alone holds every run (a process that ends without closing its connections leaves the
    log beside it). PASSIVE: never waits for, nor blocks, another run."""
    import sqlite3

    for uri in _WAL_STORES:
        try:
            with contextlib.closing(sqlite3.connect(uri.removeprefix("sqlite:///"), timeout=1)) as db:
                db.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error:
            pass  # the log stays: SQLite reads it on the next open


class DamagedDatabase(Exception):
    """A local MLflow database that cannot be read: the CLI names it and how to recover (exit 2)."""

    def __init__(self, path: Path, reason: str):
        self.path = path
        super().__init__(
            f"MLflow's database {path} is damaged ({reason}). To recover: move it aside (mv {path} "
            f"{path}.damaged) and run again, which starts a new one (the store's artifacts are kept and reused; "
            f"the run history starts over), or put back a copy from a backup")


_NEEDED_TABLES = {"experiments", "runs", "alembic_version"}


def _local_db_state(db: Path) -> str:
    """"absent", "ready", or "half-made" (created, but its set-up never finished: empty, or a
    migration that died, and no run in it); DamagedDatabase when it cannot be read or is cut short."""
    import sqlite3

    if not db.exists():
        return "absent"
    try:
        size = db.stat().st_size
        with open(db, "rb") as handle:
            header = handle.read(100)
    except OSError as err:
        raise DamagedDatabase(db, f"cannot read it: {err.strerror}") from None
    if size == 0:
        return "half-made"
    if not header.startswith(b"SQLite format 3\0") or len(header) < 100:
        raise DamagedDatabase(db, "not an SQLite database")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if size < page_size * pages:
        raise DamagedDatabase(db, f"cut short: {size} bytes, its header says {page_size * pages}")
    try:
        with contextlib.closing(sqlite3.connect(f"{db.as_uri()}?mode=ro", uri=True, timeout=20)) as connection:
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            runs = connection.execute("SELECT count(*) FROM runs").fetchone()[0] if "runs" in tables else 0
    except sqlite3.DatabaseError as err:
        if getattr(err, "sqlite_errorname", "") not in ("SQLITE_CORRUPT", "SQLITE_NOTADB"):
            raise
        raise DamagedDatabase(db, str(err)) from None
    if _NEEDED_TABLES <= tables and not any(t.startswith("_alembic_tmp_") for t in tables):
        return "ready"
    if runs:
        raise DamagedDatabase(db, "a schema migration did not finish (tables " +
                              ", ".join(sorted(t for t in tables if t.startswith("_alembic_tmp_"))) + " are left)")
    return "half-made"


def open_local_store(uri: str) -> None:
    """For a reader (compare, ui) of a local sqlite store that exists: DamagedDatabase if it
    cannot be read (before MLflow trips on it), and its artifacts re-pointed if its home moved."""
    if uri.startswith("sqlite:///") and Path(uri.removeprefix("sqlite:///")).exists():
        with _store_lock(uri):
            _local_db_state(Path(uri.removeprefix("sqlite:///")))
            repoint_moved_artifacts(uri)


def _set_up_local_store(uri: str) -> None:
    """A new local store is made whole or not at all: MLflow creates its tables (dozens of
    migrations) in a file beside the final one, which is renamed into place once complete. A full
    disk then leaves no half-migrated database that every later run trips on; one that an older
    alignflow left half-made (and empty of runs) is made again the same way. Call under the lock."""
    import uuid

    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if _local_db_state(db) == "ready":
        return
    from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

    db.parent.mkdir(parents=True, exist_ok=True)
    tmp = db.with_name(f".{db.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        store = SqlAlchemyStore(f"sqlite:///{tmp}", mlflow_artifact_root())
        store.engine.dispose()
        SqlAlchemyStore._engine_map.pop(f"sqlite:///{tmp}", None)
        for suffix in ("-wal", "-shm", "-journal"):  # a half-made one's log must not meet the new file
            db.with_name(db.name + suffix).unlink(missing_ok=True)
        os.replace(tmp, db)
    finally:
        for leftover in (tmp, *(tmp.with_name(tmp.name + s) for s in ("-journal", "-wal", "-shm"))):
            leftover.unlink(missing_ok=True)


_ARTIFACT_LOCATION = re.compile(r"(file://.+)/mlflow-artifacts(/[^/]*)?")


def repoint_moved_artifacts(uri: str) -> None:
    """Artifacts follow a home that moved. MLflow keeps an absolute artifact location per
    experiment and per run; after `cp -a A B` (or `mv`), B's database still names A's
    `mlflow-artifacts/`, so B's runs would write there (and a moved A be re-created) and its older
    runs would show nothing. Opening the home's own database, the locations under another
    `<folder>/mlflow-artifacts` are re-pointed to this home's, where the copy holds them. Only the
    home's own database: one a spec names may be shared by several homes. Under the store's lock."""
    import sqlite3

    from flows.home import home

    if not uri.startswith("sqlite:///"):
        return
    db = Path(uri.removeprefix("sqlite:///"))
    if not db.is_file() or db.resolve() != (home() / "mlflow.db").resolve():
        return
    root = mlflow_artifact_root()
    with contextlib.closing(sqlite3.connect(db, timeout=20)) as connection, connection:
        moved = {}
        for experiment_id, location in connection.execute("SELECT experiment_id, artifact_location FROM experiments"):
            match = _ARTIFACT_LOCATION.fullmatch(location or "")
            if match and f"{match.group(1)}/mlflow-artifacts" != root:
                moved[experiment_id] = (f"{match.group(1)}/mlflow-artifacts", root + (match.group(2) or ""))
        for experiment_id, (old_root, location) in moved.items():
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = ?",
                               (location, experiment_id))
            connection.execute("UPDATE runs SET artifact_uri = ? || substr(artifact_uri, ?) "
                               "WHERE experiment_id = ? AND substr(artifact_uri, 1, ?) = ?",
                               (root, len(old_root) + 1, experiment_id, len(old_root) + 1, old_root + "/"))


class Tracker:
    def __init__(self, uri: str, experiment: str):
        from mlflow.tracking import MlflowClient

        quiet_mlflow()

        self.uri = uri
        _wal_commits(uri)
        # Several runs starting on a fresh home would each migrate the new database's schema (and
        # all but one fail): a local database is opened, and its experiment made, under a lock.
        with _store_lock(uri):
            _set_up_local_store(uri)
            repoint_moved_artifacts(uri)
            self.client = MlflowClient(uri)
            self.experiment_id = self._experiment_id(experiment)

    def _experiment_id(self, experiment: str) -> str:
        """Get or create: another process (another machine, on a server) may create it meanwhile.
        The experiment is tagged as a model-training one, so MLflow's UI opens on its runs."""
        from mlflow.exceptions import MlflowException

        kind = {EXPERIMENT_KIND_TAG: EXPERIMENT_KIND}
        for attempt in range(5):
            found = self.client.get_experiment_by_name(experiment)
            if found is not None:
                if EXPERIMENT_KIND_TAG not in found.tags:  # made by an older alignflow, or by hand
                    self.client.set_experiment_tag(found.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                return found.experiment_id
            try:
                if is_remote(self.uri):
                    # The server chooses where artifacts go (with --serve-artifacts, its proxy:
                    # mlflow-artifacts:/...), so every client and the UI can reach them.
                    return self.client.create_experiment(experiment, tags=kind)
                # A local store: its artifacts next to it, under ALIGNFLOW_HOME.
                return self.client.create_experiment(
                    experiment, artifact_location=f"{mlflow_artifact_root()}/{experiment}", tags=kind)
            except MlflowException:
                if attempt == 4:
                    raise
                time.sleep(0.2 * (attempt + 1))  # someone else created it: get it

    def __getstate__(self) -> dict:  # sent to another process (a Ray worker): it opens its own client
        return {"uri": self.uri, "experiment_id": self.experiment_id}

    def __setstate__(self, state: dict) -> None:
        from mlflow.tracking import MlflowClient

        self.__dict__.update(state)
        self.client = MlflowClient(self.uri)

    @timed(LOGGING)
    def start_run(self, name: str, tags: dict[str, str], parent: str | None = None) -> str:
        if parent:
            tags = {**tags, "mlflow.parentRunId": parent}
        run = self.client.create_run(self.experiment_id, run_name=name, tags=tags)
        return run.info.run_id

    @timed(LOGGING)
    def log(self, run_id: str, metrics: dict | None = None, params: dict | None = None,
            tags: dict | None = None, step: int = 0, history: list[dict] = ()) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in (metrics or {}).items()]
        for row in history:
            items += [Metric(k, float(v), now, int(row["step"])) for k, v in row.items() if k != "step"]
        params_ = [Param(k, v[:6000]) for k, v in _flatten("", params or {}, {}).items()]
        tags_ = [RunTag(k, str(v)) for k, v in (tags or {}).items()]
        if not (items or params_ or tags_):
            return
        for i in range(0, max(len(items), 1), BATCH):
            chunk = items[i:i + BATCH]
            self.client.log_batch(run_id, metrics=chunk, params=params_ if i == 0 else [],
                                  tags=tags_ if i == 0 else [])

    @timed(LOGGING)
    def log_headline(self, run_id: str, headline: dict[int, dict[str, float]], rewards: bool = False,
                     name: str = "") -> None:
        """A pipeline run's headline, rounded to 4 decimals (the runs list shows a value's every
        digit): by round (step = round, so MLflow's charts draw it by round), as the columns of the
        experiment's runs list (`headline_columns`), and the saved views (that list's; where the run
        measured rewards, its EXRM and DPORM runs'), whose name column fits `name`."""
        extra, columns = headline_columns(headline)
        history = [{"step": r, **{k: round(v, 4) for k, v in metrics.items()}} for r, metrics in headline.items()]
        self.log(run_id, metrics={k: round(v, 4) for k, v in extra.items()}, history=history)
        tags = self.client.get_experiment(self.experiment_id).tags
        known, known_width = view_columns(tags, HEADLINE_VIEW)
        wanted = sorted(dict.fromkeys([*known, *columns]), key=_column_order)  # another run may have had more rounds
        rounds = [c for c in wanted if _column_order(c)[0] == 2]
        wanted = [c for c in wanted if c not in rounds[:-MAX_ROUND_COLUMNS]]
        width = max(known_width, min(640, 7 * len(name) + 90))  # the longest name yet, up to a point
        if columns and (wanted, width) != (known, known_width):
            self.save_view(HEADLINE_VIEW, runs_view(wanted, name_width=width))
        if rewards:  # the latest run's reward runs, EXRM and DPORM by seed (sorted by name: `DPORM · seed 0`, ...)
            from flows.report import SETS

            self.save_view(REWARDS_VIEW, runs_view(
                [f"acc_{s}" for s in SETS],
                f"tags.`{PIPELINE_RUN_TAG}` = '{run_id}' AND tags.`alignflow.reward` LIKE '%'",
                order_by="tags.`mlflow.runName`", ascending=True, width=170))  # a stage's accuracy has every digit

    def save_view(self, view: str, state: dict) -> None:
        """One of alignflow's saved views of the experiment's runs page (see VIEW_PREFIX)."""
        from mlflow.exceptions import MlflowException

        value = {"name": VIEW_NAMES[view], "createdAt": int(time.time() * 1000), "state": json.dumps(state)}
        with contextlib.suppress(MlflowException):  # a view is a convenience: never a failed run
            self.client.set_experiment_tag(self.experiment_id, VIEW_PREFIX + view, json.dumps(value))

    @timed(LOGGING)
    def rename(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    @timed(LOGGING)
    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, text, name)

    @timed(LOGGING)
    def log_table(self, run_id: str, table: dict[str, list], name: str) -> None:
        """An MLflow table artifact (shown as a table in the UI; `mlflow.load_table` reads it)."""
        self.client.log_table(run_id, data=table, artifact_file=name)

    @timed(LOGGING)
    def log_file(self, run_id: str, path, folder: str | None = None) -> None:
        self.client.log_artifact(run_id, str(path), folder)

    @timed(LOGGING)
    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)


_TRACKERS: dict[tuple[str, str], Tracker] = {}


def get_tracker(uri: str, experiment: str) -> Tracker:
    """One Tracker per store and experiment in a process (opening MLflow's store takes seconds,
    so the CLI opens it while the Prefect server boots and the flow reuses it)."""
    if (uri, experiment) not in _TRACKERS:
        _TRACKERS[uri, experiment] = Tracker(uri, experiment)
    return _TRACKERS[uri, experiment]


class StepLogger:
    """Collects a stage's step metrics; sends them to MLflow in batches, not one call a value."""

    def __init__(self, tracker: Tracker | None, run_id: str | None, every_s: float = 5.0):
        self.tracker, self.run_id, self.every_s = tracker, run_id, every_s
        self.history: list[dict] = []
        self._sent, self._last = 0, time.time()

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        self.history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})
        if time.time() - self._last > self.every_s:
            self.flush()

    def flush(self) -> None:
        if self.tracker and self.run_id and self._sent < len(self.history):
            self.tracker.log(self.run_id, history=self.history[self._sent:])
        self._sent, self._last = len(self.history), time.time()
