"""One training loop for every trainer, offline (SFT, reward model, DPO, RRHF) and online (rloo,
grpo, ppo), built on accelerate.

What both share is written here once:
- `make_optimizer`: AdamW and a transformers schedule (`lr_scheduler`, `warmup_ratio`);
- `accumulate`: forward and backward over the micro-batches of one optimizer step (gradient
  accumulation), each micro-batch's loss weighted by its share of the step's batch, so that the
  gradient is the whole batch's whatever `micro_batch_size` is; under autocast in the stage's
  `dtype` (accelerate's mixed precision, with a gradient scaler for float16);
- `optimizer_step`: clip, step, schedule; a non-finite loss or weight stops the stage
  (`NonFiniteError`), so no poisoned model is ever saved;
- checkpoints (`save_checkpoint`, `resume`): accelerate's save_state into a step folder renamed
  into place, the loop's own state beside it;
- `verify_fast_paths`: the log-prob fast paths probed again on the trained weights, before each
  checkpoint and at the end (tasks/logps.py's recheck).

`train` is the offline loop over a list of examples; tasks/train/online.py's loop generates its
batches and uses the same pieces.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import shutil
import warnings
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from tasks.base import no_metrics, no_progress

MIXED_PRECISION = {torch.float32: "no", torch.bfloat16: "bf16", torch.float16: "fp16"}


def make_accelerator(dtype: str = "auto") -> Accelerator:
    """An Accelerator computing in `dtype` (auto: bfloat16 on GPUs that support it, else float32;
    tasks.models.torch_dtype). Weights stay in the dtype they were loaded in; autocast runs the
    matmuls in `dtype`, and float16 adds accelerate's gradient scaler (on GPUs)."""
    from accelerate.state import AcceleratorState

    from tasks.models import torch_dtype

    precision = MIXED_PRECISION[torch_dtype(dtype)]
    if precision == "fp16" and not torch.cuda.is_available():
        warnings.warn("dtype float16: accelerate autocasts to float16 on GPUs only; on this CPU the stage computes in "
                      "float32 (bfloat16 autocasts on CPUs)")
    # accelerate keeps one state per process and refuses another precision: a process that runs
    # stages of different dtypes (tests, a notebook) starts it afresh; the process group stays.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    return Accelerator(mixed_precision=precision)


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss or weight: the stage stops and commits nothing."""


# ---- batches --------------------------------------------------------------------------------


class LengthGroupedBatches:
    """Seeded batches of example indices: each epoch a fresh shuffle cut into batches.

    With `lengths`, examples of similar length go together, so little of a batch is padding: the
    order is cut into megabatches of `group` batches, each megabatch is sorted by length and the
    resulting batches are shuffled (the scheme of transformers' `group_by_length`). Epoch e's
    batches depend on (seed, e) alone, so a resumed run finds its place from the step number.
    """

    def __init__(self, lengths: list[int] | None, batch_size: int, seed: int, group: int = 32, n: int | None = None):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.n = len(lengths) if lengths is not None else n
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(self.n / self.batch_size)

    def of_epoch(self, epoch: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + epoch)
        order = torch.randperm(self.n, generator=generator).tolist()
        if self.lengths is None:
            return [order[i : i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        size = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), size):
            mega = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        return [batches[b] for b in torch.randperm(len(batches), generator=generator).tolist()]

    def __iter__(self):
        self.epoch += 1
        yield from self.of_epoch(self.epoch - 1)


def fit_to_length(lengths: list[int], max_length: int, too_long: str, what: str) -> tuple[list[int], dict[str, float]]:
    """Indices of the examples to train on, under the stage's `too_long` rule, and what was dropped.

    lengths: each example's untruncated token count (for pairs, the longer side).
    too_long: "truncate" keeps them all (their responses lose their tails), "drop" drops them,
    "error" refuses the data.
    """
    too_long_rows = [i for i, n in enumerate(lengths) if n > max_length]
    if too_long_rows and too_long == "error":
        from tasks.base import BadInput

        i = too_long_rows[0]
        raise BadInput(what, f"row {i + 1}", f"at most max_length={max_length} tokens, got {lengths[i]} "
                       f"({len(too_long_rows)} rows are longer; too_long: truncate or drop accepts them)")
    if too_long == "drop":
        dropped = set(too_long_rows)
        return [i for i in range(len(lengths)) if i not in dropped], {"dropped_too_long": float(len(dropped))}
    return list(range(len(lengths))), {"truncated": float(len(too_long_rows))}


def truncate(example: dict, max_length: int) -> dict:
    """An encoded example (tasks.models.encode_examples) cut to max_length: the response loses its tail."""
    return {"input_ids": example["input_ids"][:max_length], "labels": example["labels"][:max_length]}


def is_main_process() -> bool:
    """Whether this process writes the stage's artifact: true except in the processes of rank > 0
    of a multi-process launch (tasks/train/launch.py), which train beside it and write nothing."""
    from tasks.train.launch import RANK_VARIABLE

    return int(os.environ.get(RANK_VARIABLE, "0")) == 0


def shard(batch: list, rank: int, world: int) -> list:
    """Process `rank`'s contiguous part of a global batch; the parts' sizes differ by at most one."""
    base, extra = divmod(len(batch), world)
    start = rank * base + min(rank, extra)
    return batch[start : start + base + (rank < extra)]


def micro_batches(items: list, size: int | None) -> list[list]:
    """`items` cut into consecutive micro-batches of at most `size` (None: one)."""
    size = size or len(items) or 1
    return [items[i : i + size] for i in range(0, len(items), size)]


# ---- one optimizer step ---------------------------------------------------------------------


def make_optimizer(parameters: list, *, lr: float, weight_decay: float, lr_scheduler: str, warmup_ratio: float,
                   total_steps: int):
    """AdamW over `parameters` and transformers' `get_scheduler(lr_scheduler)` over `total_steps`
    optimizer steps, the first `warmup_ratio` of them warming up."""
    from transformers import get_scheduler

    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=weight_decay)
    scheduler = get_scheduler(lr_scheduler, optimizer, num_warmup_steps=int(warmup_ratio * total_steps),
                              num_training_steps=total_steps)
    return optimizer, scheduler


def accumulate(accelerator: Accelerator, model, parts: list[tuple[dict, float]], compute_loss, step: int) -> dict[str, float]:
    """Forward and backward over the micro-batches of one optimizer step; the step's metrics.

    parts: (micro-batch, share), share = the micro-batch's weight over the whole step's (summed
    over every process's micro-batches), e.g. its examples / the step's examples. `compute_loss`
    returns a mean over its micro-batch; backpropagating loss * share sums to the gradient of the
    step's mean. DDP averages gradients over the N processes, hence the factor N; it synchronises
    on the last micro-batch only. Metrics are share-weighted sums, so the step's means.
    """
    world = accelerator.num_processes
    sums: dict[str, torch.Tensor] = {}
    for i, (batch, share) in enumerate(parts):
        sync = contextlib.nullcontext() if i == len(parts) - 1 else accelerator.no_sync(model)
        with sync:
            with accelerator.autocast():
                loss, metrics = compute_loss(model, batch)
            accelerator.backward(loss * (share * world))
        for name, value in {"loss": loss, **metrics}.items():
            sums[name] = sums.get(name, 0.0) + torch.as_tensor(value).detach().double().cpu().reshape(()) * share
    names = list(sums)
    values = torch.stack([sums[k] for k in names]) if names else torch.zeros(0, dtype=torch.float64)
    if world > 1:
        values = accelerator.reduce(values.to(accelerator.device), "sum").cpu()
    metrics = dict(zip(names, values.tolist()))
    if not math.isfinite(metrics["loss"]):
        raise NonFiniteError(f"training step {step}: the loss is {metrics['loss']} (lower lr, or check the data); "
                             "nothing was saved")
    return metrics


def optimizer_step(accelerator: Accelerator, optimizer, scheduler, parameters: list, grad_clip: float | None,
                   step: int) -> float:
    """Clip the gradients, step the optimizer and the schedule; stop on a non-finite weight.
    Returns the learning rate this step used (what the loops log as `learning_rate`)."""
    used = scheduler.get_last_lr()[0]
    if grad_clip:
        accelerator.clip_grad_norm_(parameters, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    # A sum is non-finite when any term is (nan, inf); in float32, weights of any trained scale do
    # not overflow it. It reads each weight once and builds no mask (SmolLM2-135M, 1 thread: 0.03 s, not 0.6).
    finite = torch.stack([p.detach().sum(dtype=torch.float32) for p in parameters]).isfinite().all() if parameters else True
    if not bool(finite):
        raise NonFiniteError(f"training step {step}: the weights are no longer finite (lower lr); nothing was saved")
    return used


def verify_fast_paths(accelerator: Accelerator, model, when: str) -> None:
    """Probe the log-prob fast paths again on the weights as trained so far (tasks/logps.py's
    `recheck`): before each checkpoint and before the trained model is returned, so that neither
    is written from a path that no longer gives the plain numbers (FastPathDrift; the stage is then
    recomputed on the plain path: tasks/logps_report.py). Not under FSDP or DeepSpeed, where each
    process holds a part of the weights."""
    if accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return
    from tasks.logps import recheck

    recheck(accelerator.unwrap_model(model), when)


# ---- checkpoints ----------------------------------------------------------------------------

CHECKPOINT_STATE = "alignflow_state.json"  # beside accelerate's files: step, metric history, setup


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint under `folder` (step-N folders; complete once renamed into place)."""
    if folder is None or not folder.is_dir():
        return None
    done = [p for p in folder.glob("step-*") if (p / CHECKPOINT_STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, state: dict) -> None:
    """accelerate's save_state (prepared models and optimizer, registered objects such as the
    schedule, each process's RNG states; sharded under FSDP/DeepSpeed) into a temporary folder,
    renamed into place when every process is done: a reader sees the previous checkpoint or this
    one, never half of one."""
    tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_STATE).write_text(json.dumps({"step": step, **state}))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def resume(accelerator: Accelerator, folder: Path | None, setup: dict, log_metrics) -> tuple[int, list]:
    """Restore the newest checkpoint under `folder` taken with the same `setup`, if any: (the step
    it was taken after, the metric history), the history logged again so MLflow shows the whole curve."""
    found = latest_checkpoint(folder)  # an earlier attempt's, whatever its checkpoint_every
    if found is None:
        return 0, []
    state = json.loads((found / CHECKPOINT_STATE).read_text())
    if state.get("setup") != setup:
        warnings.warn(f"{found}: a checkpoint of another setup ({state.get('setup')}, now {setup}); training from the start")
        return 0, []
    accelerator.load_state(str(found))
    for row in state["history"]:
        log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
    return state["step"], state["history"]


# ---- the offline loop -----------------------------------------------------------------------


def train(
    model: torch.nn.Module,
    examples: list,
    collate_fn: Callable[[list], dict],
    compute_loss: Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]],
    *,
    epochs: float,
    lr: float,
    batch_size: int,
    seed: int,
    micro_batch_size: int | None = None,
    max_steps: int | None = None,
    lr_scheduler: str = "linear",
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    dtype: str = "auto",
    lengths: list[int] | None = None,
    gradient_checkpointing: bool = False,
    grad_clip: float | None = 1.0,
    log_metrics: Callable[[dict[str, float], int], None] = no_metrics,
    progress=no_progress,
    batch_weight: Callable[[dict], torch.Tensor | float] | None = None,
    checkpoints: Path | None = None,
    checkpoint_every: int | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train `model` in place; returns it (unwrapped) and the mean metrics of the last epoch.

    `batch_size` examples per optimizer step, in micro-batches of `micro_batch_size` (gradient
    accumulation); `max_steps` optimizer steps, or `epochs` passes (fractional: 0.5 = half the data
    once). With `lengths` (one per example), batches group examples of similar length. Only
    parameters that require grad are trained (a LoRA model's adapters).

    Each micro-batch's loss is weighted by its share of the step's batch: `batch_weight(batch)`
    (default: its number of examples; SFT weights by response tokens, as its loss is a token mean).

    Several processes (under `accelerate launch`, tasks/train/launch.py): `batch_size` stays the
    global batch; every process draws the same global batches and takes its part of each, so the
    steps and results are those of one process (up to rounding).

    With `checkpoints` and `checkpoint_every`, a checkpoint every that many steps; a run that finds
    one resumes from it: the same weights, optimizer, schedule, RNG states and batch order, and
    `log_metrics` gets the metric history again.
    """
    from tasks.train.launch import RANK_VARIABLE

    set_seed(seed)
    accelerator = make_accelerator(dtype)
    world, rank = accelerator.num_processes, accelerator.process_index
    launched = int(os.environ.get("WORLD_SIZE", "1")) if RANK_VARIABLE in os.environ else world
    if launched != world:  # each would train alone on the whole data, and all write the same checkpoints
        raise RuntimeError(f"{launched} processes were launched, but accelerate set up {world} "
                           f"({accelerator.distributed_type}): check the accelerate config")
    if world > 1:  # each process its own dropout masks (seed + rank); process 0's as with one process
        set_seed(seed, device_specific=True)
    batches = LengthGroupedBatches(lengths, batch_size, seed, n=len(examples))  # global batches, the same in every process
    steps_per_epoch = len(batches)
    total_steps = max_steps or max(1, math.ceil(epochs * steps_per_epoch))
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer, scheduler = make_optimizer(trainable, lr=lr, weight_decay=weight_decay, lr_scheduler=lr_scheduler,
                                          warmup_ratio=warmup_ratio, total_steps=total_steps)
    # Sharded (FSDP, DeepSpeed): the main process keeps a CPU copy to gather the trained weights into.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    gathered = copy.deepcopy(model.cpu()) if sharded and accelerator.is_main_process else None  # prepare moves `model` back
    if accelerator.state.deepspeed_plugin is not None:  # its batch size comes from here, not a prepared loader
        config = accelerator.state.deepspeed_plugin.deepspeed_config
        if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
            config["train_micro_batch_size_per_gpu"] = micro_batch_size or batch_size // world
    # Not the scheduler: it steps once per optimizer step, here, whatever the process count.
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if sharded:
        trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP's own parameters

    def step_parts(batch: list[int]) -> list[tuple[dict, float]]:
        """This process's micro-batches of a global batch, each with its share of the whole."""
        part = shard(batch, rank, world)
        # An empty part (a last batch smaller than the process count) runs its batch's first
        # example with weight 0: every process must run the step (DDP needs every backward).
        chunks = micro_batches(part or batch[:1], micro_batch_size)
        collated = [collate_fn([examples[i] for i in chunk]) for chunk in chunks]
        collated = [{k: v.to(accelerator.device) if isinstance(v, torch.Tensor) else v for k, v in b.items()} for b in collated]
        weights = [(float(batch_weight(b)) if batch_weight is not None else float(len(c))) if part else 0.0
                   for b, c in zip(collated, chunks)]
        total = torch.tensor(sum(weights), dtype=torch.float64, device=accelerator.device)
        total = float(accelerator.reduce(total, "sum")) if world > 1 else float(total)
        return [(b, w / total if total > 0 else 0.0) for b, w in zip(collated, weights)]

    setup = {"processes": world, "distributed_type": str(accelerator.distributed_type), "total_steps": total_steps}
    start, history = resume(accelerator, checkpoints, setup, log_metrics)
    checkpointing = checkpoints is not None and checkpoint_every is not None

    model.train()
    with progress("training" + (f" (resumed after step {start})" if start else ""), total=total_steps) as bar:
        bar.advance(start)
        epoch_batches: dict[int, list] = {}
        for step in range(start, total_steps):
            epoch, position = divmod(step, steps_per_epoch)
            if epoch not in epoch_batches:
                epoch_batches = {epoch: batches.of_epoch(epoch)}
            metrics = accumulate(accelerator, model, step_parts(epoch_batches[epoch][position]), compute_loss, step + 1)
            metrics["learning_rate"] = optimizer_step(accelerator, optimizer, scheduler, trainable, grad_clip, step + 1)
            log_metrics(metrics, step + 1)
            history.append({"step": step + 1, **metrics})
            bar.advance()
            if checkpointing and (step + 1) % checkpoint_every == 0 and step + 1 < total_steps:
                verify_fast_paths(accelerator, model, f"training step {step + 1}")
                save_checkpoint(accelerator, checkpoints, step + 1, {"history": history, "setup": setup})

    verify_fast_paths(accelerator, model, f"the end of training (step {total_steps})")
    model = _trained_model(accelerator, model, gathered)
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    model.eval()
    # The mean of each metric over the last epoch's steps.
    last_epoch = [row for row in history if row["step"] > (total_steps - 1) // steps_per_epoch * steps_per_epoch]
    names = [k for k in last_epoch[0] if k not in ("step", "learning_rate")]
    return model, {k: sum(row[k] for row in last_epoch) / len(last_epoch) for k in names}


def _trained_model(accelerator: Accelerator, model, gathered):
    """The trained model, unwrapped. Sharded (FSDP, DeepSpeed): every process takes part in
    gathering the full weights, which the main process loads into its CPU copy `gathered`."""
    if accelerator.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        return accelerator.unwrap_model(model)
    state = accelerator.get_state_dict(model)  # collective; the full weights on the main process
    if gathered is None:
        return accelerator.unwrap_model(model)
    missing, unexpected = gathered.load_state_dict(state, strict=False)
    params = dict(gathered.named_parameters(remove_duplicate=False))
    loaded = {id(q) for name, q in params.items() if name not in missing}
    untied = [name for name in missing if name not in params or id(params[name]) not in loaded]  # tied: loaded as the other name
    if unexpected or untied:
        raise RuntimeError(f"gathering the trained weights: missing {untied[:5]}, unexpected {unexpected[:5]}")
    return gathered
