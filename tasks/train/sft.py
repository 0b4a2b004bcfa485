"""sft: supervised fine-tuning, next-token NLL on the response tokens only.

The data is (prompt, response) rows, or a `messages` column (trl's conversational SFT format: a
list of {role, content} messages per row), rendered by the model's chat template with the loss
on the assistant turns only.
"""
from __future__ import annotations

from typing import Literal


from tasks.base import BadInput, Ref, StageContext, stage_kind
from tasks.logps_report import reports_logps
from tasks.train import TrainParams
from tasks.train.launch import multiprocess


class SFTParams(TrainParams):
    kind: Literal["sft"] = "sft"
    model: Ref("model")
    data: Ref("table")  # prompt, response; or messages


def encode_conversation(tokenizer, messages) -> dict:
    """A conversation as {"input_ids", "labels"}: the chat template's rendering of all of it,
    labelled on the assistant turns (each turn's text and its end-of-turn), -100 elsewhere.

    An assistant turn spans from the end of the conversation before it, rendered with the
    generation prompt, to the end of the conversation up to it (less trailing whitespace); the
    tokens whose text starts in such a span are labelled (a fast tokenizer's offsets).
    """
    from tasks.models import IGNORE, chat_prompt_text

    messages = [dict(m) for m in messages]
    full = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        before = chat_prompt_text(tokenizer, messages[:i]) if i else ""
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ValueError("the chat template does not render a conversation as each turn's text after the "
                             "turns before it: the assistant turns cannot be found in it")
        spans.append((len(before), len(upto.rstrip())))
    if not spans:
        raise ValueError("a conversation with no assistant message: nothing to learn")
    encoded = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    labels = [token if any(start <= begin < end for start, end in spans) else IGNORE
              for token, (begin, _) in zip(encoded["input_ids"], encoded["offset_mapping"])]
    return {"input_ids": list(encoded["input_ids"]), "labels": labels}


def encode_sft_data(tokenizer, table, file: str) -> tuple[list[dict], dict[str, float]]:
    """Every row encoded at full length, and the screening metrics: a `messages` column through
    encode_conversation, else (prompt, response) through encode_examples, rows whose texts have no
    tokens dropped (tasks.models.screen_texts)."""
    import sys

    from tasks.models import encode_examples, screen_texts

    if "messages" not in table.column_names:
        from tasks.tables import require_columns

        require_columns(table, ["prompt", "response"], "sft data (or a messages column)")
        columns = {c: table.column(c).to_pylist() for c in ("prompt", "response")}
        rows, metrics = screen_texts(tokenizer, columns, file, strict=False)
        if not rows:
            raise BadInput(file, "rows", "examples whose texts have tokens under the model's tokenizer")
        return encode_examples(tokenizer, [columns["prompt"][i] for i in rows],
                               [columns["response"][i] for i in rows], sys.maxsize), metrics
    if not getattr(tokenizer, "chat_template", None) or not tokenizer.is_fast:
        raise BadInput(file, "messages", "a model whose tokenizer has a chat template (and is a fast tokenizer): "
                                         "conversations are rendered with it")
    examples = []
    for row, messages in enumerate(table.column("messages").to_pylist(), start=1):
        try:
            examples.append(encode_conversation(tokenizer, messages or []))
        except (ValueError, KeyError, TypeError) as e:
            raise BadInput(file, f"row {row}: messages", f"a list of {{role, content}} messages with an assistant turn ({e})") from None
    return examples, {}


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
@reports_logps
def sft(ctx: StageContext) -> dict[str, float]:
    from functools import partial

    from tasks.models import collate, load_causal_lm
    from tasks.tables import read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, is_main_process, train, truncate

    p: SFTParams = ctx.params
    table = read_table(ctx.inputs["data"])
    model, tokenizer = load_causal_lm(ctx.inputs["model"])
    full, screen_metrics = encode_sft_data(tokenizer, table, str(ctx.inputs["data"]))
    lengths = [len(e["input_ids"]) for e in full]
    keep, data_metrics = fit_to_length(lengths, p.max_length, p.too_long, str(ctx.inputs["data"]))
    examples = [truncate(full[i], p.max_length) for i in keep]
    if p.lora is not None:
        model = add_lora(model, p.lora, ctx.seed)
    model, metrics = train(
        model, examples, partial(collate, pad_id=tokenizer.pad_token_id), sft_loss,
        **p.loop_options(), seed=ctx.seed,
        lengths=[lengths[i] for i in keep] if p.group_by_length else None,
        log_metrics=ctx.log_metrics, progress=ctx.progress, batch_weight=response_tokens,
        checkpoints=ctx.checkpoints, checkpoint_every=p.checkpoint_every,
    )
    metrics.update(data_metrics, **screen_metrics)
    if is_main_process():
        metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["model"]))
    return metrics
