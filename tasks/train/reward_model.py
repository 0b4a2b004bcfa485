"""reward_model: a Bradley-Terry reward model (sequence-classification head, one score)."""
from __future__ import annotations

from typing import Literal


from tasks.base import OptionalRef, Ref, StageContext, stage_kind
from tasks.train import TrainParams


class RewardModelParams(TrainParams):
    kind: Literal["reward_model"] = "reward_model"
    model: Ref("model")  # its body initialises the reward model; the score head is fresh
    data: Ref("table")  # prompt, chosen, rejected
    eval_data: OptionalRef("table") = None


def pair_examples(tokenizer, table, max_length: int) -> list[dict]:
    from tasks.models import encode_examples

    prompts = table.column("prompt").to_pylist()
    chosen = encode_examples(tokenizer, prompts, table.column("chosen").to_pylist(), max_length)
    rejected = encode_examples(tokenizer, prompts, table.column("rejected").to_pylist(), max_length)
    return [{"chosen": c["input_ids"], "rejected": r["input_ids"]} for c, r in zip(chosen, rejected)]


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen then rejected in one right-padded batch of 2B sequences (one forward pass)."""
    from tasks.models import pad

    sequences = [e["chosen"] for e in examples] + [e["rejected"] for e in examples]
    return {"input_ids": pad(sequences, pad_id), "attention_mask": pad([[1] * len(s) for s in sequences], 0)}


def pair_scores(model, batch):
    scores = model(**batch).logits[:, 0].float()
    return scores.chunk(2)  # chosen, rejected


def bt_step(model, batch):
    from tasks.train.losses import bradley_terry_loss

    chosen, rejected = pair_scores(model, batch)
    return bradley_terry_loss(chosen, rejected).mean(), {"accuracy": (chosen > rejected).float().mean()}


def evaluate_pairs(model, examples: list[dict], pad_id: int, batch_size: int = 128) -> dict[str, float]:
    """Accuracy (fraction with chosen scored above rejected) and mean BT loss on pairs."""
    import torch

    from tasks.train.losses import bradley_terry_loss

    model.eval()
    device = next(model.parameters()).device
    correct, losses = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = {k: v.to(device) for k, v in collate_pairs(examples[start : start + batch_size], pad_id).items()}
            chosen, rejected = pair_scores(model, batch)
            correct += (chosen > rejected).tolist()
            losses += bradley_terry_loss(chosen, rejected).tolist()
    return {"accuracy": sum(correct) / len(correct), "loss": sum(losses) / len(losses)}


@stage_kind("reward_model", RewardModelParams, output="reward_model")
def reward_model(ctx: StageContext) -> dict[str, float]:
    from functools import partial

    import torch

    from tasks.models import load_reward_model, save_model
    from tasks.tables import read_table
    from tasks.train.loop import train

    p: RewardModelParams = ctx.params
    columns = ["prompt", "chosen", "rejected"]
    torch.manual_seed(ctx.seed)  # the fresh score head's init follows the stage's seed
    model, tokenizer = load_reward_model(ctx.inputs["model"])
    examples = pair_examples(tokenizer, read_table(ctx.inputs["data"], columns, what="reward model data"), p.max_length)
    model, metrics = train(
        model, examples, partial(collate_pairs, pad_id=tokenizer.pad_token_id), bt_step,
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=ctx.seed,
        warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
    )
    if p.eval_data is not None:
        eval_examples = pair_examples(tokenizer, read_table(ctx.inputs["eval_data"], columns, what="reward model eval_data"), p.max_length)
        evaluation = evaluate_pairs(model, eval_examples, tokenizer.pad_token_id)
        metrics.update({"eval_accuracy": evaluation["accuracy"], "eval_loss": evaluation["loss"]})
    save_model(model, tokenizer, ctx.out)
    return metrics
