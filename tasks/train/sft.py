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
    from functools import partial

    from tasks.models import collate, encode_examples, load_causal_lm, save_model
    from tasks.tables import read_table
    from tasks.train.loop import train

    p: SFTParams = ctx.params
    table = read_table(ctx.inputs["data"], ["prompt", "response"], what="sft data")
    model, tokenizer = load_causal_lm(ctx.inputs["model"])
    examples = encode_examples(tokenizer, table.column("prompt").to_pylist(), table.column("response").to_pylist(), p.max_length)
    model, metrics = train(
        model, examples, partial(collate, pad_id=tokenizer.pad_token_id), sft_loss,
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=ctx.seed,
        warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
    )
    save_model(model, tokenizer, ctx.out)
    return metrics
