"""Log-probs are right on every architecture a user may bring, or the model is refused.

Tiny random configurations of ten architectures are saved as a user's model folders; one CLI run
computes `ref_logps` and trains `dpo` on each (and runs every stage kind that computes log-probs
on FalconH1, whose fast paths are refused). The reference log-probs and dpo's first-step
`logps/chosen` must equal a full-logits computation, one sequence at a time with no padding
(textbook log_softmax of model(...).logits), to 2e-3. Held batches (above the output layer's
chunk threshold; online's layout) are checked on each architecture in process.
"""
from __future__ import annotations

import json
import re

import pyarrow.parquet as pq
import pytest
import torch
import transformers as T
import yaml

from conftest import REPO, alignflow, stage_runs
from tasks.models import build_word_tokenizer, encode_examples

WORDS = "a b c d e f g h i j k l m n o p :".split()
PAIRS = [
    {"prompt": "a b c d :", "chosen": "e f g", "rejected": "h"},
    {"prompt": "i :", "chosen": "j k", "rejected": "l m n o p a"},
    {"prompt": "b b c :", "chosen": "d", "rejected": "e e f"},
]
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, max_position_embeddings=64)
# Library defaults otherwise (GPT-2 keeps its dropout of 0.1: dpo must train without it).
ARCHITECTURES = {
    "llama": (T.LlamaConfig, SMALL),
    "qwen2": (T.Qwen2Config, SMALL),
    "mistral": (T.MistralConfig, {**SMALL, "sliding_window": 4}),
    "gemma2": (T.Gemma2Config, {**SMALL, "head_dim": 16, "sliding_window": 4}),  # soft-capped logits
    "gpt2": (T.GPT2Config, dict(n_embd=32, n_layer=2, n_head=2, n_positions=64)),
    "gptneo": (T.GPTNeoConfig, dict(hidden_size=32, num_layers=2, num_heads=2, window_size=4,
                                    attention_types=[[["global", "local"], 1]], max_position_embeddings=64)),
    "falconh1": (T.FalconH1Config, {**SMALL, "head_dim": 16, "mamba_d_ssm": 32, "mamba_n_heads": 4, "mamba_d_head": 8,
                                    "mamba_d_state": 8, "mamba_n_groups": 1, "mamba_chunk_size": 8,
                                    "lm_head_multiplier": 0.5}),
    "granite": (T.GraniteConfig, {**SMALL, "logits_scaling": 2.0}),
    "cohere": (T.CohereConfig, {**SMALL, "logit_scale": 0.5}),
    "phi3": (T.Phi3Config, SMALL),
}


def save_model_folder(folder, name: str) -> None:
    tokenizer = build_word_tokenizer(WORDS)
    config_class, options = ARCHITECTURES[name]
    config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **options)
    torch.manual_seed(0)
    model = T.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def full_logits_logps(folder, prompts, responses) -> list[float]:
    """Summed response log-probs, one unpadded sequence at a time, from every position's logits."""
    model = T.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = T.AutoTokenizer.from_pretrained(folder)
    out = []
    for e in encode_examples(tokenizer, prompts, responses, 10_000):
        ids, labels = torch.tensor([e["input_ids"]]), torch.tensor(e["labels"][1:])
        with torch.no_grad():
            logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        mask = labels != -100
        out.append(logps[mask].gather(1, labels[mask, None]).sum().item())
    return out


# Every stage kind that computes log-probs, on FalconH1 (its output layer is refused by name, its
# sampling's shared prefill by its check): each must report the fallback. (ppo on Gemma 2, refused
# by name too: its value model is a sequence classifier, which transformers lacks for FalconH1.)
FALCON_STAGES = {
    "sft_falconh1": {"kind": "sft", "model": "falconh1", "data": "sft_data", "max_steps": 1, "batch_size": 2,
                     "max_length": 32},
    "rrhf_falconh1": {"kind": "rrhf", "policy": "falconh1", "candidates": "scored", "max_steps": 1, "batch_size": 2,
                      "max_length": 32},
    "pairs_falconh1": {"kind": "pairs", "scored": "scored", "reference": "falconh1", "max_length": 32},
    "evaluate_falconh1": {"kind": "evaluate", "policy": "falconh1", "baseline": "falconh1", "reference": "falconh1",
                          "prompts": "prompts", "judge": "brevity", "max_new_tokens": 4, "max_length": 32},
    "reward_accuracy_falconh1": {"kind": "reward_accuracy", "id": "prefs", "dporm_policy": "falconh1",
                                 "dporm_reference": "falconh1", "max_length": 32},
    **{f"{kind}_{name}": {"kind": kind, "policy": name, "prompts": "prompts", "reward_fn": "brevity", "max_steps": 1,
                          "batch_size": 2, "samples_per_prompt": 2, "max_new_tokens": 4, "max_length": 32}
       for kind, name in (("rloo", "falconh1"), ("grpo", "falconh1"), ("ppo", "gemma2"))},
}
REFUSED_BY_NAME = ("gemma2", "falconh1", "granite", "cohere")  # a logit transform in the configuration


@pytest.fixture(scope="module")
def architectures_run(tmp_path_factory):
    """One CLI run: ref_logps and dpo on each architecture, FALCON_STAGES; (folder, home, result)."""
    tmp_path = tmp_path_factory.mktemp("architectures")
    spec = {"name": "architectures", "seed": 0, "models": {}, "stages": {},
            "datasets": {"prefs": {"kind": "jsonl", "path": "prefs.jsonl", "format": "preferences"},
                         **{name: {"kind": "jsonl", "path": f"{name}.jsonl"} for name in ("sft_data", "scored", "prompts")}}}
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    rows = {"sft_data": [{"prompt": p["prompt"], "response": p["chosen"]} for p in PAIRS],
            "scored": [{"prompt": p["prompt"], "response": p[side], "reward": float(side == "chosen")}
                       for p in PAIRS for side in ("chosen", "rejected")],
            "prompts": [{"prompt": p["prompt"]} for p in PAIRS]}
    for name, lines in rows.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    for name in ARCHITECTURES:
        save_model_folder(tmp_path / name, name)
        spec["models"][name] = {"kind": "pretrained", "path": name}
        spec["stages"][f"ref_{name}"] = {"kind": "ref_logps", "pairs": "prefs", "reference": name, "max_length": 64}
        spec["stages"][f"dpo_{name}"] = {"kind": "dpo", "policy": name, "pairs": f"ref_{name}", "epochs": 1,
                                         "batch_size": len(PAIRS), "lr": 1e-3, "max_length": 64}
    spec["stages"].update(FALCON_STAGES)
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / "home"
    result = alignflow("run", tmp_path / "spec.yaml", home=home, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return tmp_path, home, result


def test_every_architecture_is_right_or_refused(architectures_run):
    tmp_path, home, _ = architectures_run
    prompts = [p["prompt"] for p in PAIRS]
    for name in ARCHITECTURES:
        expected = {side: full_logits_logps(tmp_path / name, prompts, [p[side] for p in PAIRS])
                    for side in ("chosen", "rejected")}
        (ref_dir,) = [d for d in (home / "store" / "ref_logps").iterdir() if _built_from(d, name)]
        table = pq.read_table(ref_dir / "data.parquet").to_pydict()
        for side in ("chosen", "rejected"):
            assert table[f"ref_{side}_logp"] == pytest.approx(expected[side], abs=2e-3), (name, side)
        (dpo_dir,) = [d for d in (home / "store" / "dpo").iterdir() if _built_from(d, name)]
        first = json.loads((dpo_dir / "metrics_history.jsonl").read_text().splitlines()[0])
        assert first["logps/chosen"] == pytest.approx(sum(expected["chosen"]) / len(PAIRS), abs=2e-3), name
        if name == "falconh1":  # lm_head_multiplier: the response-only head is refused, and the run says so
            assert json.loads((dpo_dir / "manifest.json").read_text())["metrics"]["logps_fallback"] == 1


def test_every_stage_kind_reports_its_fallback(architectures_run):
    """Every stage that computes log-probs with a refused fast path says so: the metric, the MLflow
    tag and a warning in its own log, whichever its kind (FalconH1's rloo runs: its shared prefill
    is refused, not fatal)."""
    _, home, result = architectures_run
    runs = {r.data.tags["alignflow.stage"]: r for r in stage_runs(home, "architectures")}
    tagged = {stage for stage, r in runs.items() if "alignflow.logps_fallback" in r.data.tags}
    assert tagged == {f"{kind}_{name}" for kind in ("ref", "dpo") for name in REFUSED_BY_NAME} | set(FALCON_STAGES)
    for stage in tagged:
        assert runs[stage].data.metrics["logps_fallback"] >= 1, stage
    for stage in ("rloo_falconh1", "grpo_falconh1"):  # the output layer and the shared prefill
        assert runs[stage].data.metrics["logps_fallback"] == 2, stage
    warnings = [line for line in result.stderr.splitlines() if "the plain computation is used instead" in line]

    def warned(text: str) -> bool:  # a line of the stage's log (Prefect's format: "time | WARNING | logger - text")
        return any(re.search(rf"(^|\s){re.escape(text)}", line) for line in warnings)

    for kind in ("ref_logps", "dpo", "sft", "rrhf", "pairs", "evaluate", "reward_accuracy", "rloo", "grpo"):
        assert warned(f"{kind}: FalconH1ForCausalLM: "), kind
    assert warned("ppo: Gemma2ForCausalLM: ")
    assert warned("rloo: FalconH1ForCausalLM: sampling's shared prefill fails")


def _built_from(artifact, name: str) -> bool:
    return json.loads((artifact / "manifest.json").read_text())["stage"] in (f"ref_{name}", f"dpo_{name}")


def test_a_wrong_fast_path_falls_back_once_per_model(monkeypatch, caplog):
    """A head the split cannot see (logits scaled after lm_head) fails the probe: the plain path is
    used, with a warning, and the probe runs once per model (its verdict is for its weights)."""
    from tasks import logps

    class ScaledLlama(T.LlamaForCausalLM):  # what FalconH1's lm_head_multiplier does
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    tokenizer = build_word_tokenizer(WORDS)
    config = T.LlamaConfig(vocab_size=len(tokenizer), **SMALL, pad_token_id=tokenizer.pad_token_id)
    probes = []
    monkeypatch.setattr(logps, "probe", lambda model, real=logps.probe: probes.append(1) or real(model))
    model = ScaledLlama(config)
    with caplog.at_level("WARNING", logger="tasks.logps"):
        verdict = logps.fast_paths(model)
        assert logps.fast_paths(model) == verdict and len(probes) == 1
        logps.fast_paths(ScaledLlama(config))
        assert len(probes) == 2
    assert not verdict.head and "response-only output layer disagrees" in caplog.text
    model.eval()
    batch = logps.collate_pairs(logps.probe_pairs(len(tokenizer)), tokenizer.pad_token_id)
    with torch.no_grad():
        ours = logps.pair_logps(model, batch)[0]
        plain = logps.pair_logps(model, batch, head_ok=False, shared_ok=False)[0]
    torch.testing.assert_close(ours, plain)


def test_a_model_that_cannot_score_is_refused():
    from tasks import logps
    from tasks.base import BadInput

    class Broken(T.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            raise RuntimeError("no kernel for this device")

    config = T.LlamaConfig(vocab_size=20, **{**SMALL, "hidden_size": 16, "intermediate_size": 24})
    with pytest.raises(BadInput, match="model: a causal LM whose forward pass gives logits"):
        logps.fast_paths(Broken(config))


def test_reference_and_trainer_max_length_must_agree(tmp_path):
    from flows.errors import SpecError
    from flows.spec import load_spec

    (tmp_path / "prefs.jsonl").write_text(json.dumps(PAIRS[0]) + "\n")
    spec = {"name": "lengths", "models": {"m": {"kind": "tiny", "task": "demo"}},
            "datasets": {"prefs": {"kind": "jsonl", "path": "prefs.jsonl", "format": "preferences"}},
            "stages": {"ref": {"kind": "ref_logps", "pairs": "prefs", "reference": "m", "max_length": 128},
                       "train": {"kind": "dpo", "policy": "m", "pairs": "ref"}}}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    with pytest.raises(SpecError, match=r"stages.train.max_length.*512 differs from stages.ref.max_length \(128\)"):
        load_spec(tmp_path / "spec.yaml")
    spec["stages"]["train"]["max_length"] = 128
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    load_spec(tmp_path / "spec.yaml")


# ---- token sanity -------------------------------------------------------------------------------


def test_a_tokenizer_that_does_not_fit_drops_rows():
    """A tokenizer that turns a text into nothing (another class than the model's, say)."""
    from tasks.base import BadInput
    from tasks.models import screen_texts

    class Empty:  # tokenizes anything with an "x" to nothing
        unk_token_id, unk_token = None, None

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[] if "x" in t else [5] * len(t.split()) for t in texts]}

    columns = {"prompt": ["a b", "x y", "c"], "response": ["d", "e", "xx"]}
    assert screen_texts(Empty(), columns, "f.parquet", strict=False) == ([0], {"dropped_no_tokens": 2.0})
    with pytest.raises(BadInput, match="f.parquet: row 2: prompt"):
        screen_texts(Empty(), columns, "f.parquet", strict=True)


def test_texts_that_tokenize_to_nothing_are_dropped_or_refused(tmp_path, run_stage, tiny_demo_model, caplog):
    """Never scored as eos alone: a pair whose text has no tokens is dropped and counted, or under
    strict an error naming the row; a table of mostly unknown words warns and reports unk_fraction."""
    import pyarrow as pa

    from tasks.base import BadInput
    from tasks.tables import write_table

    prefs = tmp_path / "prefs"
    prefs.mkdir()
    write_table(pa.table({"prompt": ["animals cat :", "  ", "tools saw :"],
                          "chosen": ["good cat", "good dog", "fine saw"],
                          "rejected": ["bad cat", "bad dog", ""]}), prefs)  # a blank response: eos alone is right
    with caplog.at_level("WARNING"):
        out, metrics = run_stage({"kind": "ref_logps", "pairs": "p", "reference": "m"},
                                 {"pairs": prefs, "reference": tiny_demo_model})
    assert metrics["dropped_no_tokens"] == 1 and metrics["pairs"] == 2
    assert pq.read_table(out / "data.parquet").column("prompt").to_pylist() == ["animals cat :", "tools saw :"]
    with pytest.raises(BadInput, match=r"row 2: prompt: text that tokenizes to at least one token"):
        run_stage({"kind": "ref_logps", "pairs": "p", "reference": "m", "strict": True},
                  {"pairs": prefs, "reference": tiny_demo_model})

    write_table(pa.table({"prompt": ["hh format : human says hello"], "chosen": ["assistant answers politely"],
                          "rejected": ["cat"]}), prefs)
    with caplog.at_level("WARNING"):
        _, metrics = run_stage({"kind": "ref_logps", "pairs": "p", "reference": "m"},
                               {"pairs": prefs, "reference": tiny_demo_model})
    assert metrics["unk_fraction"] > 0.5 and "unknown token" in caplog.text


# ---- one interval method -------------------------------------------------------------------------


@pytest.mark.parametrize("outcomes", [[1.0] * 49 + [0.0], [1.0] * 40 + [0.5] * 6 + [0.0] * 4, [0.5] * 10])
def test_win_rate_has_the_wilson_interval_with_ties_half(outcomes):
    """Not Wald's (which clipped at 1.000): the Wilson bounds solve (p_hat - p)^2 = z^2 p (1 - p) / n,
    with p_hat = (wins + ties / 2) / n, and stay strictly inside (0, 1)."""
    from tasks.evaluate import win_rate_of
    from tasks.reward_accuracy import ranking_accuracy

    m = win_rate_of(outcomes)
    n, p_hat = len(outcomes), sum(outcomes) / len(outcomes)
    assert m["win_rate"] == pytest.approx(p_hat)
    assert 0 < m["win_rate_ci_low"] < p_hat < m["win_rate_ci_high"] < 1
    for bound in (m["win_rate_ci_low"], m["win_rate_ci_high"]):
        assert (p_hat - bound) ** 2 == pytest.approx(1.959964**2 * bound * (1 - bound) / n, rel=1e-4)
    # the accuracies: the same interval for the same proportion
    chosen = [1.0 if o == 1 else 0.0 if o == 0.5 else -1.0 for o in outcomes]
    acc = ranking_accuracy(chosen, [0.0] * n)
    assert (acc["ci_low"], acc["ci_high"]) == pytest.approx((m["win_rate_ci_low"], m["win_rate_ci_high"]))


def test_the_gpu_check_compares_reference_logps_with_full_logits(tmp_path, monkeypatch):
    """bench/gpu_core_check.py, what a GPU machine runs first, here on the CPU: reference_logps
    equals float32 full logits; under bfloat16 autocast it is off by rounding, within the probe's
    half-precision tolerance."""
    monkeypatch.syspath_prepend(str(REPO / "bench"))
    import gpu_core_check

    save_model_folder(tmp_path / "llama", "llama")
    verdict, error, chunked_error, _ = gpu_core_check.check(tmp_path / "llama", PAIRS, "float32", "cpu")
    assert verdict.head and verdict.shared_prompt and error <= 2e-3 and chunked_error <= 2e-3
    _, error, chunked_error, _ = gpu_core_check.check(tmp_path / "llama", PAIRS, "autocast", "cpu")
    assert 0 < error <= 5e-2 and 0 < chunked_error <= 5e-2


# ---- the output layer as a module, in chunks -------------------------------------------------


def random_pairs(vocab: int, n_pairs: int, prompt: int, response: int, seed: int = 0) -> list[dict]:
    """Preference pairs of random ordinary tokens (ids 4 and up), in pair_examples' layout."""
    g = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(4, vocab, (n,), generator=g).tolist()

    pairs = []
    for i in range(n_pairs):
        p = tokens(prompt + i)
        pairs.append({side: {"input_ids": p + (r := tokens(response - 3 * i + 2 * (side == "chosen"))),
                             "labels": [-100] * len(p) + r} for side in ("chosen", "rejected")})
    return pairs


def textbook_logps(model, examples: list[dict], temperature: float = 1.0) -> torch.Tensor:
    """Summed response log-probs, one unpadded sequence at a time, from every position's logits."""
    out = []
    with torch.no_grad():
        for e in examples:
            logits = model(input_ids=torch.tensor([e["input_ids"]])).logits[0, :-1].float() / temperature
            labels = torch.tensor(e["labels"][1:])
            mask = labels != -100
            out.append(torch.log_softmax(logits, -1)[mask].gather(1, labels[mask, None]).sum())
    return torch.stack(out)


class ScaledHead(torch.nn.Linear):
    """An output layer whose own forward scales its logits (what F.linear(hidden, head.weight) skips)."""

    def forward(self, hidden):
        return super().forward(hidden) * 0.5


def test_a_head_subclass_takes_part_past_the_chunk_threshold():
    """A 65536-token vocabulary and 1200 response tokens: past HEAD_CHUNK_BYTES, reference_logps
    runs the output layer in chunks, each through the head's own forward, and equals the full
    logits (the same batch through F.linear on head.weight was 0.88 nats off, and the probe missed
    it: its ~15 response tokens never chunked)."""
    from tasks import logps
    from tasks.base import no_progress

    vocab = 65536
    config = T.LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config).eval()
    head = ScaledHead(16, vocab, bias=False)
    head.weight.data = model.lm_head.weight.data * 20  # trained-size logits
    model.lm_head = head
    pairs = random_pairs(vocab, 4, prompt=10, response=150)
    assert sum(logps.response_tokens(e[side]) for e in pairs for side in e) * vocab * 4 > logps.HEAD_CHUNK_BYTES
    verdict = logps.fast_paths(model)
    assert verdict.head and verdict.shared_prompt
    logps.reference_logps(model, pairs, 0, 4, no_progress)
    for side in ("chosen", "rejected"):
        expected = textbook_logps(model, [e[side] for e in pairs])
        got = torch.tensor([e[f"ref_{side}"] for e in pairs])
        torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)


@pytest.mark.parametrize("head", ["lora", "hook"])
def test_the_chunked_head_trains_what_the_plain_path_trains(head):
    """A LoRA adapter on lm_head, or a forward hook on it, takes part in every chunk: the values and
    the gradients (the adapter's, every weight's) equal the plain full-logits path's."""
    from tasks import logps
    from tasks.train import LoraParams
    from tasks.train.lora import add_lora

    config = T.LlamaConfig(vocab_size=50, **SMALL, pad_token_id=0)
    torch.manual_seed(0)
    model = T.LlamaForCausalLM(config)
    if head == "lora":
        model = add_lora(model, LoraParams(r=4, dropout=0.0, target_modules=["lm_head", "q_proj"]), seed=0)
        for name, q in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(q, std=0.5)
    else:
        model.lm_head.register_forward_hook(lambda module, args, out: out * 0.5 + 0.1 * out.pow(2))
    batch = logps.collate_pairs(random_pairs(50, 3, prompt=4, response=9), 0)
    results = []
    for chunk_rows, head_ok in ((None, False), (4, True)):
        model.zero_grad()
        values = logps.pair_logps(model, batch, head_ok=head_ok, shared_ok=False, chunk_rows=chunk_rows)[0]
        (values * torch.linspace(-1, 2, len(values))).sum().backward()
        results.append((values.detach(), [q.grad.clone() for q in model.parameters() if q.grad is not None]))
    (plain, plain_grads), (chunked, chunked_grads) = results
    torch.testing.assert_close(chunked, plain, atol=1e-5, rtol=1e-6)
    assert len(chunked_grads) == len(plain_grads) > 0
    for a, b in zip(chunked_grads, plain_grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


# ---- held batches on every architecture ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_models")
    for name in ARCHITECTURES:
        save_model_folder(folder / name, name)
    return folder


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_held_batches_agree_with_full_logits(name, tiny_models):
    """Batches the probe never saw, through the paths verified for the model: pairs whose output
    layer runs in chunks (chunk_rows: as past the threshold), and a rollout in online's layout
    (left-padded prompts, K = 3 samples each, responses cut at eos, temperature 0.7)."""
    from tasks import logps
    from tasks.models import load_causal_lm, pad
    from tasks.train.online import response_logps

    model, tokenizer = load_causal_lm(tiny_models / name)
    vocab = len(tokenizer)
    pairs = random_pairs(vocab, 3, prompt=4, response=8, seed=1)
    batch = logps.pair_collate(model)(pairs, tokenizer.pad_token_id)
    with torch.no_grad():
        got, _ = logps.pair_logps(model.eval(), batch, chunk_rows=5)
    expected = textbook_logps(model, [e["chosen"] for e in pairs] + [e["rejected"] for e in pairs])
    torch.testing.assert_close(got, expected, atol=2e-3, rtol=0)

    g = torch.Generator().manual_seed(2)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    prompts = [[bos] + torch.randint(4, vocab, (n,), generator=g).tolist() for n in (2, 5, 3)]
    responses = [torch.randint(4, vocab, (n,), generator=g).tolist() + ([eos] if n % 2 else [])
                 for n in (3, 6, 1, 4, 5, 2, 6, 1, 3)]  # 3 per prompt, some ending in eos
    rows = [(prompts[i // 3], r) for i, r in enumerate(responses)]
    mask = pad([[1] * len(r) for _, r in rows], 0).bool()
    rollout = {"sequences": torch.cat([pad([p for p, _ in rows], tokenizer.pad_token_id, left=True),
                                       pad([r for _, r in rows], tokenizer.pad_token_id)], 1),
               "attention_mask": torch.cat([pad([[1] * len(p) for p, _ in rows], 0, left=True), mask.long()], 1),
               "mask": mask}
    with torch.no_grad():
        got = response_logps(model, rollout, max(map(len, prompts)), temperature=0.7).sum(1)
    examples = [{"input_ids": p + r, "labels": [-100] * len(p) + r} for p, r in rows]
    torch.testing.assert_close(got, textbook_logps(model, examples, temperature=0.7), atol=2e-3, rtol=0)


# ---- the verdict holds for the weights it was made on ----------------------------------------------


def save_recurrent_gemma(folder) -> None:
    """A tiny RecurrentGemma: its logits are soft-capped at 30 (logits_soft_cap) after the output layer."""
    tokenizer = build_word_tokenizer(WORDS)
    config = T.RecurrentGemmaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=16, lru_width=32,
                                    attention_window_size=16, block_types=["recurrent", "attention"],
                                    pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                                    eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    T.AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def test_a_soft_cap_that_grows_during_training_is_caught(tmp_path, run_stage, monkeypatch, caplog):
    """RecurrentGemma's soft cap, as if missing from LOGIT_TRANSFORMS: at random init the probe
    accepts the response-only output layer (the cap changes nothing yet); training grows the logits
    into the cap, the re-probe at the end of training refuses it, and the stage is recomputed on the
    plain path: the artifact equals a training on the plain path from the start. At a checkpoint,
    the drift is caught before the checkpoint is written. Without a stage around it, it is an error
    naming the path."""
    import pyarrow as pa

    from tasks import logps
    from tasks.base import StageContext
    from tasks.logps_report import FastPathDrift
    from tasks.models import load_causal_lm
    from tasks.tables import write_table

    save_recurrent_gemma(tmp_path / "rg")
    data = tmp_path / "data"
    data.mkdir()
    write_table(pa.table({"prompt": ["a b :", "c d :", "e :", "f g h :"] * 4, "response": ["i j k", "l m", "n o p", "a a"] * 4}), data)
    params = {"kind": "sft", "model": "rg", "data": "d", "lr": 0.05, "max_steps": 20, "batch_size": 8, "max_length": 32}
    inputs = {"model": tmp_path / "rg", "data": data}

    missing = tuple(n for n in logps.LOGIT_TRANSFORMS if n != "logits_soft_cap")
    monkeypatch.setattr(logps, "LOGIT_TRANSFORMS", missing)
    start = load_causal_lm(tmp_path / "rg")[0]
    assert logps.probe(start).head  # invisible at init
    with caplog.at_level("WARNING", logger="tasks.logps"):
        caught, metrics = run_stage(params, inputs)
    assert metrics["logps_fallback"] == 1
    assert "sft: the end of training (step 20): the response-only output layer disagrees" in caplog.text
    trained = load_causal_lm(caught)[0]
    assert not logps.probe(trained).head  # 0.2 nats off after 20 steps

    monkeypatch.setattr(logps, "LOGIT_TRANSFORMS", missing + ("logits_soft_cap",))
    plain, _ = run_stage(params, inputs)
    expected = load_causal_lm(plain)[0].state_dict()
    for key, value in trained.state_dict().items():
        torch.testing.assert_close(value, expected[key], atol=1e-5, rtol=1e-4)

    monkeypatch.setattr(logps, "LOGIT_TRANSFORMS", missing)  # with checkpoints: caught at one
    caplog.clear()
    from tasks import load_stage_kinds

    kind = load_stage_kinds()["sft"]
    ctx = StageContext(out=tmp_path / "checkpointed", inputs=inputs, seed=0, checkpoints=tmp_path / "checkpoints",
                       params=kind.params.model_validate({**params, "checkpoint_every": 4}))
    ctx.out.mkdir()
    with caplog.at_level("WARNING", logger="tasks.logps"):
        assert kind.run(ctx)["logps_fallback"] == 1
    assert "sft: training step " in caplog.text and "disagrees" in caplog.text
    assert "the end of training" not in caplog.text

    model = load_causal_lm(tmp_path / "rg")[0]
    logps.fast_paths(model)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)  # tied to the embedding, as trained logits would be
    with pytest.raises(FastPathDrift, match="a checkpoint: .*the response-only output layer disagrees"):
        logps.recheck(model, "a checkpoint")


def test_falconh1_samples_without_the_shared_prefill(tmp_path, caplog):
    """FalconH1's hybrid cache, computed once and copied to a prompt's samples, fails to decode:
    the shared prefill's check refuses it once, with a warning, and sampling draws what it draws
    with each sample's own prefill."""
    from tasks.models import load_causal_lm
    from tasks.train.online import sample

    save_model_folder(tmp_path / "falconh1", "falconh1")
    model, tokenizer = load_causal_lm(tmp_path / "falconh1")
    bos = tokenizer.bos_token_id
    prompts = [[bos, 3, 4, 5], [bos, 6], [bos, 7, 8, 9, 10, 11]]
    samples = []
    with caplog.at_level("WARNING", logger="tasks.logps"):
        for shared in (True, False):
            torch.manual_seed(0)
            samples.append(sample(model, tokenizer, prompts, 4, 1.0, 1.0, 6, shared_prefill=shared))
    assert "FalconH1ForCausalLM: sampling's shared prefill fails" in caplog.text
    for key in ("sequences", "attention_mask", "mask"):
        assert torch.equal(samples[0][key], samples[1][key]), key


# ---- the logit transforms: every one transformers has ------------------------------------------


def logit_transform_fields() -> set[str]:
    """The numeric configuration fields each transformers causal LM's forward reads where it
    computes its logits from the output layer's (from its first `logits =` to its loss or return),
    the vocabulary size aside. Read from transformers' source files (importing every model would
    take a minute): each configuration's annotated fields, each model class's forward."""
    from pathlib import Path

    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    models = Path(T.__file__).parent / "models"
    annotations: dict[str, set[str]] = {}
    for file in models.glob("*/configuration_*.py"):
        for name, annotation in re.findall(r"^    (\w+): ([^=\n]+?) = ", file.read_text(), re.M):
            annotations.setdefault(name, set()).add(annotation)
    classes: dict[str, str] = {}
    for file in models.glob("*/modeling_*.py"):
        for match in re.finditer(r"^class (\w+)\(.*?(?=^class |\Z)", file.read_text(), re.M | re.S):
            classes.setdefault(match.group(1), match.group(0))

    def numeric(name: str) -> bool:
        return any(re.search(r"\b(float|int)\b", a) and not re.search(r"bool|str", a) for a in annotations.get(name, ()))

    found = set()
    for class_name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        source = classes[class_name]
        lines = source[source.find("def forward("):].splitlines()
        start = next((i for i, line in enumerate(lines) if re.search(r"\blogits\s*=", line)), len(lines))
        for line in lines[start:]:
            if re.search(r"\bloss\b|\breturn\b", line):
                break
            found |= {name for name in re.findall(r"\.(\w+)", line) if name != "vocab_size" and numeric(name)}
    return found


def test_the_logit_transforms_are_every_one_transformers_has():
    """LOGIT_TRANSFORMS is what the scan of transformers' causal LMs finds (rerun when transformers
    changes): soft caps and scales after the output layer, RecurrentGemma's logits_soft_cap among them."""
    from tasks import logps

    found = logit_transform_fields()
    assert {"logits_soft_cap", "final_logit_softcapping", "lm_head_multiplier", "logit_scale"} <= found
    assert found <= set(logps.LOGIT_TRANSFORMS), f"add to LOGIT_TRANSFORMS: {sorted(found - set(logps.LOGIT_TRANSFORMS))}"
