"""Training stage kinds (sft, reward_model, dpo, rrhf; online: rloo, grpo, ppo) and the plain
functions they share (loop, online, losses, lora)."""
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tasks.base import OptionalRef, Ref, SpecPath, StageParams
from tasks.rewards import RewardFnName, reward_code_files
from tasks.vllm_backend import ROLLOUT_DEFAULTS, VllmParams, vllm_problems, vllm_settings


class LoraParams(BaseModel):
    """Low-rank adapters through peft (Hu et al. 2021): only the adapters train, the base stays frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    r: int = Field(16, ge=1, description="adapter rank")
    alpha: float = Field(32, gt=0, description="scaling numerator: updates are scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="module names to adapt (e.g. [q_proj, v_proj]) or every linear layer"
    )
    merge: bool = Field(
        True, description="save the adapter merged into the weights (a plain model); false: the adapter alone, on top of the input model"
    )


class OptimParams(StageParams):
    """The optimisation settings every training stage takes, offline and online."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1, description="optimizer steps to train for; given, it overrides epochs")
    lr: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="the learning-rate schedule after warmup (transformers' get_scheduler)"
    )
    batch_size: int = Field(16, ge=1, description="examples per optimizer step (global: over every process)")
    micro_batch_size: int | None = Field(
        None, ge=1, description="examples per forward and backward pass; gradients accumulate up to batch_size; none: batch_size"
    )
    max_length: int = Field(512, ge=2)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="compute precision (autocast; float16 with a gradient scaler on GPUs); auto: bfloat16 on GPUs "
        "that support it, else float32. The weights keep the dtype of the model they start from"
    )
    weight_decay: float = Field(0.0, ge=0)
    too_long: Literal["truncate", "drop", "error"] = Field(
        "truncate", description="examples over max_length: cut the response's tail, drop them (counted), or stop with an error"
    )
    lora: LoraParams | None = Field(None, description="train low-rank adapters instead of every weight")
    gradient_checkpointing: bool = Field(False, description="recompute activations in backward: less memory, ~30% more time")

    def loop_options(self) -> dict:
        """The keyword arguments of tasks.train.loop.train that come from these settings."""
        names = ("epochs", "max_steps", "lr", "lr_scheduler", "batch_size", "micro_batch_size", "warmup_ratio",
                 "weight_decay", "dtype", "gradient_checkpointing")
        return {name: getattr(self, name) for name in names}


class TrainParams(OptimParams):
    """The settings of the offline training stages (tasks/train/loop.py uses them).

    `batch_size` is the global batch: with `processes: N` each process takes batch_size / N
    examples of every step's batch, so the steps, the batches and the results do not depend on N
    (up to floating-point rounding); see tasks/train/launch.py.
    """

    group_by_length: bool = Field(True, description="batch examples of similar length together: less padding")
    processes: int = Field(
        1, ge=1, description="training processes (accelerate launch; one per GPU, or gloo on CPU); batch_size stays the global batch"
    )
    accelerate_config: SpecPath | None = Field(
        None, description="an accelerate config YAML (FSDP, DeepSpeed, ...) passed to `accelerate launch --config_file`"
    )
    checkpoint_every: int | None = Field(
        None, ge=1, description="steps between checkpoints an interrupted run resumes from; none: no checkpoints"
    )

    # Where and how it runs, not what it computes: batch_size is global, so the process count
    # changes only rounding (tests/test_multiprocess.py). An accelerate config can change more
    # (DeepSpeed's precision, say): its content is in the key (source_files).
    # micro_batch_size changes memory, not the result (up to rounding: tests/test_loop_*.py).
    not_in_key = frozenset({"processes", "checkpoint_every", "micro_batch_size"})

    def source_files(self) -> list[Path]:
        return [Path(self.accelerate_config)] if self.accelerate_config else []

    @model_validator(mode="after")
    def _check_processes(self):
        if self.batch_size % self.processes:
            raise ValueError(
                f"batch_size ({self.batch_size}) is the global batch, split evenly over the processes: "
                f"it must be a multiple of processes ({self.processes})"
            )
        if self.micro_batch_size is not None and self.micro_batch_size > self.batch_size // self.processes:
            raise ValueError(
                f"micro_batch_size ({self.micro_batch_size}) is the examples of one forward pass in one process: "
                f"at most batch_size / processes = {self.batch_size // self.processes}"
            )
        if self.accelerate_config and Path(self.accelerate_config).is_file():
            import yaml

            try:
                config = yaml.safe_load(Path(self.accelerate_config).read_text())
            except yaml.YAMLError as exc:
                raise ValueError(f"accelerate_config {self.accelerate_config}: not YAML ({exc})") from None
            if not isinstance(config, dict):
                raise ValueError(f"accelerate_config {self.accelerate_config}: expected a mapping (an accelerate config file)")
            if config.get("num_machines", 1) not in (None, 1):
                raise ValueError(f"accelerate_config {self.accelerate_config}: num_machines {config['num_machines']}: "
                                 "a stage trains on one machine")
            declared = config.get("num_processes")
            if declared not in (None, -1, self.processes):
                raise ValueError(f"accelerate_config {self.accelerate_config} says num_processes {declared} but processes "
                                 f"is {self.processes}: processes decides; make them agree or drop num_processes from the file")
        return self


class OnlineParams(OptimParams):
    """The settings the online RL stages share (rloo, grpo, ppo; tasks/train/online.py runs them)."""

    policy: Ref("model")
    prompts: Ref("table")  # a prompt column (text, or a list of chat messages)
    reward_model: OptionalRef("reward_model") = Field(None, description="scores the samples; or reward_fn")
    reward_fn: RewardFnName | None = Field(
        None, description='a programmatic reward: a built-in name (tasks/rewards.py) or "module:function"; or reward_model'
    )
    monitor_reward_fn: RewardFnName | None = Field(
        None, description="a named reward logged beside the trained one, never trained on (e.g. a gold reward)"
    )
    reference: OptionalRef("model") = Field(None, description="the KL term's reference; default: the policy as it starts")
    kl_coef: float = Field(0.05, ge=0, description="weight of the KL to the reference; 0: no reference")
    samples_per_prompt: int = Field(4, ge=2, description="responses sampled per prompt each step")
    batch_size: int = Field(16, ge=1, description="prompts per step")
    epochs: float = Field(1.0, gt=0, description="passes over the prompts")
    lr: float = Field(1e-5, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    updates_per_rollout: int = Field(1, ge=1, description="passes over each rollout (PPO epochs)")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass over a rollout")
    clip_eps: float = Field(0.2, gt=0, description="the policy ratio's clip range")
    checkpoint_every: int = Field(25, ge=1, description="steps between checkpoints")
    micro_batch_size: int | None = Field(
        None, ge=1, description="sampled responses per forward and backward pass (and per log-prob pass of a rollout); "
        "gradients accumulate over a minibatch; none: a whole minibatch"
    )
    rollout_backend: Literal["hf", "vllm"] = Field(
        "hf", description="samples the rollouts: hf (transformers generate) or vllm (one engine for the stage, the "
        "policy's weights loaded into it after every update; tasks/train/vllm_rollouts.py)"
    )
    vllm: VllmParams | None = Field(
        None, validate_default=True, description="vLLM's engine settings (rollout_backend: vllm; checked, then dropped, "
        "with hf); gpu_memory_utilization defaults to 0.3 here: the policy trains on the same GPU"
    )

    not_in_key = frozenset({"checkpoint_every", "micro_batch_size"})

    @field_validator("vllm")
    @classmethod
    def _vllm_settings(cls, value, info):
        return vllm_settings(value, info, "rollout_backend", ROLLOUT_DEFAULTS)

    def environment_problems(self):
        return vllm_problems(self.rollout_backend, self.vllm, "rollout_backend")

    def code_files(self):
        return reward_code_files([self.reward_fn, self.monitor_reward_fn], self.spec_dir)

    @model_validator(mode="after")
    def _check(self):
        if (self.reward_model is None) == (self.reward_fn is None):
            raise ValueError("give exactly one of reward_model (a reward_model artifact) and reward_fn (a named reward)")
        if self.max_new_tokens >= self.max_length:
            raise ValueError(f"max_new_tokens ({self.max_new_tokens}) must be below max_length ({self.max_length})")
        if (self.batch_size * self.samples_per_prompt) % self.minibatches:
            raise ValueError(f"minibatches ({self.minibatches}) must divide the rollout's "
                             f"batch_size * samples_per_prompt = {self.batch_size * self.samples_per_prompt} sequences")
        minibatch = self.batch_size * self.samples_per_prompt // self.minibatches
        if self.micro_batch_size is not None and self.micro_batch_size > minibatch:
            raise ValueError(f"micro_batch_size ({self.micro_batch_size}) counts sampled responses per forward pass: at most "
                             f"a minibatch, batch_size * samples_per_prompt / minibatches = {minibatch}")
        return self
