"""sft: supervised fine-tuning, next-token NLL on the response tokens only."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from tasks.base import Ref, StageContext, StageParams, stage_kind


class SFTParams(StageParams):
    kind: Literal["sft"] = "sft"
    model: Ref("model")
    data: Ref("table")  # prompt, response
    epochs: float = Field(1.0, gt=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(16, ge=1)
    max_length: int = Field(512, ge=2)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)


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
