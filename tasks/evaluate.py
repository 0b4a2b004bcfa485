"""evaluate: judged win rate of a policy against a baseline on held-out prompts.

Both models answer every prompt (one sample each, the same seed); a judge decides each prompt:

- `judge`: a programmatic reward function (a built-in name in tasks/rewards.py, or a user's
  "module:function"), or
- `judge_model`: a reward model (a reward_model stage or a pretrained_reward_model); the response
  with the higher reward wins, or
- `judge_lm`: a causal LM asked which of the two responses is better (`judge_template`, default
  JUDGE_TEMPLATE, answered by the next token "A" or "B"). It is asked in both orders, to cancel its
  position bias: a response wins only if both orders prefer it, otherwise the prompt is a tie.
  With backend vllm it runs on a vLLM engine (tasks/vllm_backend.py), as the sampling does.

There is no default: exactly one judge is named. Conversational prompts work with each: a reward
function gets the messages, a reward model its chat template (or the conversation as text when it
has none), the judge LM the conversation as text (tasks/rewards.py, conversation_text).

Ties count half. Metrics: win_rate (with a 95% interval), reward_policy / reward_baseline (mean
judge reward, when the judge gives rewards), length_policy / length_baseline (mean response
length in tokens, each under its own model's tokenizer), with a `reference` model, kl: the
policy's KL(pi || pi_ref) estimated on its own samples, and with a proxy reward (proxy_fn or
proxy_model: the reward that picked the training pairs), proxy_reward_policy / _baseline.

`baseline: previous` inside rounds is the round's starting policy: the round's own gain.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from tasks.base import OptionalRef, Ref, StageContext, StageParams, stage_kind
from tasks.logps_report import reports_logps
from tasks.rewards import RewardFnName, reward_code_files
from tasks.vllm_backend import VllmParams, vllm_problems, vllm_settings

# The pairwise judge's question; the next token after it is the answer, "A" or "B".
JUDGE_TEMPLATE = (
    "Which response to the prompt is better?\n"
    "Prompt: {prompt}\n"
    "Response A: {a}\n"
    "Response B: {b}\n"
    "The better response is"
)


class EvaluateParams(StageParams):
    kind: Literal["evaluate"] = "evaluate"
    policy: Ref("model")
    baseline: Ref("model")
    prompts: Ref("table")
    # The judge: exactly one of these three.
    judge: RewardFnName | None = Field(
        None, description='a reward function: a built-in name (tasks/rewards.py) or "module:function" (beside the spec)'
    )
    judge_model: OptionalRef("reward_model") = None
    judge_lm: OptionalRef("model") = None
    judge_template: str | None = Field(
        None, description="judge_lm's question, with {prompt}, {a} and {b}, ending with the words the answer (A or B) "
        "follows; default: JUDGE_TEMPLATE"
    )
    reference: OptionalRef("model") = Field(None, description="to estimate KL(policy || reference)")
    # The reward that picked the training pairs (the proxy), scored on the same samples: against the
    # judge's (gold) win rate it shows over-optimisation, the proxy rising while the gold stalls.
    proxy_fn: RewardFnName | None = Field(None, description="a reward function whose mean on the samples is logged")
    proxy_model: OptionalRef("reward_model") = Field(None, description="a reward model whose mean on the samples is logged")
    temperature: float = Field(1.0, ge=0, description="KL is an estimate of the sampled distribution's")
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="sample among the k likeliest tokens only; 0: no cut")
    max_new_tokens: int = Field(64, ge=1)
    max_prompt_length: int | None = Field(
        None, ge=1, description="prompts longer than this many tokens lose their beginning (a leading bos is kept)"
    )
    batch_size: int = Field(64, ge=1)
    max_length: int = Field(512, ge=2, description="for the reward model, the judge LM and the KL log-probs")
    backend: Literal["hf", "vllm"] = Field(
        "hf", description="samples the policy's and the baseline's responses, and runs judge_lm: hf (transformers) or "
        "vllm (a CUDA GPU, or an x86 CPU with AVX-512)"
    )
    vllm: VllmParams | None = Field(
        None, validate_default=True, description="vLLM's engine settings (backend: vllm; checked, then dropped, with hf)"
    )

    @field_validator("vllm")
    @classmethod
    def _vllm_settings(cls, value, info):
        return vllm_settings(value, info)

    def environment_problems(self):
        return vllm_problems(self.backend, self.vllm)

    @field_validator("judge_template")
    @classmethod
    def _template_fields(cls, value):
        if value is not None:
            judge_template_tail(value)  # raises, saying what is wrong
        return value

    @model_validator(mode="after")
    def _one_judge(self):
        given = [k for k in ("judge", "judge_model", "judge_lm") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("evaluate needs exactly one judge: judge (a reward function), judge_model (a reward "
                             f"model) or judge_lm (a causal LM); got {', '.join(given) if given else 'none'}")
        if self.judge_template is not None and self.judge_lm is None:
            raise ValueError("judge_template is judge_lm's question; it needs judge_lm")
        if self.proxy_fn is not None and self.proxy_model is not None:
            raise ValueError("evaluate takes at most one proxy reward: proxy_fn or proxy_model")
        return self

    def code_files(self):
        return reward_code_files([self.judge, self.proxy_fn], self.spec_dir)


def judge_template_tail(template: str) -> str:
    """The last line of the text after a judge template's last field: the words the answer follows.
    ValueError unless the template has exactly the fields {prompt}, {a} and {b} and ends with text."""
    import string

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"judge_template: not a format string ({e})") from None
    fields = [name for _, name, _, _ in parsed if name is not None]
    if sorted(set(fields)) != ["a", "b", "prompt"]:
        raise ValueError(f"judge_template: expected the fields {{prompt}}, {{a}} and {{b}} (each at least once), got "
                         f"{', '.join('{' + f + '}' for f in fields) or 'none'}")
    after = parsed[-1][0] if parsed[-1][1] is None else ""
    lines = after.strip().splitlines()
    if not lines:
        raise ValueError("judge_template: expected words after the last field (e.g. 'The better response is'): "
                         "the judge's answer, A or B, is read as the token that follows them")
    return lines[-1]


def win_rate_of(outcomes: list[float]) -> dict[str, float]:
    """Mean per-prompt outcome (win 1, tie 0.5, loss 0) with its 95% Wilson interval (ties count
    half: tasks.reward_accuracy.wilson_interval, as for the reward accuracies)."""
    from tasks.reward_accuracy import wilson_interval

    n = len(outcomes)
    wins = sum(outcomes)
    low, high = wilson_interval(wins, n)
    return {"win_rate": wins / n, "win_rate_ci_low": low, "win_rate_ci_high": high}


def win_rate(policy_rewards: list[float], baseline_rewards: list[float]) -> dict:
    """win_rate_of the per-prompt reward comparisons; also returns the "outcomes"."""
    outcomes = [1.0 if p > b else 0.5 if p == b else 0.0 for p, b in zip(policy_rewards, baseline_rewards)]
    return {**win_rate_of(outcomes), "outcomes": outcomes}


def pairwise_outcomes(prompts: list[str], policy: list[str], baseline: list[str], prefers_a) -> list[float]:
    """Per-prompt outcome of the policy's response against the baseline's, judged in both orders.

    `prefers_a(prompts, responses_a, responses_b)` returns, per prompt, how much the judge prefers
    response A (> 0: A, < 0: B, 0: no preference). The policy wins (1) only if the judge prefers
    it both as A and as B, loses (0) only if it prefers the baseline both times; else a tie (0.5).
    A judge that always says "A" therefore ties every prompt.
    """
    policy_first = prefers_a(prompts, policy, baseline)
    baseline_first = prefers_a(prompts, baseline, policy)
    outcomes = []
    for first, second in zip(policy_first, baseline_first):
        if first > 0 and second < 0:
            outcomes.append(1.0)
        elif first < 0 and second > 0:
            outcomes.append(0.0)
        else:
            outcomes.append(0.5)
    return outcomes


def judge_answer_ids(tokenizer, template: str) -> list[int]:
    """The tokens of "A" and "B" as they follow the template's last words (" A" in a BPE vocabulary,
    "▁A" in a sentencepiece one): the first token of "... is A" beyond those of "... is"."""
    tail = judge_template_tail(template)
    n_tail = len(tokenizer(tail, add_special_tokens=False)["input_ids"])
    answer_ids = [tokenizer(f"{tail} {letter}", add_special_tokens=False)["input_ids"][n_tail] for letter in ("A", "B")]
    if answer_ids[0] == answer_ids[1]:
        raise ValueError(f"judge_lm's tokenizer gives 'A' and 'B' the same token ({answer_ids[0]}): it cannot answer")
    return answer_ids


def judge_questions(template: str, prompts, responses_a, responses_b) -> list[str]:
    """The judge's question per prompt (a conversational prompt written into it as text)."""
    from tasks.rewards import conversation_text

    return [template.rstrip().format(prompt=conversation_text(x), a=a, b=b) for x, a, b in zip(prompts, responses_a, responses_b)]


def lm_judge(model, tokenizer, max_length: int, batch_size: int, on_batch=None, template: str = JUDGE_TEMPLATE):
    """`prefers_a` for a causal LM judge: log p("A") - log p("B") as the token after `template`
    (conversational prompts are written into it as text)."""
    import torch

    from tasks.models import encode_prompts, pad

    answer_ids = judge_answer_ids(tokenizer, template)

    @torch.no_grad()
    def prefers_a(prompts, responses_a, responses_b) -> list[float]:
        model.eval()
        device = next(model.parameters()).device
        questions = judge_questions(template, prompts, responses_a, responses_b)
        preferences = []
        for start in range(0, len(questions), batch_size):
            encoded = [ids[-max_length:] for ids in encode_prompts(tokenizer, questions[start : start + batch_size])]
            input_ids = pad(encoded, tokenizer.pad_token_id, left=True).to(device)  # left: last token at -1
            attention_mask = pad([[1] * len(e) for e in encoded], 0, left=True).to(device)
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # positions start at each text's start
            logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).logits[:, -1]
            logps = torch.log_softmax(logits.float(), dim=-1)
            preferences += (logps[:, answer_ids[0]] - logps[:, answer_ids[1]]).tolist()
            if on_batch:
                on_batch()
        return preferences

    return prefers_a


@stage_kind("evaluate", EvaluateParams, output="metrics")
@reports_logps
def evaluate(ctx: StageContext) -> dict[str, float]:
    import json
    import math

    import pyarrow as pa
    import pyarrow.parquet as pq

    from tasks.logps import batched_logps
    from tasks.models import load_causal_lm, load_tokenizer, sample_responses
    from tasks.tables import read_table

    p: EvaluateParams = ctx.params
    if p.backend == "vllm":  # before any model is loaded: can it run here at all?
        from tasks.vllm_backend import require_vllm

        require_vllm("evaluate stage", "backend", p.vllm)
    prompts = read_table(ctx.inputs["prompts"], ["prompt"], what="prompts table").column("prompt").to_pylist()
    n = len(prompts)

    # The same seed for both: common random numbers make the comparison less noisy (and a policy
    # compared with itself ties on every prompt).
    sampling = dict(n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, max_new_tokens=p.max_new_tokens,
                    seed=ctx.seed, max_prompt_length=p.max_prompt_length)
    responses, kept = {}, {}  # kept: the hf policy, for the KL
    outcomes = None  # judge_lm on vLLM: judged while the engines run
    if p.backend == "vllm":
        from tasks.vllm_backend import Engines, judge_length, lm_judge as vllm_lm_judge, longest_prompt, sample_models

        # One engine per base model, policy and baseline (and judge_lm) together where one base serves them.
        models = {name: ctx.inputs[name] for name in ("policy", "baseline", "judge_lm") if name in ctx.inputs}
        needed = longest_prompt(models, prompts, p.max_prompt_length) + p.max_new_tokens
        if "judge_lm" in models:
            needed = max(needed, judge_length(models["judge_lm"], p.max_length) + 1)
        with Engines(models, p.vllm, ctx.seed, ctx.out, needed) as engines:
            with ctx.progress("evaluating (vllm)", total=2 * n) as bar:
                shown = {"policy": 0, "baseline": 0}

                def advance(name, done, total):
                    bar.advance(done - shown[name])
                    shown[name] = done

                sampled = sample_models(engines, ["policy", "baseline"], prompts, on_progress=advance, **sampling)
            responses = {name: [r[0] for r in rows] for name, rows in sampled.items()}
            if "judge_lm" in models:
                prefers_a = vllm_lm_judge(engines, "judge_lm", p.max_length, p.judge_template or JUDGE_TEMPLATE)
                outcomes = pairwise_outcomes(prompts, responses["policy"], responses["baseline"], prefers_a)
    else:
        with ctx.progress("evaluating", total=2 * math.ceil(n / p.batch_size)) as bar:
            for name in ("policy", "baseline"):
                model, tokenizer = load_causal_lm(ctx.inputs[name])
                responses[name] = [r[0] for r in sample_responses(model, tokenizer, prompts, batch_size=p.batch_size,
                                                                  on_batch=bar.advance, **sampling)]
                if name == "policy" and p.reference is not None:
                    kept["policy"] = model, tokenizer
                del model
    lengths = {name: [len(ids) for ids in load_tokenizer(ctx.inputs[name])(responses[name], add_special_tokens=False)["input_ids"]]
               for name in responses}
    kl = None
    if p.reference is not None:
        # KL(pi || pi_ref) = E_{y ~ pi}[log pi(y|x) - log pi_ref(y|x)], on the policy's own samples, by
        # transformers whichever backend sampled them.
        model, tokenizer = kept.pop("policy", None) or load_causal_lm(ctx.inputs["policy"])
        policy_logps, _ = batched_logps(model, tokenizer, prompts, responses["policy"], p.max_length, p.batch_size,
                                        max_prompt_length=p.max_prompt_length)
        del model
        reference, ref_tokenizer = load_causal_lm(ctx.inputs["reference"])
        ref_logps, _ = batched_logps(reference, ref_tokenizer, prompts, responses["policy"], p.max_length, p.batch_size,
                                     max_prompt_length=p.max_prompt_length)
        kl = sum(a - b for a, b in zip(policy_logps, ref_logps)) / n
        del reference

    def rewards_of(fn: str | None, model_input: str) -> dict[str, list[float]] | None:
        """Each side's rewards under a reward function or reward model (None: neither is named)."""
        if fn is not None:
            from tasks.rewards import resolve_reward_fn

            reward = resolve_reward_fn(fn, p.spec_dir)
            return {name: [float(reward(x, y)) for x, y in zip(prompts, responses[name])] for name in responses}
        if model_input in ctx.inputs:
            from tasks.models import batched_scores, load_reward_model
            from tasks.score import reward_model_prompts

            model, model_tokenizer = load_reward_model(ctx.inputs[model_input])
            model_prompts = reward_model_prompts(model_tokenizer, prompts)
            return {name: batched_scores(model, model_tokenizer, model_prompts, responses[name], p.max_length,
                                         p.batch_size) for name in responses}
        return None

    rewards = rewards_of(p.judge, "judge_model")
    proxy = rewards_of(p.proxy_fn, "proxy_model")
    if rewards is not None:
        outcomes = win_rate(rewards["policy"], rewards["baseline"])["outcomes"]
    elif outcomes is None:
        judge, judge_tokenizer = load_causal_lm(ctx.inputs["judge_lm"])
        prefers_a = lm_judge(judge, judge_tokenizer, p.max_length, p.batch_size, template=p.judge_template or JUDGE_TEMPLATE)
        outcomes = pairwise_outcomes(prompts, responses["policy"], responses["baseline"], prefers_a)

    metrics = {**win_rate_of(outcomes), "n": float(n)}
    if rewards is not None:
        metrics["reward_policy"] = sum(rewards["policy"]) / n
        metrics["reward_baseline"] = sum(rewards["baseline"]) / n
    metrics["length_policy"] = sum(lengths["policy"]) / n
    metrics["length_baseline"] = sum(lengths["baseline"]) / n
    if proxy is not None:
        metrics["proxy_reward_policy"] = sum(proxy["policy"]) / n
        metrics["proxy_reward_baseline"] = sum(proxy["baseline"]) / n
    if kl is not None:
        metrics["kl"] = kl
    (ctx.out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    samples = {
        "prompt": prompts,
        "policy_response": responses["policy"],
        "baseline_response": responses["baseline"],
        "outcome": outcomes,
    }
    if rewards is not None:
        samples["policy_reward"] = rewards["policy"]
        samples["baseline_reward"] = rewards["baseline"]
    pq.write_table(pa.table(samples), ctx.out / "samples.parquet")
    return metrics
