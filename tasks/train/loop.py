"""One training loop for every trainer (SFT, reward model, DPO), built on accelerate.

A trainer supplies the examples, how to batch them, and `compute_loss(model, batch) ->
(loss, metrics)`; the loop does the rest: seeded shuffling (length-grouped when given lengths),
AdamW with linear warmup and decay, gradient clipping, bf16 autocast on GPUs, gradient
checkpointing, per-step metrics and a progress bar.
"""
from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
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
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train `model` in place; returns it (unwrapped) and the mean metrics of the last epoch.

    `epochs` may be fractional (0.5 = half the data once). With `lengths` (one per example),
    batches group examples of similar length. Only parameters that require grad are trained
    (a LoRA model's adapters).
    """
    set_seed(seed)
    accelerator = make_accelerator()
    if lengths is not None:
        loader = DataLoader(examples, batch_sampler=LengthGroupedBatches(lengths, batch_size, seed), collate_fn=collate_fn)
    else:
        loader = DataLoader(
            examples,
            batch_size=batch_size,
            shuffle=True,
            collate_fn=collate_fn,
            generator=torch.Generator().manual_seed(seed),
        )
    total_steps = max(1, math.ceil(epochs * len(loader)))
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
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)

    model.train()
    step = 0
    last_epoch = defaultdict(list)
    with progress("training", total=total_steps) as bar:
        while step < total_steps:
            last_epoch.clear()
            for batch in loader:
                with accelerator.autocast():
                    loss, metrics = compute_loss(model, batch)
                accelerator.backward(loss)
                if grad_clip:
                    accelerator.clip_grad_norm_(trainable, grad_clip)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                metrics = {"loss": loss.item(), **{k: float(v) for k, v in metrics.items()}}
                log_metrics({**metrics, "learning_rate": scheduler.get_last_lr()[0]}, step)
                for key, value in metrics.items():
                    last_epoch[key].append(value)
                bar.advance()
                if step >= total_steps:
                    break

    model = accelerator.unwrap_model(model)
    if gradient_checkpointing:
        model.gradient_checkpointing_disable()
        model.config.use_cache = True
    model.eval()
    return model, {key: sum(values) / len(values) for key, values in last_epoch.items()}
