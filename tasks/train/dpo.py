"""dpo: offline preference training on a pairs table: DPO and its relatives, one loss per name.

The losses live side by side in tasks/train/losses.py: `dpo` (Rafailov et al. 2023; cDPO with
label_smoothing), `ipo`, `hinge` (RSO), `slic` (SLiC-HF) and `rrhf` (pairwise). This module
batches pairs, runs chosen and rejected through the policy in one forward pass (each pair as one
row with its prompt computed once, where the model allows it: collate_shared_prompt), and logs
TRL's metric names.

Where the reference log-probs come from, for the losses that use them (dpo, ipo, hinge):
1. the pairs table's columns (a `pairs` stage with `reference`, or a `ref_logps` stage): computed
   once, cached, shared by every loss and beta trained on those pairs;
2. else, with LoRA: the policy with its adapter disabled, on the fly (no second model in memory);
3. else: computed here before training, from `reference` (default: the policy as it starts).
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.base import BadInput, OptionalRef, Ref, StageContext, stage_kind
from tasks.logps_report import reports_logps
from tasks.train import TrainParams
from tasks.train.launch import multiprocess

REF_COLUMNS = ["ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens"]
REFERENCE_FREE = ("slic", "rrhf")


class DPOParams(TrainParams):
    kind: Literal["dpo"] = "dpo"
    policy: Ref("model")
    pairs: Ref("table")  # prompt, chosen, rejected (+ reference log-probs: see the module docstring)
    reference: OptionalRef("model") = Field(None, description="when the pairs hold no reference log-probs; default: the policy")
    loss: Literal["dpo", "ipo", "hinge", "slic", "rrhf"] = "dpo"
    beta: float = Field(0.1, gt=0, description="dpo, ipo, hinge; also scales the logged implicit rewards")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO; loss dpo only")
    delta: float = Field(1.0, gt=0, description="SLiC-HF's margin; loss slic only")
    sft_weight: float = Field(0.0, ge=0, description="adds the chosen response's mean NLL")
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(16, ge=1, description="pairs per step")
    max_length: int = Field(512, ge=2, description="must match the pairs stage's max_length")
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompts longer than this lose their beginning (bos kept); must match the pairs stage's"
    )
    strict: bool = Field(False, description="a text that tokenizes to nothing is an error, not a dropped pair")

    @model_validator(mode="after")
    def _loss_specific_params(self):
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"label_smoothing applies to loss 'dpo' only, not {self.loss!r}")
        if "delta" in self.model_fields_set and self.loss != "slic":
            raise ValueError(f"delta applies to loss 'slic' only, not {self.loss!r}")
        return self

    def loss_params(self) -> dict[str, float]:
        params = {"sft_weight": self.sft_weight}
        if self.loss in ("dpo", "ipo", "hinge"):
            params["beta"] = self.beta
        if self.loss == "dpo":
            params["label_smoothing"] = self.label_smoothing
        if self.loss == "slic":
            params["delta"] = self.delta
        return params


def pair_examples(tokenizer, table, max_length: int | None, max_prompt_length: int | None = None) -> list[dict]:
    """Tokenized pairs of a pairs table, {"chosen": example, "rejected": example} (max_length None: untruncated)."""
    from tasks.logps import encode_pairs

    columns = [table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")]
    return encode_pairs(tokenizer, *columns, max_length, max_prompt_length)


def attach_reference(examples: list[dict], table, max_length: int) -> None:
    """Copy the table's reference log-probs into each example, checking they cover the same tokens."""
    from tasks.logps import response_tokens

    ref = {c: table.column(c).to_pylist() for c in REF_COLUMNS}
    for i, e in enumerate(examples):
        for side in ("chosen", "rejected"):
            n_tokens = response_tokens(e[side])
            if n_tokens != ref[f"{side}_tokens"][i]:
                raise ValueError(
                    f"pairs row {i}: {side} has {n_tokens} response tokens under this policy's tokenizer and "
                    f"max_length={max_length}, but the reference log-prob covers {ref[f'{side}_tokens'][i]}; "
                    "use the same tokenizer and max_length in pairs and dpo"
                )
        e["ref_chosen"], e["ref_rejected"] = ref["ref_chosen_logp"][i], ref["ref_rejected_logp"][i]


def dpo_step(model, batch, loss: str, loss_params: dict, beta: float, needs_reference: bool):
    """One forward pass over chosen+rejected (either collate layout), the preference loss, and TRL-named metrics."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

    from tasks.logps import pair_logps
    from tasks.train.lora import reference_context
    from tasks.train.losses import PairLogps, preference_loss

    logps, n_tokens = pair_logps(model, batch)
    policy_chosen, policy_rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = n_tokens.chunk(2)
    if "ref_chosen" in batch:
        ref_chosen, ref_rejected = batch["ref_chosen"], batch["ref_rejected"]
    elif needs_reference:  # LoRA: the base model is the reference (the adapter is disabled inside DDP's wrapper)
        with torch.no_grad(), reference_context(model.module if isinstance(model, DistributedDataParallel) else model):
            ref_chosen, ref_rejected = pair_logps(model, batch)[0].chunk(2)
    else:
        ref_chosen = ref_rejected = None
    pair = PairLogps(policy_chosen, policy_rejected, ref_chosen, ref_rejected, chosen_tokens, rejected_tokens)
    losses = preference_loss(loss, pair, **loss_params)

    # Implicit rewards beta * log(pi / pi_ref), as TRL logs them; reference-free: beta * log pi.
    chosen_rewards = beta * (policy_chosen - (ref_chosen if ref_chosen is not None else 0)).detach()
    rejected_rewards = beta * (policy_rejected - (ref_rejected if ref_rejected is not None else 0)).detach()
    metrics = {
        "rewards/chosen": chosen_rewards.mean(),
        "rewards/rejected": rejected_rewards.mean(),
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
        "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
        "logps/chosen": policy_chosen.detach().mean(),
        "logps/rejected": policy_rejected.detach().mean(),
    }
    return losses.mean(), metrics


@stage_kind("dpo", DPOParams, output="model")
@multiprocess
@reports_logps
def dpo(ctx: StageContext) -> dict[str, float]:
    from functools import partial

    from tasks.logps import collate_pairs, collate_shared_prompt, fast_paths, packed_length, reference_logps
    from tasks.models import load_causal_lm, screen_texts
    from tasks.tables import read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, is_main_process, train, truncate
    from tasks.train.online import disable_dropout

    p: DPOParams = ctx.params
    table = read_table(ctx.inputs["pairs"], ["prompt", "chosen", "rejected"], what="pairs table")
    if not table.num_rows:
        raise ValueError("the pairs table is empty")
    has_reference = all(c in table.column_names for c in REF_COLUMNS)
    needs_reference = p.loss not in REFERENCE_FREE
    model, tokenizer = load_causal_lm(ctx.inputs["policy"])
    columns = {c: table.column(c).to_pylist() for c in ("prompt", "chosen", "rejected")}
    kept_rows, screen_metrics = screen_texts(tokenizer, columns, str(ctx.inputs["pairs"] / "data.parquet"), p.strict)
    table = table.take(kept_rows)
    if not table.num_rows:
        raise BadInput(str(ctx.inputs["pairs"] / "data.parquet"), "rows", "pairs whose texts have tokens under the policy's tokenizer")

    full = pair_examples(tokenizer, table, None, p.max_prompt_length)
    lengths = [max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"])) for e in full]
    keep, data_metrics = fit_to_length(lengths, p.max_length, p.too_long, str(ctx.inputs["pairs"]))
    examples = [{side: truncate(full[i][side], p.max_length) for side in ("chosen", "rejected")} for i in range(len(full))]
    for i in keep:  # a prompt that fills max_length leaves no response token to compare
        if not all(any(label != -100 for label in examples[i][side]["labels"]) for side in ("chosen", "rejected")):
            raise BadInput(str(ctx.inputs["pairs"]), f"row {i + 1}", f"a prompt shorter than max_length={p.max_length} "
                           "tokens, so that the responses keep a token (raise max_length, or too_long: drop)")
    if needs_reference and has_reference:
        attach_reference(examples, table, p.max_length)
    examples = [examples[i] for i in keep]
    if not examples:
        raise ValueError(f"no pairs left: all {len(full)} are longer than max_length={p.max_length}")
    if needs_reference and not has_reference and (p.lora is None or p.reference is not None):
        reference = model if p.reference is None else load_causal_lm(ctx.inputs["reference"])[0]
        reference_logps(reference, examples, tokenizer.pad_token_id, p.micro_batch_size or p.batch_size, ctx.progress)
        del reference

    if p.lora is not None:
        model = add_lora(model, p.lora, ctx.seed)
    # Without dropout, as trl's DPOTrainer (disable_dropout): the policy's log-probs are then those
    # the reference log-probs were computed like (eval mode), and the implicit rewards start at 0.
    disable_dropout(model)
    shared = fast_paths(model).shared_prompt  # each pair's prompt computed once, where verified
    lengths = [packed_length(e) for e in examples] if shared else [lengths[i] for i in keep]
    model, metrics = train(
        model, examples, partial(collate_shared_prompt if shared else collate_pairs, pad_id=tokenizer.pad_token_id),
        partial(dpo_step, loss=p.loss, loss_params=p.loss_params(), beta=p.beta, needs_reference=needs_reference),
        **p.loop_options(), seed=ctx.seed,
        lengths=lengths if p.group_by_length else None,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
        checkpoints=ctx.checkpoints, checkpoint_every=p.checkpoint_every,
    )
    metrics.update(data_metrics, pairs=float(len(examples)), **screen_metrics)
    if is_main_process():
        metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["policy"]))
    return metrics
