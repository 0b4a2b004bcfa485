"""Where local state lives: everything under ALIGNFLOW_HOME (default ./.alignflow) unless the
spec names other places. Prefect's home goes there too unless the user set PREFECT_HOME."""
from __future__ import annotations

import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("ALIGNFLOW_HOME", ".alignflow")).expanduser().resolve()


def store_root(spec_store: str | None) -> str:
    return spec_store or str(home() / "store")


def tracking_uri(spec_uri: str | None) -> str:
    return spec_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home() / 'mlflow.db'}"


def mlflow_artifact_root() -> str:
    return (home() / "mlflow-artifacts").as_uri()


def quiet_telemetry() -> None:
    """A local tool does not phone home (unless the user set these themselves)."""
    os.environ.setdefault("DO_NOT_TRACK", "1")
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # also costs time on every call


def configure_environment() -> None:
    """Must run before prefect is imported (it reads these once), and only after the spec has
    validated: a bad spec leaves nothing behind, not even an empty folder."""
    os.environ.setdefault("PREFECT_HOME", str(home() / "prefect"))
    Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)
    # Our console says what happened: each stage, and a failing stage's traceback (flows/cli.py).
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "CRITICAL")
    os.environ.setdefault("PREFECT_UI_ENABLED", "false")
    quiet_telemetry()
