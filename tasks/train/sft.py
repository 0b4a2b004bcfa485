"""sft: supervised fine-tuning, next-token NLL on the response tokens only."""
from __future__ import annotations

from typing import Literal


from tasks.base import Ref, StageContext, stage_kind
from tasks.train import TrainParams


class SFTParams(TrainParams):
    kind: Literal["sft"] = "sft"
    model: Ref("model")
    data: Ref("table")  # prompt, response


def sft_loss(model, batch):
    """Mean NLL over the batch's response tokens (prompt and padding are labelled -100)."""
    from tasks.models import sequence_logps

    logps, n_tokens = sequence_logps(model, **batch)
    return -logps.sum() / n_tokens.sum().clamp(min=1), {}


@stage_kind("sft", SFTParams, output="model")
def sft(ctx: StageContext) -> dict[str, float]:
    import sys
    from functools import partial

    from tasks.models import collate, encode_examples, load_causal_lm
    from tasks.tables import read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, train, truncate

    p: SFTParams = ctx.params
    table = read_table(ctx.inputs["data"], ["prompt", "response"], what="sft data")
    model, tokenizer = load_causal_lm(ctx.inputs["model"])
    full = encode_examples(tokenizer, table.column("prompt").to_pylist(), table.column("response").to_pylist(), sys.maxsize)
    lengths = [len(e["input_ids"]) for e in full]
    keep, data_metrics = fit_to_length(lengths, p.max_length, p.too_long, str(ctx.inputs["data"]))
    examples = [truncate(full[i], p.max_length) for i in keep]
    if p.lora is not None:
        model = add_lora(model, p.lora, ctx.seed)
    model, metrics = train(
        model, examples, partial(collate, pad_id=tokenizer.pad_token_id), sft_loss,
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=ctx.seed,
        warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
        lengths=[lengths[i] for i in keep] if p.group_by_length else None,
        gradient_checkpointing=p.gradient_checkpointing,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
    )
    metrics.update(data_metrics)
    metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["model"]))
    return metrics
