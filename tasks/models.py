"""Plain functions over causal LMs: build, load, save, tokenize, score and sample.

Every stage formats an example the same way, so the log-probs computed in one stage (pairs)
match those computed in another (dpo; both through tasks/logps.py):

    input  = [bos] + tokens(prompt) + tokens(response) + [eos]
    labels = [-100] * (1 + len(tokens(prompt))) + tokens(response) + [eos]

Prompt and response are tokenized separately so the response tokens scored are exactly the
tokens a policy generated after the prompt.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from tasks.base import BadInput

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


def stored_dtype(folder: str | Path) -> torch.dtype:
    """The dtype a model folder's weights are stored in (its config's), float32 if it names none.
    An adapter-only artifact's is its base's."""
    import json

    folder = Path(folder)
    if is_adapter_artifact(folder):
        folder = base_folder(folder)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return torch.float32
    name = config.get("dtype") or config.get("torch_dtype")
    return torch_dtype(name) if name in ("float32", "bfloat16", "float16") else torch.float32


def load_causal_lm(path: str | Path, device: torch.device | str | None = None, **kwargs):
    """Model and tokenizer from a "model" artifact folder, in the dtype its weights are stored in
    (a `pretrained` model's `dtype`; training autocasts to the stage's `dtype`).

    An adapter-only artifact (LoRA with merge: false) is loaded onto its base model and merged (in
    float32, then rounded once to the base's dtype).
    """
    dtype = stored_dtype(path)
    if is_adapter_artifact(path):
        model = load_adapter_merged(path, AutoModelForCausalLM, dtype=torch.float32, **kwargs).to(dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **kwargs)
    model = model.to(device or default_device())
    set_cpu_threads(model)
    return model, load_tokenizer(path)


def load_reward_model(path: str | Path, device: torch.device | str | None = None):
    """A sequence-classification model (one score) and its tokenizer, in its stored dtype.

    `path` may hold a reward model, or a causal LM: then its body is reused under a fresh score head.
    """
    tokenizer = load_tokenizer(path)
    dtype = stored_dtype(path)
    # From a causal LM, transformers reports lm_head as unused and the score head as new: expected.
    verbosity = transformers.utils.logging.get_verbosity()
    transformers.utils.logging.set_verbosity_error()
    try:
        options = dict(num_labels=1, pad_token_id=tokenizer.pad_token_id)
        if is_adapter_artifact(path):  # LoRA with merge: false
            model = load_adapter_merged(path, AutoModelForSequenceClassification, dtype=torch.float32, **options).to(dtype)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype, **options)
    finally:
        transformers.utils.logging.set_verbosity(verbosity)
    model.config.pad_token_id = tokenizer.pad_token_id  # the head scores the last non-pad token
    model = model.to(device or default_device())
    set_cpu_threads(model)
    return model, tokenizer


def is_adapter_artifact(folder: str | Path) -> bool:
    """An adapter-only LoRA artifact (tasks/train/lora.py, merge: false)."""
    return (Path(folder) / "adapter_config.json").exists() and not (Path(folder) / "config.json").exists()


STORE_SCHEME = "alignflow-store:"  # an artifact named by <kind>/<key> in the store that holds the adapter


def base_reference(base: Path) -> str:
    """How an adapter artifact names its base: `alignflow-store:<kind>/<key>` when the base is a
    store artifact (a folder <kind>/<key> with a manifest), else its absolute path. A path is one
    machine's; a store key holds wherever the store is."""
    import json

    manifest = base / "manifest.json"
    if manifest.is_file():
        recorded = json.loads(manifest.read_text())
        if recorded.get("key") == base.name and recorded.get("kind") == base.parent.name:
            return f"{STORE_SCHEME}{base.parent.name}/{base.name}"
    return str(base.resolve())


def base_folder(folder: str | Path, reference: str | None = None) -> Path:
    """The base model folder an adapter artifact at `folder` names: by store key, in the same
    store as the adapter (its sibling folder <root>/<kind>/<key>; a remote store's local cache
    holds the inputs it downloaded the same way)."""
    import json

    if reference is None:
        reference = json.loads((Path(folder) / "adapter_config.json").read_text())["base_model_name_or_path"]
    if reference.startswith(STORE_SCHEME):
        return Path(folder).resolve().parent.parent / reference[len(STORE_SCHEME):]
    return Path(reference)


def load_adapter_merged(folder: str | Path, model_class, **kwargs) -> torch.nn.Module:
    """An adapter-only artifact loaded onto its base and merged (inference and further training)."""
    from peft import PeftConfig, PeftModel

    base_path = base_folder(folder)
    if not base_path.exists():
        raise FileNotFoundError(f"{folder}: the adapter's base model is not at {base_path} "
                                "(rebuild it: it is an input of the stage that trained the adapter)")
    base = model_class.from_pretrained(str(base_path), **kwargs)
    with quiet_peft():
        # peft reads the base's name from the config it loads: give it the folder, not the reference
        config = PeftConfig.from_pretrained(str(folder))
        config.base_model_name_or_path = str(base_path)
        return PeftModel.from_pretrained(base, str(folder), config=config).merge_and_unload()


@contextlib.contextmanager
def quiet_peft():
    """peft reads a transformers property that warns it is deprecated in v5: noise to our users."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        yield


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


UNK_WARNING_FRACTION = 0.05  # more unknown tokens than this: the tokenizer does not fit the data


def screen_texts(tokenizer, columns: dict[str, list], file: str, strict: bool) -> tuple[list[int], dict[str, float]]:
    """Rows of `columns` (name -> values: text, or chat messages) whose every value has tokens.

    A text that tokenizes to nothing (a tokenizer that does not fit the data), or a blank prompt,
    would be scored as eos alone: its row is dropped and counted (`dropped_no_tokens`), or, with
    `strict`, it is an error naming the row. (A blank response is what a policy that stops at once
    generated: eos alone is then the right score.) `unk_fraction` is the share of the unknown
    token among all the tokens; above UNK_WARNING_FRACTION it is logged as a warning.
    """
    import logging

    n_rows = len(next(iter(columns.values()))) if columns else 0
    empty: set[int] = set()
    unk, total = 0, 0
    for name, values in columns.items():
        texts = [" ".join(str(m.get("content", "")) for m in v) if is_chat(v) else str(v or "") for v in values]
        for row, ids in enumerate(tokenizer(texts, add_special_tokens=False)["input_ids"]):
            if not ids and (texts[row].strip() or name == "prompt"):
                if strict:
                    raise BadInput(file, f"row {row + 1}: {name}",
                                     f"text that tokenizes to at least one token, got {values[row]!r}")
                empty.add(row)
            unk += sum(t == tokenizer.unk_token_id for t in ids) if tokenizer.unk_token_id is not None else 0
            total += len(ids)
    metrics = {"dropped_no_tokens": float(len(empty))}
    if tokenizer.unk_token_id is not None:
        metrics["unk_fraction"] = unk / max(1, total)
        if metrics["unk_fraction"] > UNK_WARNING_FRACTION:
            logging.getLogger(__name__).warning(
                "%s: %.1f%% of the tokens are the unknown token %r: the tokenizer does not fit this data",
                file, 100 * metrics["unk_fraction"], tokenizer.unk_token)
    if empty:
        logging.getLogger(__name__).warning("%s: %d rows dropped: a value tokenizes to nothing (first: row %d)",
                                            file, len(empty), min(empty) + 1)
    return [i for i in range(n_rows) if i not in empty], metrics


def encode_prompts(tokenizer, prompts: list, max_prompt_length: int | None = None) -> list[list[int]]:
    """Token ids of each prompt, as a model reads it before its response.

    Plain text: [bos] + tokens(prompt). Conversational (a list of {role, content} messages): the
    chat template's rendering with the generation prompt, tokenized without adding bos (the
    template writes its own start tokens). With max_prompt_length, a longer prompt loses its
    beginning (its end, next to the response, matters most), but keeps a leading bos.
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
    if max_prompt_length is not None:
        encoded = [cut_left(ids, max_prompt_length, tokenizer.bos_token_id) for ids in encoded]
    return encoded


def cut_left(ids: list[int], length: int, bos: int | None) -> list[int]:
    """The last `length` ids, the first one kept when it is bos."""
    if len(ids) <= length:
        return ids
    keep_bos = bos is not None and ids[0] == bos and length > 1
    return [bos] + ids[len(ids) - length + 1 :] if keep_bos else ids[len(ids) - length :]


def encode_examples(tokenizer, prompts: list, responses: list, max_length: int,
                    max_prompt_length: int | None = None) -> list[dict]:
    """Each (prompt, response) as {"input_ids", "labels"}; labels mask the prompt with -100.

    Plain text: [bos] + tokens(prompt) + tokens(response) + [eos]. A conversational prompt (a list
    of messages) with a response (the assistant's message(s), or a str: one assistant message):
    encode_prompts' ids, then chat_response_ids'; the labels cover the reply's tokens and its
    end-of-turn. Sequences longer than max_length are cut at the end (the response loses its tail);
    prompts longer than max_prompt_length lose their beginning first (encode_prompts).
    """
    prompts, responses = list(prompts), list(responses)
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length)
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


# ---- scoring (log-probs: tasks/logps.py) ---------------------------------------------------


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
    max_prompt_length: int | None = None,
    top_k: int = 0,
) -> list[list[str]]:
    """n sampled responses per prompt (temperature 0: greedy; top_k 0: no top-k cut). Seeded: same
    inputs, same outputs.

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
        options.update(temperature=temperature, top_p=top_p, top_k=top_k)  # top_k=0: no top-k cut
    responses = []
    for start in range(0, len(prompts), batch_size):
        torch.manual_seed(batch_seed(seed, prompt_ids[start] if prompt_ids is not None else start))
        encoded = encode_prompts(tokenizer, prompts[start : start + batch_size], max_prompt_length)
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
