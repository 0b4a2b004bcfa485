"""One training loop for every trainer (SFT, reward model, DPO), built on accelerate.

A trainer supplies the examples, how to batch them, and `compute_loss(model, batch) ->
(loss, metrics)`; the loop does the rest: seeded shuffling (length-grouped when given lengths),
AdamW with linear warmup and decay, gradient clipping, bf16 autocast on GPUs, gradient
checkpointing, per-step metrics and a progress bar; checkpoints to resume from; and, under
`accelerate launch` (tasks/train/launch.py), several processes sharing each global batch.
"""
from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader

from tasks.base import _no_metrics, _no_progress


def make_accelerator() -> Accelerator:
    # bf16 where the GPU supports it; full precision on CPU (bf16 autocast is slow there).
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return Accelerator(mixed_precision="bf16" if bf16 else "no")


class LengthGroupedBatches:
    """Seeded batches of examples of similar length, so little of a batch is padding.

    Each epoch shuffles, cuts the order into megabatches of `group` batches, sorts each
    megabatch by length and shuffles the resulting batches (the scheme of transformers'
    `group_by_length`): batches stay random in order and content, and padding nearly vanishes.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int, group: int = 32):
        self.lengths, self.batch_size, self.seed, self.group = lengths, batch_size, seed, group
        self.epoch = 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=generator).tolist()
        size = self.batch_size * self.group
        batches = []
        for start in range(0, len(order), size):
            mega = sorted(order[start : start + size], key=lambda i: -self.lengths[i])
            batches += [mega[i : i + self.batch_size] for i in range(0, len(mega), self.batch_size)]
        for b in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[b]


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


# ---- several processes: each takes its part of every global batch -------------------------


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


class ShardedBatches:
    """A batch sampler: this process's part of each batch of `batches` (the global batches, the
    same in every process), as (index, 1) pairs. A part that would be empty (a last batch smaller
    than the process count) is the batch's first example as (index, 0): weight 0, so that every
    process still runs the step (DDP needs every process's backward)."""

    def __init__(self, batches, rank: int, world: int):
        self.batches, self.rank, self.world = batches, rank, world

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            part = shard(list(batch), self.rank, self.world)
            yield [(i, 1) for i in part] if part else [(batch[0], 0)]


class _Weighted(torch.utils.data.Dataset):
    def __init__(self, examples: list):
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, item):
        index, weight = item
        return self.examples[index], weight


# ---- checkpoints ----------------------------------------------------------------------------

CHECKPOINT_STATE = "alignflow_state.json"  # beside accelerate's files: step, batch order, metric history


def latest_checkpoint(folder: Path | None) -> Path | None:
    """The newest complete checkpoint under `folder` (step-N folders; complete once renamed into place)."""
    if folder is None or not folder.is_dir():
        return None
    done = [p for p in folder.glob("step-*") if (p / CHECKPOINT_STATE).is_file()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator: Accelerator, folder: Path, step: int, state: dict) -> None:
    """accelerate's save_state (weights, optimizer, scheduler, each process's RNG states; sharded
    under FSDP/DeepSpeed) into a temporary folder, renamed into place when every process is done:
    a reader sees the previous checkpoint or this one, never half of one."""
    tmp, final = folder / f".tmp-step-{step}", folder / f"step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=False)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / CHECKPOINT_STATE).write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in folder.glob("step-*"):
            if old != final:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- the loop -------------------------------------------------------------------------------


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
    warmup_ratio: float = 0.1,
    weight_decay: float = 0.0,
    lengths: list[int] | None = None,
    gradient_checkpointing: bool = False,
    grad_clip: float | None = 1.0,
    log_metrics: Callable[[dict[str, float], int], None] = _no_metrics,
    progress=_no_progress,
    batch_weight: Callable[[dict], torch.Tensor | float] | None = None,
    checkpoints: Path | None = None,
    checkpoint_every: int | None = None,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train `model` in place; returns it (unwrapped) and the mean metrics of the last epoch.

    `epochs` may be fractional (0.5 = half the data once). With `lengths` (one per example),
    batches group examples of similar length. Only parameters that require grad are trained
    (a LoRA model's adapters).

    Several processes (under `accelerate launch`, tasks/train/launch.py): `batch_size` is the
    global batch; every process draws the same global batches and takes its part of each
    (ShardedBatches). `compute_loss` returns a mean over its part; the loop weights it by the
    part's share of the global batch (`batch_weight(batch)`: by default its number of examples;
    SFT weights by response tokens) so that DDP's gradient average is the gradient of the global
    batch's mean, and the logged metrics are the global batch's, as with one process.

    With `checkpoints` and `checkpoint_every`, a checkpoint every that many steps; a run that finds
    one resumes from it: the same weights, optimizer, schedule, RNG states and batch order, and
    `log_metrics` gets the metric history again (an MLflow run shows the whole curve).
    """
    from tasks.train.launch import RANK_VARIABLE

    set_seed(seed)
    accelerator = make_accelerator()
    world = accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1")) if RANK_VARIABLE in os.environ else world
    if launched != world:  # each would train alone on the whole data, and all write the same checkpoints
        raise RuntimeError(f"{launched} processes were launched, but accelerate set up {world} "
                           f"({accelerator.distributed_type}): check the accelerate config")
    if world > 1:  # each process its own dropout masks (seed + rank); process 0's as with one process
        set_seed(seed, device_specific=True)
    generator = torch.Generator().manual_seed(seed)
    # The global batches: lists of example indices, the same in every process.
    batches = LengthGroupedBatches(lengths, batch_size, seed) if lengths is not None else None
    if world == 1:
        if batches is not None:
            loader = DataLoader(examples, batch_sampler=batches, collate_fn=collate_fn)
        else:
            loader = DataLoader(examples, batch_size=batch_size, shuffle=True, collate_fn=collate_fn, generator=generator)
    else:
        if batches is None:  # drawn from `generator` exactly as the one-process DataLoader draws
            batches = DataLoader(range(len(examples)), batch_size=batch_size, shuffle=True, collate_fn=list, generator=generator)

        def collate_part(items: list) -> tuple[int, dict]:
            return sum(w for _, w in items), collate_fn([e for e, _ in items])

        loader = DataLoader(_Weighted(examples), batch_sampler=ShardedBatches(batches, accelerator.process_index, world),
                            collate_fn=collate_part)
    steps_per_epoch = len(loader)
    total_steps = max(1, math.ceil(epochs * steps_per_epoch))
    warmup_steps = int(warmup_ratio * total_steps)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)

    def lr_factor(step: int) -> float:  # linear warmup, then linear decay to 0
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    # Sharded (FSDP, DeepSpeed): the main process keeps a CPU copy to gather the trained weights into.
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    gathered = copy.deepcopy(model.cpu()) if sharded and accelerator.is_main_process else None  # prepare moves `model` back
    if world == 1:
        model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    else:
        if accelerator.state.deepspeed_plugin is not None:  # its batch size comes from here, not a prepared loader
            config = accelerator.state.deepspeed_plugin.deepspeed_config
            if config.get("train_micro_batch_size_per_gpu", "auto") == "auto":
                config["train_micro_batch_size_per_gpu"] = batch_size // world
        # Not the scheduler: accelerate would step it once per process each step.
        model, optimizer = accelerator.prepare(model, optimizer)
        accelerator.register_for_checkpointing(scheduler)
    if sharded:
        trainable = [p for p in model.parameters() if p.requires_grad]  # FSDP's own parameters

    def order_state() -> dict:  # what decides the batch order of the epoch about to start
        if isinstance(batches, LengthGroupedBatches):
            return {"epoch": batches.epoch}
        return {"generator": generator.get_state().tolist()}

    def set_order_state(state: dict) -> None:
        if "epoch" in state:
            batches.epoch = state["epoch"]
        else:
            generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))

    checkpointing = checkpoints is not None and checkpoint_every is not None
    start, skip, history, pending_rng = 0, 0, [], None
    found = latest_checkpoint(checkpoints)  # an earlier attempt's, whatever its checkpoint_every
    if found is not None:
        state = json.loads((found / CHECKPOINT_STATE).read_text())
        same_run = {"processes": world, "distributed_type": str(accelerator.distributed_type), "total_steps": total_steps}
        if all(state.get(k) == v for k, v in same_run.items()):
            accelerator.load_state(str(found))
            pending_rng = rng_state()  # set again once the resumed epoch's iterator exists (see below)
            start, skip, history = state["step"], state["position"], state["history"]
            set_order_state(state["order"])
        else:
            warnings.warn(f"{found}: a checkpoint of another setup ({ {k: state.get(k) for k in same_run} }, now {same_run}); "
                          "training from the start")

    model.train()
    step = start
    with progress("training" + (f" (resumed after step {start})" if start else ""), total=total_steps) as bar:
        if start:
            bar.advance(start)
            for row in history:  # the run's metrics so far, so that its MLflow curves are whole
                log_metrics({k: v for k, v in row.items() if k != "step"}, row["step"])
        while step < total_steps:
            order = order_state()
            for position, item in enumerate(loader):
                if position < skip:  # resuming mid-epoch: the batches before the checkpoint
                    continue
                if pending_rng is not None:  # the RNG states as they were when the checkpoint was taken
                    set_rng_state(pending_rng)
                    pending_rng = None
                if checkpointing and step > start and step % checkpoint_every == 0:
                    save_checkpoint(accelerator, checkpoints, step, {
                        "step": step, "order": order, "position": position, "history": history,
                        "processes": world, "distributed_type": str(accelerator.distributed_type), "total_steps": total_steps,
                    })
                if world == 1:
                    with accelerator.autocast():
                        loss, metrics = compute_loss(model, item)
                    accelerator.backward(loss)
                    metrics = {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
                else:
                    loss, metrics = _sharded_step(accelerator, model, item, compute_loss, batch_weight)
                if grad_clip:
                    accelerator.clip_grad_norm_(trainable, grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                log_metrics({**metrics, "learning_rate": scheduler.get_last_lr()[0]}, step)
                history.append({"step": step, **metrics, "learning_rate": scheduler.get_last_lr()[0]})
                bar.advance()
                if step >= total_steps:
                    break
            skip = 0

    model = _trained_model(accelerator, model, gathered)
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    model.eval()
    # The mean of each metric over the last epoch's steps.
    last_epoch = [row for row in history if row["step"] > (total_steps - 1) // steps_per_epoch * steps_per_epoch]
    names = [k for k in last_epoch[0] if k not in ("step", "learning_rate")]
    return model, {k: sum(row[k] for row in last_epoch) / len(last_epoch) for k in names}


def _sharded_step(accelerator: Accelerator, model, item: tuple[int, dict], compute_loss, batch_weight):
    """Forward and backward on this process's part of the global batch; the global batch's metrics.

    With w_r the weight of process r's part and L_r its mean loss, the global mean is
    sum_r w_r L_r / W (W = sum_r w_r). DDP averages gradients over the N processes, so each
    backpropagates L_r * w_r * N / W, and the average is the gradient of the global mean."""
    n_real, batch = item
    device = accelerator.device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with accelerator.autocast():
        loss, metrics = compute_loss(model, batch)
    weight = (float(batch_weight(batch)) if batch_weight is not None else float(n_real)) if n_real else 0.0
    total = float(accelerator.reduce(torch.tensor(weight, dtype=torch.float64, device=device), "sum"))
    scale = weight * accelerator.num_processes / total if total > 0 else 0.0
    accelerator.backward(loss * scale)
    values = torch.stack([loss.detach().float().reshape(()),
                          *(torch.as_tensor(v).detach().float().to(device).reshape(()) for v in metrics.values())])
    values = accelerator.reduce(values.double() * weight, "sum") / (total if total > 0 else 1.0)
    return loss, dict(zip(["loss", *metrics], values.tolist()))


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
