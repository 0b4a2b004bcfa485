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


def pair_examples(tokenizer, table, max_length: int | None) -> list[dict]:
    """Tokenized pairs, {"chosen": example, "rejected": example} (max_length None: untruncated)."""
    import sys

    from tasks.models import encode_examples

    limit = max_length or sys.maxsize
    prompts = table.column("prompt").to_pylist()
    chosen = encode_examples(tokenizer, prompts, table.column("chosen").to_pylist(), limit)
    rejected = encode_examples(tokenizer, prompts, table.column("rejected").to_pylist(), limit)
    return [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]


def response_tokens(example: dict) -> int:
    return sum(label != -100 for label in example["labels"])


def attach_reference(examples: list[dict], table, max_length: int) -> None:
    """Copy the table's reference log-probs into each example, checking they cover the same tokens."""
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


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen then rejected stacked into one batch of 2B sequences, plus the reference log-probs."""
    import torch

    from tasks.models import collate

    batch = collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


def shared_prompt_length(chosen: dict, rejected: dict) -> int:
    """How many leading tokens a pair's two sequences share as prompt (the same ids, no labels)."""
    from tasks.models import IGNORE

    n = 0
    for a, b, label_a, label_b in zip(chosen["input_ids"], rejected["input_ids"], chosen["labels"], rejected["labels"]):
        if a != b or label_a != IGNORE or label_b != IGNORE:
            break
        n += 1
    return n


def packed_length(example: dict) -> int:
    """Tokens in a pair's collate_shared_prompt row: the prompt once, then both responses."""
    chosen, rejected = example["chosen"], example["rejected"]
    return len(chosen["input_ids"]) + len(rejected["input_ids"]) - shared_prompt_length(chosen, rejected)


def collate_shared_prompt(examples: list[dict], pad_id: int) -> dict:
    """Each pair as one row: its prompt once, then the chosen response, then the rejected one.

    The prompt is computed once instead of twice, and the batch is B rows padded to the longest
    pair instead of 2B rows padded to the longest sequence. A (B, 1, W, W) boolean attention mask
    lets each response token see the prompt and its own response's earlier tokens, never the other
    response, and the rejected response's position ids restart where the prompt ends: every token
    sees what it sees in its own sequence (collate_pairs' layout), so the log-probs are the same.
    The labelled tokens are listed flat: `logp_index` (row * W + the position whose hidden state
    predicts the token: for the rejected response's first token, the prompt's last), `logp_target`
    (the token) and `logp_sequence` (0..B-1: the chosen sequences, B..2B-1: the rejected ones).
    `sequence_lengths` holds the 2B sequences' token counts, chosen then rejected.
    """
    import torch

    from tasks.models import IGNORE, pad

    n_pairs = len(examples)
    rows, positions, segments, targets, lengths = [], [], [], [], [0] * (2 * n_pairs)
    for b, e in enumerate(examples):
        chosen, rejected = e["chosen"], e["rejected"]
        p = shared_prompt_length(chosen, rejected)
        n_chosen, n_rejected = len(chosen["input_ids"]), len(rejected["input_ids"])
        rows.append(chosen["input_ids"] + rejected["input_ids"][p:])
        positions.append(list(range(n_chosen)) + list(range(p, n_rejected)))
        segments.append([0] * p + [1] * (n_chosen - p) + [2] * (n_rejected - p))  # prompt, chosen, rejected
        lengths[b], lengths[n_pairs + b] = n_chosen, n_rejected
        for k in range(1, n_chosen):  # token k is predicted at position k - 1
            if chosen["labels"][k] != IGNORE:
                targets.append((b, k - 1, chosen["labels"][k], b))
        for k in range(1, n_rejected):  # the rejected response sits after the chosen one in the row
            if rejected["labels"][k] != IGNORE:
                targets.append((b, k - 1 if k - 1 < p else n_chosen + k - 1 - p, rejected["labels"][k], n_pairs + b))
    input_ids = pad(rows, pad_id)
    width = input_ids.shape[1]
    segment = pad(segments, -1)
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    # Padding attends to itself only (a row with nothing to attend to would give NaN).
    mask = (causal & ((key == 0) | (key == query)) & (key != -1)) | torch.eye(width, dtype=torch.bool)
    flat = torch.tensor(targets, dtype=torch.long).reshape(-1, 4)
    batch = {
        "input_ids": input_ids,
        "attention_mask": mask[:, None],
        "position_ids": pad(positions, 0),
        "logp_index": flat[:, 0] * width + flat[:, 1],
        "logp_target": flat[:, 2],
        "logp_sequence": flat[:, 3],
        "sequence_lengths": torch.tensor(lengths),
    }
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


def supports_shared_prompt(model) -> bool:
    """Whether `model` can take collate_shared_prompt's rows: a decoder that takes position ids and a
    4D mask (sdpa or eager attention) and attends in full in every layer (a sliding window, or any
    other per-layer mask, would be lost under the custom mask)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    return "position_ids" in inspect.signature(base.forward).parameters


def pair_logps(model, batch: dict):
    """Summed response log-probs and response token counts of a batch's 2B sequences, chosen then
    rejected, from either layout (collate_pairs or collate_shared_prompt)."""
    import torch
    import torch.nn.functional as F

    from tasks.models import _body_and_head, head_logps, sequence_logps

    if "position_ids" not in batch:
        return sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
    mask = batch["attention_mask"]
    config = getattr(getattr(model, "module", model), "config", None)  # module: DDP's wrapped model
    if getattr(config, "_attn_implementation", None) == "eager":  # eager attention adds the mask to its scores
        mask = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": mask, "position_ids": batch["position_ids"]}
    split = _body_and_head(model)
    if split is None:  # all logits, then the labelled positions' (see tasks.models.sequence_logps)
        logits = model(**inputs).logits
        logits = logits.reshape(-1, logits.shape[-1])[batch["logp_index"]]
        token_logps = -F.cross_entropy(logits.float(), batch["logp_target"], reduction="none")
    else:  # only the labelled positions go through the output layer
        body, head = split
        hidden = body(**inputs).last_hidden_state
        token_logps = head_logps(head, hidden.reshape(-1, hidden.shape[-1])[batch["logp_index"]], batch["logp_target"])
    n_sequences, sequence = 2 * len(batch["input_ids"]), batch["logp_sequence"]
    sums = token_logps.new_zeros(n_sequences).index_add(0, sequence, token_logps)
    return sums, torch.bincount(sequence, minlength=n_sequences)


def precompute_reference(model, examples: list[dict], pad_id: int, batch_size: int, progress) -> None:
    """Reference log-probs of every pair from `model` (before training), stored in the examples."""
    import math

    import torch

    model.eval()
    device = next(model.parameters()).device
    shared = supports_shared_prompt(model)
    collate_fn = collate_shared_prompt if shared else collate_pairs

    def length(e: dict) -> int:
        return packed_length(e) if shared else max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"]))

    # Longest first, in length order: batches of similar lengths, little padding (and any OOM comes first).
    ordered = sorted(examples, key=length, reverse=True)
    with progress("reference log-probs", total=math.ceil(len(examples) / batch_size)) as bar:
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            batch = collate_fn([{"chosen": e["chosen"], "rejected": e["rejected"]} for e in chunk], pad_id)
            with torch.no_grad():
                logps, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
            for e, c, r in zip(chunk, *logps.float().cpu().chunk(2)):
                e["ref_chosen"], e["ref_rejected"] = c.item(), r.item()
            bar.advance()


def dpo_step(model, batch, loss: str, loss_params: dict, beta: float, needs_reference: bool):
    """One forward pass over chosen+rejected (either collate layout), the preference loss, and TRL-named metrics."""
    import torch
    from torch.nn.parallel import DistributedDataParallel

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
def dpo(ctx: StageContext) -> dict[str, float]:
    from functools import partial

    from tasks.models import load_causal_lm
    from tasks.tables import read_table
    from tasks.train.lora import add_lora, save_trained
    from tasks.train.loop import fit_to_length, is_main_process, train, truncate

    p: DPOParams = ctx.params
    table = read_table(ctx.inputs["pairs"], ["prompt", "chosen", "rejected"], what="pairs table")
    if not table.num_rows:
        raise ValueError("the pairs table is empty")
    has_reference = all(c in table.column_names for c in REF_COLUMNS)
    needs_reference = p.loss not in REFERENCE_FREE
    model, tokenizer = load_causal_lm(ctx.inputs["policy"])

    full = pair_examples(tokenizer, table, None)
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
        precompute_reference(reference, examples, tokenizer.pad_token_id, p.batch_size, ctx.progress)
        del reference

    if p.lora is not None:
        model = add_lora(model, p.lora, ctx.seed)
    shared = supports_shared_prompt(model)  # each pair's prompt computed once: see collate_shared_prompt
    lengths = [packed_length(e) for e in examples] if shared else [lengths[i] for i in keep]
    model, metrics = train(
        model, examples, partial(collate_shared_prompt if shared else collate_pairs, pad_id=tokenizer.pad_token_id),
        partial(dpo_step, loss=p.loss, loss_params=p.loss_params(), beta=p.beta, needs_reference=needs_reference),
        epochs=p.epochs, lr=p.lr, batch_size=p.batch_size, seed=ctx.seed,
        warmup_ratio=p.warmup_ratio, weight_decay=p.weight_decay,
        lengths=lengths if p.group_by_length else None,
        gradient_checkpointing=p.gradient_checkpointing,
        log_metrics=ctx.log_metrics, progress=ctx.progress,
        checkpoints=ctx.checkpoints, checkpoint_every=p.checkpoint_every,
    )
    metrics.update(data_metrics, pairs=float(len(examples)))
    if is_main_process():
        metrics.update(save_trained(model, tokenizer, ctx.out, p.lora, ctx.inputs["policy"]))
    return metrics
