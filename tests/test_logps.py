"""Log-probs are right on every architecture a user may bring, or the model is refused.

Tiny random configurations of ten architectures are saved as a user's model folders; one CLI run
computes `ref_logps` and trains `dpo` on each. The reference log-probs and dpo's first-step
`logps/chosen` must equal a full-logits computation, one sequence at a time with no padding
(textbook log_softmax of model(...).logits), to 2e-3.
"""
from __future__ import annotations

import json

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


def test_every_architecture_is_right_or_refused(tmp_path):
    spec = {"name": "architectures", "seed": 0, "models": {}, "stages": {},
            "datasets": {"prefs": {"kind": "jsonl", "path": "prefs.jsonl", "format": "preferences"}}}
    (tmp_path / "prefs.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    for name in ARCHITECTURES:
        save_model_folder(tmp_path / name, name)
        spec["models"][name] = {"kind": "pretrained", "path": name}
        spec["stages"][f"ref_{name}"] = {"kind": "ref_logps", "pairs": "prefs", "reference": name, "max_length": 64}
        spec["stages"][f"dpo_{name}"] = {"kind": "dpo", "policy": name, "pairs": f"ref_{name}", "epochs": 1,
                                         "batch_size": len(PAIRS), "lr": 1e-3, "max_length": 64}
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    home = tmp_path / "home"
    result = alignflow("run", tmp_path / "spec.yaml", home=home, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

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
    tagged = {r.data.tags["alignflow.stage"] for r in stage_runs(home, "architectures")
              if "alignflow.logps_fallback" in r.data.tags}
    assert tagged == {"ref_falconh1", "dpo_falconh1"}


def _built_from(artifact, name: str) -> bool:
    return json.loads((artifact / "manifest.json").read_text())["stage"] in (f"ref_{name}", f"dpo_{name}")


def test_a_wrong_fast_path_falls_back_once_per_configuration(monkeypatch, caplog):
    """A head the split cannot see (logits scaled after lm_head) fails the probe: the plain path is
    used, with a warning, and the probe runs once for every model of that configuration."""
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
    with caplog.at_level("WARNING", logger="tasks.logps"):
        verdict = logps.fast_paths(ScaledLlama(config))
        assert logps.fast_paths(ScaledLlama(config)) == verdict and len(probes) == 1
    assert not verdict.head and "response-only output layer disagrees" in caplog.text
    model = ScaledLlama(config).eval()
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
    verdict, error = gpu_core_check.check(tmp_path / "llama", PAIRS, "float32", "cpu")
    assert verdict.head and verdict.shared_prompt and error <= 2e-3
    _, error = gpu_core_check.check(tmp_path / "llama", PAIRS, "autocast", "cpu")
    assert 0 < error <= 5e-2
