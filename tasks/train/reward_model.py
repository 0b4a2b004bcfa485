"""reward_model: a Bradley-Terry reward model (sequence-classification head, one score).

The loss per pair is tasks.train.losses.bradley_terry_loss: -log sigmoid(chosen - rejected - margin),
with Llama 2's margin from the data's `margin` column when `margin: true`, plus
center_rewards_coefficient * (chosen + rejected)^2 (Eisenstein et al. 2023; trl's RewardTrainer).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import BadInput, OptionalRef, Ref, StageContext, stage_kind
from tasks.train import TrainParams
from tasks.train.launch import multiprocess


class RewardModelParams(TrainParams):
    kind: Literal["reward_model"] = "reward_model"
    model: Ref("model")  # its body initialises the reward model; the score head is fresh
    data: Ref("table")  # prompt, chosen, rejected
    eval_data: OptionalRef("table") = None
    margin: bool = Field(
        False,
        description="use the tables' `margin` column as each pair's margin: -log sigmoid(chosen - rejected - margin) (Llama 2)",
    )
    center_rewards_coefficient: float = Field(
        0.0, ge=0, description="add this times (chosen + rejected)^2 per pair: pulls scores towards mean zero (Eisenstein et al. 2023)"
    )


def pair_margins(table, name: str, path) -> list[float]:
    """The `margin` column (one float per pair), or a BadInput naming the table."""
    if "margin" not in table.column_names:
        raise BadInput(
            str(path), "margin",
            f"a 'margin' column in table {name!r} (margin: true uses it as each pair's margin); it has {table.column_names}",
        )
    margins = table.column("margin").to_pylist()
    for i, m in enumerate(margins):
        if not isinstance(m, (int, float)) or isinstance(m, bool) or m != m:
            raise BadInput(str(path), f"row {i + 1}: margin", f"a number in table {name!r}, got {m!r}")
    return [float(m) for m in margins]


def pair_examples(tokenizer, table, max_length: int, margins: list[float] | None = None) -> list[dict]:
    from tasks.models import encode_examples

    prompts = table.column("prompt").to_pylist()
    chosen = encode_examples(tokenizer, prompts, table.column("chosen").to_pylist(), max_length)
    rejected = encode_examples(tokenizer, prompts, table.column("rejected").to_pylist(), max_length)
    examples = [{"chosen": c["input_ids"], "rejected": r["input_ids"]} for c, r in zip(chosen, rejected)]
    if margins is not None:
        for example, m in zip(examples, margins, strict=True):
            example["margin"] = m
    return examples


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen then rejected in one right-padded batch of 2B sequences (one forward pass); with
    margins, a (B,) float tensor `margin` too."""
    import torch

    from tasks.models import pad

    sequences = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    batch = {"input_ids": pad(sequences, pad_id), "attention_mask": pad([[1] * len(s) for s in sequences], 0)}
    if "margin" in examples[0]:
        batch["margin"] = torch.tensor([e["margin"] for e in examples], dtype=torch.float32)
    return batch


def pair_scores(model, batch):
    scores = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, 0].float()
    return scores.chunk(2)  # chosen, rejected


def pair_losses(chosen, rejected, batch, center_rewards_coefficient: float = 0.0):
    """Per-pair Bradley-Terry losses (B,), with the batch's margins if it has them."""
    from tasks.train.losses import bradley_terry_loss

    margin = batch.get("margin")
    return bradley_terry_loss(
        chosen, rejected, None if margin is None else margin.float(), center_coefficient=center_rewards_coefficient
    )


def bt_step(model, batch, center_rewards_coefficient: float = 0.0):
    chosen, rejected = pair_scores(model, batch)
    loss = pair_losses(chosen, rejected, batch, center_rewards_coefficient).mean()
    return loss, {"accuracy": (chosen > rejected).float().mean()}


def evaluate_pairs(
    model, examples: list[dict], pad_id: int, batch_size: int = 128, center_rewards_coefficient: float = 0.0
) -> dict[str, float]:
    """Accuracy (fraction with chosen scored above rejected) and mean BT loss (the training loss) on pairs."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    correct, losses = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(examples[start : start + batch_size], pad_id).items()}
            chosen, rejected = pair_scores(model, batch)
            correct += (chosen > rejected).tolist()
            losses += pair_losses(chosen, rejected, batch, center_rewards_coefficient).tolist()
    return {"accuracy": sum(correct) / len(correct), "loss": sum(losses) / len(losses)}


@stage_kind("reward_model", RewardModelParams, output="reward_model")
@multiprocess
def reward_model(ctx: StageContext) -> dict[str, float]:
    import sys
    from functools import partial

    import torch

    from tasks.models import load_reward_model
    from tasks.tables import TABLE_FILE, read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, is_main_process, train

    p: RewardModelParams = ctx.params
    columns = ["prompt", "chosen", "rejected"]

    def load_pairs(name: str, table_name: str, max_length: int) -> list[dict]:
        table = read_table(ctx.inputs[name], columns, what=f"reward model {name}")
        margins = pair_margins(table, table_name, ctx.inputs[name] / TABLE_FILE) if p.margin else None
        return pair_examples(tokenizer, table, max_length, margins)

    torch.manual_seed(ctx.seed)  # the fresh score head's init follows the stage's seed
    model, tokenizer = load_reward_model(ctx.inputs["model"])
    full = load_pairs("data", p.data, sys.maxsize)
    lengths = [max(len(e["chosen"]), len(e["rejected"])) for e in full]
    keep, data_metrics = fit_to_length(lengths, p.max_length, p.too_long, str(ctx.inputs["data"]))
    examples = [{**full[i], "chosen": full[i]["chosen"][: p.max_length], "rejected": full[i]["rejected"][: p.max_length]} for i in keep]
    if p.lora is not None:  # SEQ_CLS: the fresh score head trains in full beside the adapters
        model = add_lora(model, p.lora, ctx.seed, task_type="SEQ_CLS")
    model, metrics = train(
        model, examples, partial(collate_pairs, pad_id=tokenizer.pad_token_id),
        partial(bt_step, center_rewards_coefficient=p.center_rewards_coefficient),
        **p.loop_options(), seed=ctx.seed,
        lengths=[lengths[i] for i in keep] if p.group_by_length else None,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
        checkpoints=ctx.checkpoints, checkpoint_every=p.checkpoint_every,
    )
    metrics.update(data_metrics)
    if not is_main_process():  # another process of a multi-process launch: rank 0 evaluates and saves
        return metrics
    if p.eval_data is not None:
        eval_examples = load_pairs("eval_data", p.eval_data, p.max_length)
        evaluation = evaluate_pairs(model, eval_examples, tokenizer.pad_token_id, center_rewards_coefficient=p.center_rewards_coefficient)
        metrics.update({"eval_accuracy": evaluation["accuracy"], "eval_loss": evaluation["loss"]})
    metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["model"]))
    return metrics
