"""dpo: Direct Preference Optimization on a pairs table holding reference log-probs.

Rafailov et al. 2023. The loss lives in tasks/train/losses.py (`dpo`, `ipo`, `hinge`); this module
batches pairs, runs chosen and rejected through the policy in one forward pass, and logs TRL's
metric names.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from tasks.base import Ref, StageContext, stage_kind
from tasks.train import TrainParams

REF_COLUMNS = ["ref_chosen_logp", "ref_rejected_logp", "chosen_tokens", "rejected_tokens"]


class DPOParams(TrainParams):
    kind: Literal["dpo"] = "dpo"
    policy: Ref("model")
    pairs: Ref("table")  # prompt, chosen, rejected + reference log-probs (pairs with `reference`)
    loss: Literal["dpo", "ipo", "hinge"] = "dpo"
    beta: float = Field(0.1, gt=0)
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="cDPO; loss dpo only")
    sft_weight: float = Field(0.0, ge=0, description="adds the chosen response's mean NLL")
    lr: float = Field(1e-5, gt=0)
    batch_size: int = Field(16, ge=1, description="pairs per step")
    max_length: int = Field(512, ge=2, description="must match the pairs stage's max_length")

    @model_validator(mode="after")
    def _smoothing_is_dpo_only(self):
        if self.label_smoothing and self.loss != "dpo":
            raise ValueError(f"label_smoothing applies to loss 'dpo' only, not {self.loss!r}")
        return self


def pair_examples(tokenizer, table, max_length: int) -> list[dict]:
    """Tokenized pairs carrying their reference log-probs; token counts must match the table's."""
    from tasks.models import encode_examples

    prompts = table.column("prompt").to_pylist()
    chosen = encode_examples(tokenizer, prompts, table.column("chosen").to_pylist(), max_length)
    rejected = encode_examples(tokenizer, prompts, table.column("rejected").to_pylist(), max_length)
    ref = {c: table.column(c).to_pylist() for c in REF_COLUMNS}
    examples = []
    for i, (c, r) in enumerate(zip(chosen, rejected)):
        for side, example in (("chosen", c), ("rejected", r)):
            n_tokens = sum(label != -100 for label in example["labels"])
            if n_tokens != ref[f"{side}_tokens"][i]:
                raise ValueError(
                    f"pairs row {i}: {side} has {n_tokens} response tokens under this policy's tokenizer and "
                    f"max_length={max_length}, but the reference log-prob covers {ref[f'{side}_tokens'][i]}; "
                    "use the same tokenizer and max_length in pairs and dpo"
                )
        examples.append({"chosen": c, "rejected": r, "ref_chosen": ref["ref_chosen_logp"][i], "ref_rejected": ref["ref_rejected_logp"][i]})
    return examples


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen then rejected stacked into one batch of 2B sequences, plus the reference log-probs."""
    import torch

    from tasks.models import collate

    batch = collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
    batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


def dpo_step(model, batch, loss: str, loss_params: dict, beta: float):
    """One forward pass over chosen+rejected, the preference loss, and TRL-named metrics."""
    from tasks.models import sequence_logps
    from tasks.train.losses import PairLogps, preference_loss

    logps, n_tokens = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    policy_chosen, policy_rejected = logps.chunk(2)
    chosen_tokens, rejected_tokens = n_tokens.chunk(2)
    pair = PairLogps(policy_chosen, policy_rejected, batch["ref_chosen"], batch["ref_rejected"], chosen_tokens, rejected_tokens)
    losses = preference_loss(loss, pair, **loss_params)

    # Implicit rewards beta * log(pi / pi_ref), as TRL logs them.
    chosen_rewards = beta * (policy_chosen - batch["ref_chosen"]).detach()
    rejected_rewards = beta * (policy_rejected - batch["ref_rejected"]).detach()
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
def dpo(ctx: StageContext) -> dict[str, float]:
    from functools import partial

    from tasks.models import load_causal_lm, save_model
    from tasks.tables import read_table
    from tasks.train.loop import train

    p: DPOParams = ctx.params
    table = read_table(ctx.inputs["pairs"], ["prompt", "chosen", "rejected"], what="pairs table")
    missing = [c for c in REF_COLUMNS if c not in table.column_names]
    if missing:
        raise ValueError(f"dpo needs reference log-probs in the pairs table (missing {missing}): give the pairs stage a `reference` model")
    model, tokenizer = load_causal_lm(ctx.inputs["policy"])
    examples = pair_examples(tokenizer, table, p.max_length)

    loss_params = {"beta": p.beta, "sft_weight": p.sft_weight}
    if p.loss == "dpo":
        loss_params["label_smoothing"] = p.label_smoothing
    model, metrics = train(
        model, examples, partial(collate_pairs, pad_id=tokenizer.pad_token_id),
        partial(dpo_step, loss=p.loss, loss_params=loss_params, beta=p.beta),
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=ctx.seed,
        warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
    )
    save_model(model, tokenizer, ctx.out)
    return metrics
