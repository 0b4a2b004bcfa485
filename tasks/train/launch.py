"""Training in several processes: `accelerate launch` as a subprocess of the stage.

An offline training stage (sft, reward_model, dpo, rrhf) whose params ask for `processes: N > 1`
(or give an `accelerate_config`) does not train in the pipeline's process. Its function, wrapped
by `multiprocess`, writes a job file (the params, inputs, output folder, seed, checkpoint folder)
and runs

    python -m accelerate.commands.launch --num_processes N [--config_file F | --multi_gpu] \
        --module tasks.train.launch JOB

DDP over NCCL with one process per GPU; without GPUs, DDP over gloo on the CPU; with
`accelerate_config`, what the file says (FSDP, DeepSpeed, ...). Each process rebuilds the
StageContext from the job file and runs the same stage function (unwrapped), so the data
preparation is the same everywhere and tasks/train/loop.py's `train` shares each global batch
between the processes. The process of rank 0 writes the artifact into the stage's output folder
and sends its step metrics, progress and final metrics to the parent as JSON lines in a file the
parent follows while the launch runs: they reach the parent's ctx.log_metrics (MLflow) and
ctx.progress as they happen. A failed process fails the stage with its error and the tail of the
launch's stderr (a BadInput stays a BadInput); a parent interrupted while waiting stops the
launch and its processes. Checkpoints (`checkpoint_every`) go to ctx.checkpoints, which outlives
a failed attempt: the next attempt resumes from the last one.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from tasks.base import BadInput, Progress, StageContext, no_metrics, no_progress

REPO_ROOT = Path(__file__).resolve().parents[2]
RANK_VARIABLE = "ALIGNFLOW_PROCESS_RANK"  # set in the launched processes only: their rank
STDERR_TAIL = 6000  # characters of the launch's stderr in the error of a failed launch


def multiprocess(run: Callable[[StageContext], dict]) -> Callable[[StageContext], dict]:
    """Wrap a training stage function: with params.processes > 1 or an accelerate_config it runs
    under `accelerate launch` (see the module docstring); otherwise here, as it is."""

    @functools.wraps(run)
    def stage(ctx: StageContext) -> dict[str, float]:
        p = ctx.params
        if p.processes > 1 or p.accelerate_config:
            return launch(ctx, run)
        return run(ctx)

    return stage


# ---- the parent: launch, follow, forward --------------------------------------------------


def launch(ctx: StageContext, run: Callable[[StageContext], dict]) -> dict[str, float]:
    """Run `run` in ctx.params.processes processes under accelerate; its final metrics (rank 0's)."""
    p = ctx.params
    folder = Path(tempfile.mkdtemp(prefix="alignflow-launch-"))
    try:
        events = folder / "events.jsonl"
        events.touch()
        job = folder / "job.json"
        job.write_text(json.dumps({
            "module": run.__module__, "function": run.__name__, "params": p.model_dump(mode="json", exclude_unset=True),  # unset stays unset: validators look
            "inputs": {name: str(Path(path).resolve()) for name, path in ctx.inputs.items()},
            "out": str(Path(ctx.out).resolve()), "seed": ctx.seed,
            "checkpoints": None if ctx.checkpoints is None else str(Path(ctx.checkpoints).resolve()),
            "events": str(events), "scratch": str(folder / "scratch"), "processes": p.processes, "parent_pid": os.getpid(),
        }))
        command, env = launch_command(p.processes, p.accelerate_config, job)
        with open(folder / "stdout.log", "wb") as stdout, open(folder / "stderr.log", "wb") as stderr:
            process = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr,
                                       stdin=subprocess.DEVNULL, start_new_session=True)
            try:
                outcome = follow(process, events, ctx, f"starting {p.processes} training processes")
            except BaseException:  # interrupted here (Ctrl-C, a failing callback): stop the launch
                stop(process)
                raise
        return outcome_metrics(outcome, process.returncode, folder / "stderr.log", p.processes)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def launch_command(processes: int, accelerate_config: str | None, job: Path) -> tuple[list[str], dict[str, str]]:
    """The `accelerate launch` command line and its environment."""
    import torch

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1"]
    gpus = torch.cuda.device_count()
    config = {}
    if accelerate_config:
        import yaml

        if not gpus:
            raise ValueError(f"accelerate_config {accelerate_config}: this machine has no GPU; "
                             "without accelerate_config the processes train with DDP over gloo on the CPU")
        config = yaml.safe_load(Path(accelerate_config).read_text()) or {}
        command += ["--config_file", str(Path(accelerate_config).resolve())]
    else:
        # torchrun's launcher (named multi_gpu); without GPUs, DDP over gloo.
        command += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not gpus:
            env["ACCELERATE_USE_CPU"] = "true"
    if gpus and processes > gpus:
        raise ValueError(f"processes: {processes}, but this machine has {gpus} GPU{'s' * (gpus != 1)} "
                         "(one process per GPU)")
    if not config.get("main_process_port"):  # a free port: two launches on one machine must not collide
        command += ["--main_process_port", str(free_port())]
    return [*command, "--module", "tasks.train.launch", str(job)], env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def follow(process: subprocess.Popen, events: Path, ctx: StageContext, waiting: str) -> dict:
    """Forward the launch's events to ctx as they come, until it exits; its result or error.
    A bar says `waiting` until the first event (starting the processes takes a while)."""
    starting = ctx.progress(waiting, total=None)
    starting.__enter__()
    bars: dict[int | str, tuple[contextlib.AbstractContextManager, Progress | None]] = {"starting": (starting, None)}
    outcome: dict = {}
    pending = ""
    try:
        with open(events) as reader:
            while True:
                exited = process.poll() is not None  # then read what it wrote before exiting
                chunk = reader.read()
                pending += chunk
                *lines, pending = pending.split("\n")
                if lines and "starting" in bars:
                    bars.pop("starting")[0].__exit__(None, None, None)
                for line in lines:
                    event = json.loads(line)
                    kind = event.pop("event")
                    if kind == "metrics":
                        ctx.log_metrics(event["metrics"], event["step"])
                    elif kind == "progress":
                        manager = ctx.progress(event["description"], total=event["total"])
                        bars[event["id"]] = (manager, manager.__enter__())
                    elif kind == "advance":
                        bars[event["id"]][1].advance(event["n"])
                    elif kind == "progress_end":
                        bars.pop(event["id"])[0].__exit__(None, None, None)
                    elif kind in ("result", "error"):
                        outcome.setdefault(kind, event)  # the first error is the cause; later ones are fallout
                if exited:
                    return outcome
                if not chunk:
                    time.sleep(0.05)
    finally:
        for manager, _ in bars.values():
            manager.__exit__(None, None, None)


def outcome_metrics(outcome: dict, returncode: int, stderr: Path, processes: int) -> dict[str, float]:
    error = outcome.get("error")
    if error and error["type"] == "BadInput":  # the user's data: reported as such (exit code 2)
        raise BadInput(error["file"], error["field"], error["expected"])
    if returncode == 0 and "result" in outcome and not error:
        return outcome["result"]["metrics"]
    text = stderr.read_text(errors="replace")
    tail = text[-STDERR_TAIL:]
    cause = f"{error['type']}: {error['message']} (in the process of rank {error['rank']})" if error else \
        f"accelerate launch exited with code {returncode}" + ("" if returncode else " without a result")
    raise RuntimeError(f"training in {processes} processes failed: {cause}\n--- stderr of accelerate launch (tail) ---\n{tail}")


def stop(process: subprocess.Popen, grace: float = 20.0) -> None:
    """End the launch and every process it started: SIGTERM (torchrun passes it to the workers),
    then SIGKILL for any left after `grace` seconds. torchrun starts each worker in a session of its
    own, so they are found as descendants, by process id."""
    import psutil

    try:
        family = [psutil.Process(process.pid), *psutil.Process(process.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for member in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace)
    for member in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.kill()
    psutil.wait_procs(alive, timeout=5)
    process.wait()


# ---- the children: rebuild the context, run the stage, report ------------------------------


class EventWriter:
    """rank 0's StageContext callbacks: JSON lines appended to the events file the parent follows."""

    def __init__(self, path: Path):
        self.path, self.bars = path, 0

    def write(self, event: dict) -> None:
        with open(self.path, "a") as f:  # one short write per line: the parent never sees half a line for long
            f.write(json.dumps(event) + "\n")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        self.write({"event": "metrics", "step": step, "metrics": {k: float(v) for k, v in metrics.items()}})

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None):
        self.bars += 1
        bar_id, writer = self.bars, self

        class Bar(Progress):
            def advance(self, n: int = 1) -> None:
                writer.write({"event": "advance", "id": bar_id, "n": n})

        self.write({"event": "progress", "id": bar_id, "description": description, "total": total})
        try:
            yield Bar()
        finally:
            self.write({"event": "progress_end", "id": bar_id})


def exit_with(pid: int, every_s: float = 2.0) -> None:
    """End this process soon after process `pid` (the pipeline's) is gone: killed without the
    chance to stop its launch, it must not leave processes training (and checkpointing) behind."""
    import threading

    def watch():
        while True:
            time.sleep(every_s)
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                os._exit(1)
            except PermissionError:  # exists (another user's, after a pid reuse: unlikely; keep going)
                pass

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def main(job_file: str) -> None:
    job = json.loads(Path(job_file).read_text())
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    os.environ[RANK_VARIABLE] = str(rank)  # tasks.train.loop.is_main_process
    exit_with(job["parent_pid"])
    writer = EventWriter(Path(job["events"]))
    try:
        if world != job["processes"]:
            raise RuntimeError(f"expected {job['processes']} processes, accelerate launched {world}")
        import torch

        if torch.cuda.is_available():  # models load onto this process's GPU ("cuda" is the current device)
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        from tasks.base import STAGE_KINDS

        run = getattr(importlib.import_module(job["module"]), job["function"]).__wrapped__
        params = STAGE_KINDS[job["params"]["kind"]].params.model_validate(job["params"])
        out = Path(job["out"]) if rank == 0 else Path(job["scratch"]) / f"rank-{rank}"  # ranks > 0 write nothing
        out.mkdir(parents=True, exist_ok=True)
        ctx = StageContext(
            out=out, inputs={name: Path(path) for name, path in job["inputs"].items()}, params=params, seed=job["seed"],
            log_metrics=writer.log_metrics if rank == 0 else no_metrics,
            progress=writer.progress if rank == 0 else no_progress,
            checkpoints=None if job["checkpoints"] is None else Path(job["checkpoints"]),
        )
        metrics = run(ctx)
        if rank == 0:
            writer.write({"event": "result", "metrics": {k: float(v) for k, v in (metrics or {}).items()}})
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    except BaseException as exc:
        error = {"event": "error", "rank": rank, "type": type(exc).__name__, "message": str(exc)}
        if isinstance(exc, BadInput):
            error.update(file=exc.file, field=exc.field, expected=exc.expected)
        writer.write(error)
        raise


if __name__ == "__main__":
    main(sys.argv[1])
