"""One training loop for every trainer (SFT, reward model, DPO), built on accelerate.

A trainer supplies the examples, how to batch them, and `compute_loss(model, batch) ->
(loss, metrics)`; the loop does the rest: seeded shuffling, AdamW with linear warmup and decay,
gradient clipping, bf16 autocast on GPUs, per-step metrics and a progress bar.
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
    grad_clip: float | None = 1.0,
    log_metrics: Callable[[dict[str, float], int], None] = _no_metrics,
    progress=_no_progress,
) -> tuple[torch.nn.Module, dict[str, float]]:
    """Train `model` in place; returns it (unwrapped) and the mean metrics of the last epoch.

    `epochs` may be fractional (0.5 = half the data once).
    """
    set_seed(seed)
    accelerator = make_accelerator()
    loader = DataLoader(
        examples,
        batch_size=batch_size,
        shuffle=True,
        collate_fn=collate_fn,
        generator=torch.Generator().manual_seed(seed),
    )
    total_steps = max(1, math.ceil(epochs * len(loader)))
    warmup_steps = int(warmup_ratio * total_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)

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
                    accelerator.clip_grad_norm_(model.parameters(), grad_clip)
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
    model.eval()
    return model, {key: sum(values) / len(values) for key, values in last_epoch.items()}
