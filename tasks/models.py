"""Plain functions over causal LMs: build, load, save, tokenize, score and sample.

Every stage formats an example the same way, so the log-probs computed in one stage (pairs)
match those computed in another (dpo):

    input  = [bos] + tokens(prompt) + tokens(response) + [eos]
    labels = [-100] * (1 + len(tokens(prompt))) + tokens(response) + [eos]

Prompt and response are tokenized separately so the response tokens scored are exactly the
tokens a policy generated after the prompt.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

IGNORE = -100  # label of tokens that carry no loss (prompt, padding)

# Stages report progress through ctx.progress; transformers' own bars (loading weights...) are noise.
transformers.utils.logging.disable_progress_bar()


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


TINY_MODEL_PARAMETERS = 10_000_000


def set_cpu_threads(model) -> None:
    """Pick torch's CPU thread count for `model`: ALIGNFLOW_TORCH_THREADS if set, else 1 for tiny models.

    Why: a tiny model's matrices are too small to split across threads; with 2 threads the
    synchronisation costs more than the maths, and when another process shares the cores, OpenMP's
    spin-waiting made the demo's training steps 15x slower (measured on a 2-core CPU).
    """
    import os

    if next(model.parameters()).device.type != "cpu":
        return
    threads = os.environ.get("ALIGNFLOW_TORCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))
    elif sum(p.numel() for p in model.parameters()) < TINY_MODEL_PARAMETERS:
        torch.set_num_threads(1)


# ---- building a tiny model ------------------------------------------------------------------


def build_word_tokenizer(words: list[str]) -> PreTrainedTokenizerFast:
    """A word-level tokenizer (one id per whitespace-separated word) with pad/bos/eos/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<bos>", "<eos>", "<unk>"]
    vocab = {word: i for i, word in enumerate(specials + [w for w in words if w not in specials])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )


def build_tiny_llama(
    tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 64,
    seed: int = 0,
) -> LlamaForCausalLM:
    """A randomly initialised LlamaForCausalLM sized to `tokenizer`'s vocabulary."""
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


# ---- loading and saving ---------------------------------------------------------------------


def load_tokenizer(path: str | Path, **kwargs):
    tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    if tokenizer.pad_token is None:  # many causal LMs ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str) -> torch.dtype:
    """A spec's `dtype` (auto | float32 | bfloat16 | float16) as a torch dtype; auto: bfloat16 on a
    GPU that supports it, else float32 (CPUs compute bfloat16 slowly, and GPUs without bfloat16
    need float16's loss scaling)."""
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_causal_lm(path: str | Path, device: torch.device | str | None = None, **kwargs):
    """Model and tokenizer from a "model" artifact folder, in the dtype its weights are stored in
    (a `pretrained` model's `dtype`; training autocasts to the stage's own `dtype`).

    An adapter-only artifact (LoRA with merge: false) is loaded onto its base model and merged.
    """
    from tasks.train.lora import is_adapter_artifact, load_adapter_merged

    if is_adapter_artifact(path):
        model = load_adapter_merged(path, AutoModelForCausalLM, dtype="auto", **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", **kwargs)
    model = model.to(device or default_device())
    set_cpu_threads(model)
    return model, load_tokenizer(path)


def load_reward_model(path: str | Path, device: torch.device | str | None = None):
    """A sequence-classification model (one score) and its tokenizer, in its stored dtype.

    `path` may hold a reward model, or a causal LM: then its body is reused under a fresh score head.
    """
    tokenizer = load_tokenizer(path)
    # From a causal LM, transformers reports lm_head as unused and the score head as new: expected.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        from tasks.train.lora import is_adapter_artifact, load_adapter_merged

        options = dict(num_labels=1, dtype="auto", pad_token_id=tokenizer.pad_token_id)
        if is_adapter_artifact(path):  # LoRA with merge: false
            model = load_adapter_merged(path, AutoModelForSequenceClassification, **options)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), **options)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head scores the last non-pad token
    model = model.to(device or default_device())
    set_cpu_threads(model)
    return model, tokenizer


def save_model(model, tokenizer, folder: str | Path) -> None:
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


# ---- tokenizing -----------------------------------------------------------------------------


def is_chat(value) -> bool:
    """A conversational value: a list of {role, content} messages (plain text is a str)."""
    return isinstance(value, (list, tuple))


def chat_prompt_text(tokenizer, messages) -> str:
    """The conversation so far as the chat template renders it, ending with the assistant's header."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "a conversational prompt (a list of messages) needs a tokenizer with a chat template; "
            "this model's tokenizer has none (give plain-text prompts, or a model with a chat template)"
        )
    return tokenizer.apply_chat_template([dict(m) for m in messages], add_generation_prompt=True, tokenize=False)


def _special_ids(tokenizer) -> set[int]:
    ids = set(tokenizer.all_special_ids)
    ids.update(i for i, token in getattr(tokenizer, "added_tokens_decoder", {}).items() if token.special)
    return ids


def chat_response_ids(tokenizer, prompt_messages, response) -> list[int]:
    """Token ids of an assistant reply after a conversational prompt, ending with its end-of-turn.

    `response` is the assistant's message(s) (a str is one assistant message). The ids are the
    tokens of what the chat template writes after the rendered prompt (with its generation prompt):
    the reply's content and the template's end-of-turn token, which for ChatML templates is eos
    (<|im_end|>). They end at the last eos in that rendering, else at its last special token (an
    end-of-turn such as <end_of_turn> or <|eot_id|>); whatever the template writes after it (a
    newline) is left out, as a policy stops generating there. With no special token at all, eos is
    appended, as for plain text.
    """
    reply = [{"role": "assistant", "content": response}] if isinstance(response, str) else [dict(m) for m in response]
    prompt_text = chat_prompt_text(tokenizer, prompt_messages)
    full = tokenizer.apply_chat_template([dict(m) for m in prompt_messages] + reply, tokenize=False)
    if not full.startswith(prompt_text):
        raise ValueError(
            "the chat template does not render a conversation as its prompt (with the generation prompt) "
            f"followed by the reply: {prompt_text[-80:]!r} is not a prefix of {full[:len(prompt_text) + 80][-160:]!r}"
        )
    ids = tokenizer(full[len(prompt_text):], add_special_tokens=False)["input_ids"]
    ends = [i for i, token in enumerate(ids) if token == tokenizer.eos_token_id]
    if not ends:
        specials = _special_ids(tokenizer)
        ends = [i for i, token in enumerate(ids) if token in specials]
    return ids[: ends[-1] + 1] if ends else ids + [tokenizer.eos_token_id]


def encode_prompts(tokenizer, prompts: list) -> list[list[int]]:
    """Token ids of each prompt, as a model reads it before its response.

    Plain text: [bos] + tokens(prompt). Conversational (a list of {role, content} messages): the
    chat template's rendering with the generation prompt, tokenized without adding bos (the
    template writes its own start tokens).
    """
    prompts = list(prompts)
    encoded: list[list[int]] = [[] for _ in prompts]
    plain = [i for i, prompt in enumerate(prompts) if not is_chat(prompt)]
    if plain:
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        for i, ids in zip(plain, tokenizer([prompts[i] for i in plain], add_special_tokens=False)["input_ids"]):
            encoded[i] = bos + ids
    for i, prompt in enumerate(prompts):
        if is_chat(prompt):
            encoded[i] = tokenizer(chat_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    return encoded


def encode_examples(tokenizer, prompts: list, responses: list, max_length: int) -> list[dict]:
    """Each (prompt, response) as {"input_ids", "labels"}; labels mask the prompt with -100.

    Plain text: [bos] + tokens(prompt) + tokens(response) + [eos]. A conversational prompt (a list
    of messages) with a response (the assistant's message(s), or a str: one assistant message):
    encode_prompts' ids, then chat_response_ids'; the labels cover the reply's tokens and its
    end-of-turn. Sequences longer than max_length are cut at the end (the response loses its tail).
    """
    prompts, responses = list(prompts), list(responses)
    prompt_ids = encode_prompts(tokenizer, prompts)
    response_ids: list[list[int]] = [[] for _ in prompts]
    plain = [i for i, prompt in enumerate(prompts) if not is_chat(prompt)]
    for i in plain:
        if is_chat(responses[i]):
            raise ValueError(f"example {i + 1}: a conversational response (a list of messages) needs a "
                             "conversational prompt, got a plain-text prompt")
    if plain:
        for i, ids in zip(plain, tokenizer([responses[i] for i in plain], add_special_tokens=False)["input_ids"]):
            response_ids[i] = ids + [tokenizer.eos_token_id]
    for i, prompt in enumerate(prompts):
        if is_chat(prompt):
            response_ids[i] = chat_response_ids(tokenizer, prompt, responses[i])
    examples = []
    for p, r in zip(prompt_ids, response_ids):
        examples.append({"input_ids": (p + r)[:max_length], "labels": ([IGNORE] * len(p) + r)[:max_length]})
    return examples


def pad(sequences: list[list[int]], value: int, left: bool = False) -> torch.Tensor:
    width = max(len(s) for s in sequences)
    return torch.tensor([[value] * (width - len(s)) + s if left else s + [value] * (width - len(s)) for s in sequences])


def collate(examples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch: input_ids, attention_mask, labels (padding labelled -100)."""
    input_ids = pad([e["input_ids"] for e in examples], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": pad([[1] * len(e["input_ids"]) for e in examples], 0),
        "labels": pad([e["labels"] for e in examples], IGNORE),
    }


# ---- scoring --------------------------------------------------------------------------------


def sequence_logps(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-prob of the labelled (response) tokens of each sequence, and how many there are.

    Only the labelled positions go through the output layer: the (batch, length, vocabulary)
    logits are never built. With a 49k vocabulary they are most of a step's memory, and the prompt
    and padding positions would be thrown away anyway. Even those of the labelled positions are
    not kept when they are large (see head_logps).
    """
    targets = labels[:, 1:]  # token t is predicted from tokens < t
    mask = targets != IGNORE
    split = _body_and_head(model)
    if split is None:  # a model whose head does more than a linear map: the plain way
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][mask]
        token_logps = -F.cross_entropy(logits.float(), targets[mask], reduction="none")
    else:
        body, head = split
        hidden = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        token_logps = head_logps(head, hidden[:, :-1][mask], targets[mask])
    rows = mask.nonzero()[:, 0]
    sums = token_logps.new_zeros(len(input_ids)).index_add(0, rows, token_logps)
    return sums, mask.sum(-1)


HEAD_CHUNK_BYTES = 64 * 2**20  # float32 logits computed at once by head_logps


def head_logps(head: torch.nn.Linear, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) for each row of `hidden` (N, H) under the output layer `head`, as float32 (N,).

    The same values as log_softmax(head(hidden)) at the targets. When the float32 logits would take
    more than HEAD_CHUNK_BYTES, they are never kept: they are computed in chunks of rows, reduced to
    the target's logit and the log-sum-exp, and recomputed chunk by chunk in backward. That costs
    one more output-layer matmul and saves the logits, their log-softmax and its gradient (with a
    49k vocabulary and 1000 response tokens: one matmul of 57 GFLOP, about 5% of a SmolLM2-135M
    step, for 600 MB, of which ~260 MB at the step's peak, measured on CPU).
    """
    rows = max(1, HEAD_CHUNK_BYTES // (4 * head.out_features))
    if len(hidden) <= rows:  # small logits: keep them, no recompute
        return -F.cross_entropy(head(hidden).float(), targets, reduction="none")
    return _ChunkedHeadLogps.apply(hidden, head.weight, head.bias, targets, rows)


class _ChunkedHeadLogps(torch.autograd.Function):
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


# Config fields of heads that scale or cap logits after the linear layer (Gemma 2, Cohere, Granite).
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def _body_and_head(model):
    """(transformer body, output layer) of a causal LM, or None when its logits are not head(hidden).

    Not for a DDP-wrapped model: calling its inner modules would bypass gradient synchronisation.
    """
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        return None
    if hasattr(model, "get_base_model"):  # peft: the adapters live inside the base model's layers
        model = model.get_base_model()
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    body = getattr(model, "base_model", None)
    config = getattr(model, "config", None)
    if head is None or body is None or body is model or not isinstance(head, torch.nn.Linear):
        return None
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    return body, head


@torch.no_grad()
def batched_logps(model, tokenizer, prompts, responses, max_length: int, batch_size: int, on_batch=None):
    """sequence_logps over a whole list, in batches. Returns (logps, token counts) as lists."""
    model.eval()
    device = next(model.parameters()).device
    examples = encode_examples(tokenizer, prompts, responses, max_length)
    logps, counts = [], []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[start : start + batch_size], tokenizer.pad_token_id).items()}
        lp, n = sequence_logps(model, **batch)
        logps += lp.tolist()
        counts += n.tolist()
        if on_batch:
            on_batch()
    return logps, counts


@torch.no_grad()
def batched_scores(reward_model, tokenizer, prompts, responses, max_length: int, batch_size: int, on_batch=None):
    """Reward-model scores of (prompt, response) pairs, formatted exactly as in training."""
    reward_model.eval()
    device = next(reward_model.parameters()).device
    examples = encode_examples(tokenizer, prompts, responses, max_length)
    scores = []
    for start in range(0, len(examples), batch_size):
        batch = collate(examples[start : start + batch_size], tokenizer.pad_token_id)
        out = reward_model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device))
        scores += out.logits[:, 0].float().tolist()
        if on_batch:
            on_batch()
    return scores


# ---- sampling -------------------------------------------------------------------------------


def batch_seed(seed: int, first_id) -> int:
    """A torch seed for the batch that starts with prompt `first_id`: distinct per (seed, id)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(f"{seed}/{first_id}".encode()).digest()[:7], "big")


@torch.no_grad()
def sample_responses(
    model,
    tokenizer,
    prompts: list[str],
    n: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    batch_size: int = 64,
    seed: int = 0,
    on_batch: Callable[[], None] | None = None,
    prompt_ids: list | None = None,
) -> list[list[str]]:
    """n sampled responses per prompt (temperature 0: greedy). Seeded: same inputs, same outputs.

    batch_size counts prompts; each generate call holds batch_size * n sequences. Each batch is
    seeded from `seed` and the id of its first prompt (default: its position), so a run over a
    batch-aligned part of the prompts (a shard) samples exactly what the whole run samples there.
    """
    model.eval()
    device = next(model.parameters()).device
    sampling = temperature > 0
    # Greedy decoding gives one answer per prompt: generate it once and repeat it n times.
    per_prompt = n if sampling else 1
    options = dict(do_sample=sampling, num_return_sequences=per_prompt, max_new_tokens=max_new_tokens)
    if sampling:
        options.update(temperature=temperature, top_p=top_p, top_k=0)  # top_k=0: no top-k cut
    responses = []
    for start in range(0, len(prompts), batch_size):
        torch.manual_seed(batch_seed(seed, prompt_ids[start] if prompt_ids is not None else start))
        encoded = encode_prompts(tokenizer, prompts[start : start + batch_size])
        input_ids = pad(encoded, tokenizer.pad_token_id, left=True).to(device)  # left: new tokens line up
        attention_mask = pad([[1] * len(e) for e in encoded], 0, left=True).to(device)
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
            **options,
        )
        texts = tokenizer.batch_decode(out[:, input_ids.shape[1] :], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        responses += [texts[i * per_prompt : (i + 1) * per_prompt] * (n // per_prompt) for i in range(len(encoded))]
        if on_batch:
            on_batch()
    return responses
