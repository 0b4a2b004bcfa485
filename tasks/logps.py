"""Sequence log-probs: the one place a causal LM scores response tokens.

Every stage that needs log-probs (reference log-probs in pairs and ref_logps, dpo and its
relatives, sft, rrhf, evaluate, reward_accuracy, the online RL loop) calls this module. The plain
way runs the model and takes log_softmax of its logits at the labelled tokens. Three fast paths
give the same numbers for less memory or compute:

- response-only output layer: the body's hidden states at the labelled positions only go through
  the output layer; the (batch, length, vocabulary) logits are never built.
- chunked head (head_logps): when even those logits are large, the output layer runs on chunks of
  rows, each run again in backward (an activation checkpoint). The head is called as the module it
  is, so its own forward, hooks, a LoRA adapter on it or a quantized layer all take part.
- shared-prompt rows (collate_shared_prompt): a pair's prompt is computed once, its two
  responses kept apart by a 4D attention mask.

A fast path is taken only where it is verified (`fast_paths`): on first use for a model, it is
compared with the plain path on a small probe batch (the chunked head included: the probe runs it
in chunks of a few rows). A model whose configuration names a logit transform (LOGIT_TRANSFORMS: a
soft cap or scale after the output layer), whose logits are otherwise more than head(hidden)
(FalconH1's lm_head_multiplier), or whose layers see through the custom mask, gets the plain path.
Other fast paths (online sampling's shared prefill) are verified the same way through `verified`.

A verdict holds for the weights it was made on: training calls `recheck` at every checkpoint and
when it ends, and a path that disagrees then stops that stage's use of it (tasks/logps_report.py:
the stage is recomputed on the plain path, or fails naming the path). Every refusal is reported in
the stage that met it: a warning in its log, `logps_fallback` in its metrics, and flows tag the
MLflow run `alignflow.logps_fallback`.
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn.functional as F

from tasks import logps_report
from tasks.base import BadInput
from tasks.logps_report import FastPathDrift
from tasks.models import IGNORE, collate, encode_examples, pad

log = logps_report.log


# ---- the plain path and the output-layer fast path -------------------------------------------


def token_logps(model, inputs: dict, index: torch.Tensor, targets: torch.Tensor, head_ok: bool | None = None,
                chunk_rows: int | None = None):
    """log p(target) (float32, (N,)) at the flat positions `index` of the (B * W) positions of the
    forward pass over `inputs`: position i's output predicts targets[i]. Through the response-only
    output layer where it is verified, else from the full logits (chunk_rows: see head_logps)."""
    split = body_and_head(model) if (fast_paths(model).head if head_ok is None else head_ok) else None
    if split is None:
        logits = model(**inputs).logits
        logits = logits.reshape(-1, logits.shape[-1])[index]
        return -F.cross_entropy(logits.float(), targets, reduction="none")
    body, head = split
    hidden = body(**inputs).last_hidden_state
    return head_logps(head, hidden.reshape(-1, hidden.shape[-1])[index], targets, chunk_rows=chunk_rows)


def selected_outputs(model, inputs: dict, select):
    """(select(hidden states), output layer) where the response-only output layer is verified,
    else (select(logits), None). For callers that need more than log-probs (entropy, temperature)."""
    split = body_and_head(model) if fast_paths(model).head else None
    if split is None:
        return select(model(**inputs).logits), None
    body, head = split
    return select(body(**inputs).last_hidden_state), head


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled (response) tokens of each right-padded sequence, and how
    many there are (collate's layout)."""
    targets = labels[:, 1:]  # token t is predicted from tokens < t
    mask = targets != IGNORE
    width = input_ids.shape[1]
    rows, cols = mask.nonzero(as_tuple=True)
    index = rows * width + cols  # position cols predicts token cols + 1
    lp = token_logps(model, {"input_ids": input_ids, "attention_mask": attention_mask}, index, targets[mask])
    sums = lp.new_zeros(len(input_ids)).index_add(0, rows, lp)
    return sums, mask.sum(-1)


# float32 logits kept whole by head_logps; larger ones are chunked and recomputed in backward.
# Recomputing costs one more output-layer matmul: on SmolLM2-135M with LoRA (batch 4, ~880
# response tokens, 173 MB of logits) 8% of the tokens/s, measured on CPU; below this size the
# memory saved is small beside a step's footprint (4.4 GB there).
HEAD_CHUNK_BYTES = 256 * 2**20


def output_size(head: torch.nn.Module) -> int:
    """The vocabulary an output layer scores (nn.Linear, a peft or quantized layer around one)."""
    size = getattr(head, "out_features", None)
    return int(size) if size else int(head.weight.shape[0])


def plain_linear(head: torch.nn.Module) -> bool:
    """Whether `head` is an nn.Linear whose call is F.linear(x, weight, bias) and nothing else: not
    a subclass, no hooks (its own or global), plain tensors for weights (not quantized ones)."""
    from torch.nn.modules import module

    hooks = (head._forward_hooks, head._forward_pre_hooks, head._backward_hooks, head._backward_pre_hooks,
             module._global_forward_hooks, module._global_forward_pre_hooks)
    return type(head) is torch.nn.Linear and not any(hooks) and type(head.weight) in (torch.Tensor, torch.nn.Parameter)


def head_logits(head: torch.nn.Module, hidden: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """head(hidden) / temperature as float32. For a bias-free plain nn.Linear (every common model),
    head(h) / t == head(h / t): the (N, H) hidden states are divided, not the (N, V) logits. Any
    other head (a subclass, hooks, an adapter, a quantized layer) is called as it is."""
    if temperature == 1:
        return head(hidden).float()
    if plain_linear(head) and head.bias is None:
        return head(hidden / temperature).float()
    return head(hidden).float() / temperature


def head_logps(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
               chunk_rows: int | None = None) -> torch.Tensor:
    """log p(target) for each row of `hidden` (N, H) under the output layer `head` (at `temperature`),
    as float32 (N,): the same values as log_softmax(head(hidden) / temperature) at the targets.

    When the float32 logits would take more than HEAD_CHUNK_BYTES (or `chunk_rows` is given: the
    probe and tests), they are never kept: `head` runs on chunks of rows, each reduced to its
    targets' logits and log-sum-exp, and runs again chunk by chunk in backward. That costs one more
    output-layer matmul and saves the logits, their log-softmax and its gradient (with a 49k
    vocabulary and 1000 response tokens: one matmul of 57 GFLOP for 600 MB, of which ~260 MB at the
    step's peak, measured on CPU). A plain nn.Linear goes through _ChunkedLinearLogps, any other
    head through _ChunkedHeadLogps, which calls it as the module it is.
    """
    vocab = output_size(head)
    rows = chunk_rows or max(1, HEAD_CHUNK_BYTES // (4 * vocab))
    if len(hidden) <= rows:  # small logits: keep them, no recompute
        return -F.cross_entropy(head_logits(head, hidden, temperature), targets, reduction="none")
    if plain_linear(head) and (temperature == 1 or head.bias is None):
        scaled = hidden if temperature == 1 else hidden / temperature
        return _ChunkedLinearLogps.apply(scaled, head.weight, head.bias, targets, rows)
    trained = [q for q in head.parameters() if q.requires_grad] if torch.is_grad_enabled() else []
    return _ChunkedHeadLogps.apply(hidden, targets, head, temperature, rows, *trained)


class _ChunkedLinearLogps(torch.autograd.Function):
    """head_logps in chunks for a plain nn.Linear (F.linear is all its forward does): the
    log-softmax's gradient written in place into the recomputed logits, the weight's gradient
    accumulated in float32 with addmm_: 8% less CPU time than _ChunkedHeadLogps' generic way (11%
    with the weight frozen), on SmolLM2's output layer and 1400 rows, forward and backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, rows):
        device = hidden.device.type  # under autocast (bf16 on GPUs) the matmuls run in its dtype
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        with torch.autocast(device, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, len(hidden), rows):
                logits = F.linear(hidden[start : start + rows].to(dtype), w, b).float()
                lse[start : start + rows] = logits.logsumexp(-1)
                out[start : start + rows] = logits.gather(1, targets[start : start + rows, None])[:, 0]
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.rows, ctx.dtype = rows, dtype
        return out - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dtype, rows = ctx.dtype, ctx.rows
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_bias else None
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
            for start in range(0, len(hidden), rows):
                h, g = hidden[start : start + rows].to(dtype), grad[start : start + rows, None]
                logits = F.linear(h, w, b).float()
                # d log p(t) / d logits = onehot(t) - softmax(logits)
                d_logits = logits.sub_(lse[start : start + rows, None]).exp_().mul_(-g)
                d_logits.scatter_add_(1, targets[start : start + rows, None], g)
                if need_bias:
                    grad_bias += d_logits.sum(0)
                d_logits = d_logits.to(dtype)
                if need_hidden:
                    grad_hidden[start : start + rows] = d_logits @ w
                if need_weight and dtype == torch.float32:
                    grad_weight.addmm_(d_logits.t(), h)
                elif need_weight:
                    grad_weight += (d_logits.t() @ h).float()
        grad_weight = grad_weight.to(weight.dtype) if need_weight else None
        grad_bias = grad_bias.to(bias.dtype) if need_bias else None
        return grad_hidden, grad_weight, grad_bias, None, None


class _ChunkedHeadLogps(torch.autograd.Function):
    """head_logps in chunks, as a reentrant activation checkpoint of the output layer: forward
    without a graph, keeping each row's target logit and log-sum-exp; backward runs `head` again on
    each chunk with a graph, writes the log-softmax's gradient (onehot(t) - softmax) itself, and
    takes it back through that graph, so that whatever the head is (its own forward, hooks, a LoRA
    adapter, a quantized layer) gives the gradients of the hidden states and of its trained
    parameters (inputs of this function) that the plain path gives. Forward's autocast and random
    states are restored for the rerun (a head's dropout masks repeat)."""

    @staticmethod
    def forward(ctx, hidden, targets, head, temperature, rows, *parameters):
        device = hidden.device.type
        ctx.head, ctx.temperature, ctx.rows, ctx.parameters = head, temperature, rows, parameters
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        ctx.rng = (torch.get_rng_state(), torch.cuda.get_rng_state(hidden.device) if device == "cuda" else None)
        out = torch.empty(len(hidden), dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, len(hidden), rows):
            logits = head_logits(head, hidden[start : start + rows], temperature)
            lse[start : start + rows] = logits.logsumexp(-1)
            out[start : start + rows] = logits.gather(1, targets[start : start + rows, None])[:, 0]
        ctx.save_for_backward(hidden, targets, lse)
        return out - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, targets, lse = ctx.saved_tensors
        device, autocast, dtype = ctx.autocast
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        parameters = [q for q, needed in zip(ctx.parameters, ctx.needs_input_grad[5:]) if needed]
        grad_parameters: list[torch.Tensor | None] = [None] * len(parameters)
        cpu_rng, cuda_rng = ctx.rng
        with torch.random.fork_rng(devices=[hidden.device] if cuda_rng is not None else []), torch.enable_grad(), \
                torch.autocast(device, dtype=dtype, enabled=autocast):
            torch.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, hidden.device)
            for start in range(0, len(hidden), ctx.rows):
                h = hidden[start : start + ctx.rows].detach().requires_grad_(grad_hidden is not None)
                logits = head_logits(ctx.head, h, ctx.temperature)
                g = grad[start : start + ctx.rows, None]
                # d log p(t) / d logits = onehot(t) - softmax(logits)
                d_logits = logits.detach().sub(lse[start : start + ctx.rows, None]).exp_().mul_(-g)
                d_logits.scatter_add_(1, targets[start : start + ctx.rows, None], g)
                grads = torch.autograd.grad(logits, [h, *parameters] if grad_hidden is not None else parameters,
                                            d_logits, allow_unused=True)
                if grad_hidden is not None:
                    grad_hidden[start : start + ctx.rows], grads = grads[0], grads[1:]
                grad_parameters = [a if b is None else b if a is None else a.add_(b) for a, b in zip(grad_parameters, grads)]
        grad_parameters = iter(grad_parameters)
        return (grad_hidden, None, None, None, None,
                *(next(grad_parameters) if needed else None for needed in ctx.needs_input_grad[5:]))


# Configuration fields that change the logits after the output layer: what a scan of transformers'
# causal LMs finds (tests/test_logps.py, test_the_logit_transforms_are_every_one_transformers_has:
# the numeric configuration fields each causal LM's forward reads where it computes its logits
# from the output layer's; transformers 5.25), not a list kept by hand. No probe is needed to know
# such logits are more than head(hidden): a soft cap, in particular, is invisible at random init and
# grows with the logits. (xLSTM's max_inference_chunksize is the scan's one harmless extra: xLSTM
# soft-caps its logits too.)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "lm_head_multiplier", "logit_scale", "logits_scaling",
                    "logits_soft_cap", "max_inference_chunksize", "output_logit_soft_cap", "unpadded_vocab_size")
NEUTRAL = (None, 1, 1.0)


def _unwrapped(model):
    model = getattr(model, "module", model) if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    return model.get_base_model() if hasattr(model, "get_base_model") else model  # peft: adapters live inside


def logit_transform(model) -> str | None:
    """The configuration's field (and value) that transforms the logits after the output layer, if any."""
    config = getattr(_unwrapped(model), "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in LOGIT_TRANSFORMS:
        value = getattr(text, name, None)
        if value not in NEUTRAL:
            return f"{name} = {value}"
    return None


def body_and_head(model):
    """(transformer body, output layer) of a causal LM, or None where its logits are visibly not
    head(hidden). Not for a DDP-wrapped model: calling its inner modules would bypass gradient
    synchronisation. Whether the split is right is for `fast_paths` to verify."""
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    model = _unwrapped(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    if head is None or body is None or body is model or not isinstance(head, torch.nn.Module):
        return None
    if not (getattr(head, "out_features", None) or isinstance(getattr(head, "weight", None), torch.Tensor)):
        return None
    if logit_transform(model) is not None:
        return None
    return body, head


def shared_prompt_candidate(model) -> bool:
    """Whether `model` can take collate_shared_prompt's rows at all: a decoder that takes position
    ids and a 4D mask (sdpa or eager attention) and attends in full in every layer (a sliding window,
    or any other per-layer mask, would be lost under the custom mask). The probe decides the rest."""
    import inspect

    base = _unwrapped(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    if any(kind != "full_attention" for kind in getattr(config, "layer_types", None) or []):
        return False
    if getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True):
        return False
    if getattr(config, "attention_layers", None) and any(k != "global" for k in config.attention_layers):
        return False  # GPT-Neo's local layers
    return "position_ids" in inspect.signature(base.forward).parameters


# ---- verification: a fast path is taken only where the probe agrees with the plain path ------


@dataclass(frozen=True)
class Verdict:
    head: bool  # the response-only output layer (and its chunked form) gives the plain numbers
    shared_prompt: bool  # collate_shared_prompt's rows give the plain numbers
    refused: tuple[str, ...] = ()  # why a candidate fast path was refused (empty: none was)


PATH_NAMES = {"head": "the response-only output layer", "shared_prompt": "shared-prompt rows"}

# model (unwrapped) -> its verdict, made on its weights when first used; and its other fast paths'
# checks (`verified`): name -> (accepted, check)
_BY_MODEL: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_CHECKS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_WARNED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> refusals logged outside any stage


def fast_paths(model) -> Verdict:
    """Which fast paths are right for `model`, probed once per model on its weights at first use
    (see the module docstring), less those the running stage has turned off after a drift."""
    base = _unwrapped(model)
    verdict = _BY_MODEL.get(base)
    if verdict is None:
        verdict = _BY_MODEL[base] = probe(base)
    report = logps_report.current()
    if report is not None and report.plain:
        verdict = replace(verdict, **{name: False for name in PATH_NAMES if name in report.plain})
    _report(base, verdict.refused)
    return verdict


def _report(base, refused: tuple[str, ...]) -> None:
    """Refusals into the running stage's report (warned once a stage), else warned once a model."""
    if not refused:
        return
    report = logps_report.current()
    if report is not None:
        for reason in refused:
            report.refuse(f"{type(base).__name__}: {reason}")
    else:
        warned = _WARNED.setdefault(base, set())
        for reason in refused:
            if reason not in warned:
                warned.add(reason)
                log.warning("%s: %s; %s", type(base).__name__, reason, logps_report.INSTEAD)


def verified(model, name: str, check: Callable[[torch.nn.Module], str | None]) -> bool:
    """Whether the fast path `name` is right for `model`, for fast paths beyond log-probs (online
    sampling's shared prefill): `check(model)` compares it with its plain counterpart once per
    model and returns None where they agree, else why not. A refusal is reported as the probe's
    are; `recheck` runs the check again on later weights."""
    base = _unwrapped(model)
    report = logps_report.current()
    if report is not None and name in report.plain:
        return False
    checks = _CHECKS.setdefault(base, {})
    if name not in checks:
        why = check(base)
        checks[name] = (why is None, check, () if why is None else (why,))
    accepted, _, refused = checks[name]
    _report(base, refused)
    return accepted


def recheck(model, when: str) -> None:
    """Probe `model` again on its current weights (at a checkpoint, at the end of training): raise
    FastPathDrift naming each fast path it was taking that disagrees now. Costs one probe: a few
    forward passes over ~30 tokens, and the other fast paths' checks."""
    base = _unwrapped(model)
    report = logps_report.current()
    off = report.plain if report is not None else set()
    drifted: dict[str, str] = {}
    if base in _BY_MODEL:
        before, now = _BY_MODEL[base], probe(base)
        for name, text in PATH_NAMES.items():
            if getattr(before, name) and name not in off and not getattr(now, name):
                drifted[name] = next((r for r in now.refused if r.startswith(text)), f"{text} is refused")
    for name, (accepted, check, _) in list(_CHECKS.get(base, {}).items()):
        if accepted and name not in off and (why := check(base)) is not None:
            drifted[name] = why
    if drifted:
        raise FastPathDrift(drifted, when)


def probe_pairs(vocab_size: int, specials: set[int] = frozenset()) -> list[dict]:
    """Two small preference pairs of seeded random tokens, in pair_examples' layout."""
    g = torch.Generator().manual_seed(0)
    ordinary = [t for t in range(vocab_size) if t not in specials] or list(range(vocab_size))

    def tokens(n):
        return [ordinary[i] for i in torch.randint(len(ordinary), (n,), generator=g).tolist()]

    def example(prompt, response):
        return {"input_ids": prompt + response, "labels": [IGNORE] * len(prompt) + response}

    pairs = []
    for p, c, r in ((5, 4, 2), (2, 3, 6)):
        prompt = tokens(p)
        pairs.append({"chosen": example(prompt, tokens(c)), "rejected": example(prompt, tokens(r))})
    return pairs


def probe_batch(model) -> tuple[list[dict], int]:
    """probe_pairs for `model`'s vocabulary, avoiding its special tokens, and its pad id."""
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    specials = {getattr(config, n, None) for n in ("pad_token_id", "bos_token_id", "eos_token_id")}
    pairs = probe_pairs(text.vocab_size, {s for s in specials if isinstance(s, int)})
    return pairs, config.pad_token_id if isinstance(config.pad_token_id, int) else 0


PROBE_CHUNK_ROWS = 3  # the chunked head's check: chunks of 3 of the probe's 15 response tokens

# Summed log-probs over the probe's few tokens agree to float32 rounding (~1e-5) when a path is
# right; the wrong ones measured were off by 0.02 to 0.4. Half precision rounds more.
PROBE_TOLERANCE = {torch.float32: 2e-3, torch.float64: 2e-3}
HALF_PRECISION_TOLERANCE = 5e-2


def probe_tolerance(model) -> float:
    return PROBE_TOLERANCE.get(next(model.parameters()).dtype, HALF_PRECISION_TOLERANCE)


def _disagreement(compute, expected: torch.Tensor, tolerance: float) -> str | None:
    """None where compute() agrees with `expected`, else how it does not (an error counts)."""
    try:
        got = compute()
    except Exception as exc:  # noqa: BLE001 - any failure of a fast path means: do not use it
        return f"{type(exc).__name__}: {exc}"
    error = (got - expected).abs().max().item()
    return None if error <= tolerance else f"{error:.3g} nats"


@torch.no_grad()
def probe(model) -> Verdict:
    """Compare each candidate fast path with the plain path on probe_pairs, in eval mode, unautocast."""
    device = next(model.parameters()).device
    tolerance = probe_tolerance(model)
    config = model.config
    pairs, pad_id = probe_batch(model)
    plain_batch = {k: v.to(device) for k, v in collate_pairs(pairs, pad_id).items()}
    training = model.training
    model.eval()
    refused = []
    try:
        with torch.autocast(device.type, enabled=False):
            try:
                expected = pair_logps(model, plain_batch, head_ok=False, shared_ok=False)[0]
            except Exception as exc:  # noqa: BLE001 - the plain path itself fails: nothing to fall back to
                raise BadInput(str(getattr(config, "_name_or_path", "") or type(model).__name__), "model",
                               f"a causal LM whose forward pass gives logits ({type(model).__name__} failed on a "
                               f"probe batch: {type(exc).__name__}: {exc})") from exc
            if not torch.isfinite(expected).all():
                raise BadInput(str(getattr(config, "_name_or_path", "") or type(model).__name__), "model",
                               f"finite log-probs ({type(model).__name__} gives non-finite ones on a probe batch)")
            head = body_and_head(model) is not None
            if not head and (transform := logit_transform(model)):
                refused.append(f"{PATH_NAMES['head']}: its configuration's {transform} transforms the logits "
                               "after the output layer")
            for chunk_rows in (None, PROBE_CHUNK_ROWS) if head else ():  # whole, then in chunks
                why = _disagreement(lambda: pair_logps(model, plain_batch, head_ok=True, shared_ok=False,
                                                       chunk_rows=chunk_rows)[0], expected, tolerance)
                if why is not None:
                    head = False
                    refused.append(f"{PATH_NAMES['head']}{' in chunks' if chunk_rows else ''} disagrees with the full "
                                   f"logits by {why} (its logits are more than head(hidden states))")
                    break
            shared = shared_prompt_candidate(model)
            if shared:
                batch = {k: v.to(device) for k, v in collate_shared_prompt(pairs, pad_id).items()}
                why = _disagreement(lambda: pair_logps(model, batch, head_ok=head, shared_ok=True)[0], expected, tolerance)
                if why is not None:
                    shared = False
                    refused.append(f"{PATH_NAMES['shared_prompt']} disagree with one row per sequence ({why})")
    finally:
        model.train(training)
    return Verdict(head=head, shared_prompt=shared, refused=tuple(refused))


# ---- preference pairs: two layouts ------------------------------------------------------------


def encode_pairs(tokenizer, prompts: list, chosen: list, rejected: list, max_length: int | None,
                 max_prompt_length: int | None = None) -> list[dict]:
    """Tokenized pairs, {"chosen": example, "rejected": example} (max_length None: untruncated;
    prompts longer than max_prompt_length lose their beginning)."""
    import sys

    limit = max_length or sys.maxsize
    chosen = encode_examples(tokenizer, prompts, chosen, limit, max_prompt_length)
    rejected = encode_examples(tokenizer, prompts, rejected, limit, max_prompt_length)
    return [{"chosen": c, "rejected": r} for c, r in zip(chosen, rejected)]


def response_tokens(example: dict) -> int:
    return sum(label != IGNORE for label in example["labels"])


def collate_pairs(examples: list[dict], pad_id: int) -> dict:
    """Chosen then rejected stacked into one batch of 2B sequences, plus the reference log-probs."""
    batch = collate([e["chosen"] for e in examples] + [e["rejected"] for e in examples], pad_id)
    if "ref_chosen" in examples[0]:
        batch["ref_chosen"] = torch.tensor([e["ref_chosen"] for e in examples], dtype=torch.float32)
        batch["ref_rejected"] = torch.tensor([e["ref_rejected"] for e in examples], dtype=torch.float32)
    return batch


def shared_prompt_length(chosen: dict, rejected: dict) -> int:
    """How many leading tokens a pair's two sequences share as prompt (the same ids, no labels)."""
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


def pair_collate(model):
    """The collate function for `model`'s pair batches: shared-prompt rows where verified."""
    return collate_shared_prompt if fast_paths(model).shared_prompt else collate_pairs


def pair_logps(model, batch: dict, head_ok: bool | None = None, shared_ok: bool | None = None,
               chunk_rows: int | None = None):
    """Summed response log-probs and response token counts of a batch's 2B sequences, chosen then
    rejected, from either layout (collate_pairs or collate_shared_prompt). A shared-prompt batch
    for a model whose verdict refuses that layout is an error (use pair_collate). chunk_rows: the
    output layer in chunks of that many rows (head_logps; the probe and tests)."""
    if "position_ids" not in batch:
        targets = batch["labels"][:, 1:]
        mask = targets != IGNORE
        width = batch["input_ids"].shape[1]
        rows, cols = mask.nonzero(as_tuple=True)
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        lp = token_logps(model, inputs, rows * width + cols, targets[mask], head_ok, chunk_rows)
        return lp.new_zeros(len(batch["input_ids"])).index_add(0, rows, lp), mask.sum(-1)
    if not (fast_paths(model).shared_prompt if shared_ok is None else shared_ok):
        raise ValueError("shared-prompt rows are not verified for this model: collate its pairs with pair_collate(model)")
    inputs = {"input_ids": batch["input_ids"], "attention_mask": model_attention_mask(model, batch["attention_mask"]),
              "position_ids": batch["position_ids"]}
    lp = token_logps(model, inputs, batch["logp_index"], batch["logp_target"], head_ok, chunk_rows)
    n_sequences, sequence = 2 * len(batch["input_ids"]), batch["logp_sequence"]
    return lp.new_zeros(n_sequences).index_add(0, sequence, lp), torch.bincount(sequence, minlength=n_sequences)


def model_attention_mask(model, mask: torch.Tensor) -> torch.Tensor:
    """A boolean 4D attention mask (True: attend) as `model`'s attention takes it."""
    config = getattr(_unwrapped(model), "config", None) if model is not None else None
    if getattr(config, "_attn_implementation", None) == "eager":  # eager attention adds the mask to its scores
        return torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, torch.finfo(torch.float32).min)
    return mask


# ---- many sequences at once: reference log-probs and evaluation --------------------------------


@torch.no_grad()
def reference_logps(model, examples: list[dict], pad_id: int, batch_size: int, progress) -> None:
    """Reference log-probs of every pair from `model`, stored in the examples as ref_chosen and
    ref_rejected. The one way reference log-probs are computed (pairs, ref_logps, dpo)."""
    model.eval()
    device = next(model.parameters()).device
    shared = fast_paths(model).shared_prompt
    collate_fn = collate_shared_prompt if shared else collate_pairs

    def length(e: dict) -> int:
        return packed_length(e) if shared else max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"]))

    # Longest first, in length order: batches of similar lengths, little padding (and any OOM comes first).
    ordered = sorted(examples, key=length, reverse=True)
    with progress("reference log-probs", total=math.ceil(len(examples) / batch_size)) as bar:
        for start in range(0, len(ordered), batch_size):
            chunk = ordered[start : start + batch_size]
            batch = collate_fn([{"chosen": e["chosen"], "rejected": e["rejected"]} for e in chunk], pad_id)
            logps, _ = pair_logps(model, {k: v.to(device) for k, v in batch.items()})
            for e, c, r in zip(chunk, *logps.float().cpu().chunk(2)):
                e["ref_chosen"], e["ref_rejected"] = c.item(), r.item()
            bar.advance()


@torch.no_grad()
def batched_logps(model, tokenizer, prompts, responses, max_length: int, batch_size: int, on_batch=None,
                  max_prompt_length: int | None = None):
    """sequence_logps over a whole list, in batches. Returns (logps, token counts) as lists."""
    model.eval()
    device = next(model.parameters()).device
    examples = encode_examples(tokenizer, prompts, responses, max_length, max_prompt_length)
    logps, counts = [], []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], tokenizer.pad_token_id).items()}
        lp, n = sequence_logps(model, **batch)
        logps += lp.tolist()
        counts += n.tolist()
        if on_batch:
            on_batch()
    return logps, counts
