"""sft: supervised fine-tuning, next-token NLL on the response tokens only."""
from __future__ import annotations

from typing import Literal


from tasks.base import BadInput, Ref, StageContext, stage_kind
from tasks.train import TrainParams
from tasks.train.launch import multiprocess


class SFTParams(TrainParams):
    kind: Literal["sft"] = "sft"
    model: Ref("model")
    data: Ref("table")  # prompt, response


def sft_loss(model, batch):
    """Mean NLL over the batch's response tokens (prompt and padding are labelled -100)."""
    from tasks.logps import sequence_logps

    logps, n_tokens = sequence_logps(model, **batch)
    return -logps.sum() / n_tokens.sum().clamp(min=1), {}


def response_tokens(batch):
    """A batch's share of the global batch under several processes: sft_loss is a mean over tokens."""
    from tasks.models import IGNORE

    return (batch["labels"][:, 1:] != IGNORE).sum()


@stage_kind("sft", SFTParams, output="model")
@multiprocess
def sft(ctx: StageContext) -> dict[str, float]:
    import sys
    from functools import partial

    from tasks.models import collate, encode_examples, load_causal_lm, screen_texts
    from tasks.tables import read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, is_main_process, train, truncate

    p: SFTParams = ctx.params
    table = read_table(ctx.inputs["data"], ["prompt", "response"], what="sft data")
    model, tokenizer = load_causal_lm(ctx.inputs["model"])
    columns = {c: table.column(c).to_pylist() for c in ("prompt", "response")}
    rows, screen_metrics = screen_texts(tokenizer, columns, str(ctx.inputs["data"]), strict=False)  # see screen_texts
    if not rows:
        raise BadInput(str(ctx.inputs["data"]), "rows", "examples whose texts have tokens under the model's tokenizer")
    full = encode_examples(tokenizer, [columns["prompt"][i] for i in rows], [columns["response"][i] for i in rows], sys.maxsize)
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
        log_metrics=ctx.log_metrics, progress=ctx.progress, batch_weight=response_tokens,
        checkpoints=ctx.checkpoints, checkpoint_every=p.checkpoint_every,
    )
    metrics.update(data_metrics, **screen_metrics)
    if is_main_process():
        metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["model"]))
    return metrics
