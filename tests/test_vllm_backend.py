"""The vllm backend of generate and evaluate, without a GPU.

- Where vLLM cannot run (no CUDA GPU, no vllm package), `backend: vllm` is bad input: exit code 2
  from the CLI, a message naming the field, what is missing and the fix, before any model loads.
- Our backend code against a stand-in `vllm` package (FAKE_VLLM below: `LLM` runs the artifact
  with transformers, greedily at temperature 0, and by a fixed seeded rule otherwise), with
  torch.cuda.is_available patched to True: the prompt token ids the hf backend uses, the settings
  mapped onto LLM(...) and SamplingParams(...), and the artifact the hf backend writes (same
  schema; for greedy decoding, the same responses). The stage's real path runs, child process
  included: the stand-in is found on PYTHONPATH.
"""
from __future__ import annotations

import contextlib
import json
import sys
import textwrap
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from conftest import alignflow

FAKE_VLLM = '''
"""A stand-in for vllm (tests/test_vllm_backend.py): same entry points, computed by transformers."""
import json
import os

import torch
from transformers import AutoModelForCausalLM

CALLS = []  # in-process record; the child process appends to $FAKE_VLLM_LOG as well


class SamplingParams:
    def __init__(self, n=1, temperature=1.0, top_p=1.0, max_tokens=16, seed=None, stop_token_ids=None,
                 detokenize=True):
        self.n, self.temperature, self.top_p, self.max_tokens = n, temperature, top_p, max_tokens
        self.seed, self.stop_token_ids, self.detokenize = seed, list(stop_token_ids or []), detokenize


class CompletionOutput:
    def __init__(self, index, token_ids):
        self.index, self.token_ids = index, tuple(token_ids)


class RequestOutput:
    def __init__(self, outputs):
        self.outputs = outputs


class LLM:
    def __init__(self, model, **kwargs):
        self.kwargs = {"model": model, **kwargs}
        self.model_has_config = os.path.exists(os.path.join(model, "config.json"))
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()

    @torch.no_grad()
    def generate(self, prompts, sampling_params, use_tqdm=True):
        call = {"llm": self.kwargs, "model_has_config": self.model_has_config,
                "prompts": [list(p["prompt_token_ids"]) for p in prompts],
                "sampling": [vars(s) for s in sampling_params], "use_tqdm": use_tqdm}
        CALLS.append(call)
        if os.environ.get("FAKE_VLLM_LOG"):
            with open(os.environ["FAKE_VLLM_LOG"], "a") as log:
                log.write(json.dumps(call) + "\\n")
        outputs = []
        for prompt, params in zip(prompts, sampling_params):
            eos = params.stop_token_ids[0]
            samples = [CompletionOutput(i, self._one(prompt["prompt_token_ids"], params, i, eos)) for i in range(params.n)]
            outputs.append(RequestOutput(samples[::-1]))  # out of order: the caller sorts by index
        return outputs

    def _one(self, prompt, params, i, eos):
        if params.temperature == 0:  # greedy, one prompt at a time, no padding
            ids = torch.tensor([prompt])
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=params.max_tokens, eos_token_id=eos, pad_token_id=eos)
            new = out[0, len(prompt):].tolist()
        else:  # a fixed rule: random non-special tokens from the sample's seed (seed + i, as vLLM)
            g = torch.Generator().manual_seed(params.seed + i)
            length = int(torch.randint(1, params.max_tokens + 1, (1,), generator=g))
            new = torch.randint(4, self.model.config.vocab_size, (length,), generator=g).tolist()
            if length < params.max_tokens:
                new.append(eos)
        return new[: new.index(eos) + 1] if eos in new else new
'''


@contextlib.contextmanager
def pretend_gpu():
    """Inside the block, the backend's check (check_available) sees two CUDA GPUs; nothing else
    does, so the hf backend and transformers' loading still use the CPU."""
    import torch

    import tasks.vllm_backend as backend

    check = backend.check_available

    def check_with_gpus(*args, **kwargs):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch.cuda, "is_available", lambda: True)
            patch.setattr(torch.cuda, "device_count", lambda: 2)
            return check(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(backend, "check_available", check_with_gpus)
        yield


@pytest.fixture
def fake_vllm(tmp_path, monkeypatch):
    """The stand-in `vllm` importable here and in child processes. Returns the path of the log the
    stand-in appends its calls to."""
    folder = tmp_path / "fake_vllm"
    (folder / "vllm").mkdir(parents=True)
    (folder / "vllm" / "__init__.py").write_text(FAKE_VLLM)
    log = tmp_path / "fake_vllm_calls.jsonl"
    monkeypatch.syspath_prepend(str(folder))
    monkeypatch.delitem(sys.modules, "vllm", raising=False)
    monkeypatch.setenv("PYTHONPATH", str(folder))  # run_in_child puts the repository before it
    monkeypatch.setenv("FAKE_VLLM_LOG", str(log))
    yield log
    sys.modules.pop("vllm", None)  # later tests must not find the stand-in


def _calls(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


# ---- where vLLM cannot run -------------------------------------------------------------------


def test_vllm_backend_without_a_gpu_is_bad_input_through_the_cli(tmp_path):
    import importlib.util

    import torch

    if torch.cuda.is_available() and importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM can run here")
    spec = {
        "name": "vllm-no-gpu",
        "seed": 0,
        "models": {"base": {"kind": "tiny", "hidden_size": 16, "num_layers": 1, "num_heads": 2, "intermediate_size": 32}},
        "datasets": {"prompts": {"kind": "synthetic", "task": "demo", "split": "prompts", "size": 4}},
        "stages": {"generate": {"kind": "generate", "policy": "base", "prompts": "prompts", "n": 2,
                                "max_new_tokens": 4, "backend": "vllm", "vllm": {"max_num_seqs": 8}}},
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    result = alignflow("run", path, home=tmp_path / "home")
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    message = " ".join(output.split())  # rich wraps long lines
    assert "generate stage: backend:" in message
    # The whole hint, `pip install 'alignflow[vllm]'`, is checked in test_what_is_missing_is_named:
    # the CLI prints errors as rich markup, which takes "[vllm]" for a style tag and drops it.
    assert "pip install 'alignflow" in message and "backend: hf" in message
    if not torch.cuda.is_available():
        assert "CUDA GPU" in message
    assert not list((tmp_path / "home" / "store").glob("generate/*")), "no generate artifact"


def test_what_is_missing_is_named(tmp_path, monkeypatch):
    import importlib.util

    import torch

    from tasks.base import BadInput
    from tasks.vllm_backend import VllmParams, check_available

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(BadInput) as err:
        check_available("generate")
    lacks = err.value.expected.split("lacks")[1]
    assert err.value.field == "backend" and "the vllm package" in lacks and "CUDA GPU" not in lacks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "vllm" else real_find_spec(name, *a))
    with pytest.raises(BadInput) as err:
        check_available("evaluate")
    assert str(err.value).startswith("evaluate stage: backend: ")
    assert "pip install 'alignflow[vllm]'" in str(err.value) and "or set backend: hf" in str(err.value)
    lacks = err.value.expected.split("lacks")[1]
    assert "a CUDA GPU (torch.cuda.is_available() is False)" in lacks and "package" not in lacks

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(BadInput) as err:
        check_available("generate", VllmParams(tensor_parallel_size=2))
    assert err.value.field == "vllm.tensor_parallel_size"
    check_available("generate", VllmParams(tensor_parallel_size=1))


def test_evaluate_refuses_before_loading_a_model(tiny_demo_model, demo_table, run_stage, monkeypatch):
    import torch

    import tasks.models
    from tasks.base import BadInput

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tasks.models, "load_causal_lm", no_loading)
    monkeypatch.setattr(tasks.models, "load_tokenizer", no_loading)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(BadInput, match="evaluate stage: backend: .*CUDA GPU"):
        run_stage({"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "backend": "vllm", "judge": "demo_gold"},
                  {"policy": tiny_demo_model, "baseline": tiny_demo_model, "prompts": demo_table("eval_prompts", 4)})


def test_backend_settings_and_the_key():
    from tasks.generate import GenerateParams
    from tasks.vllm_backend import VllmParams

    refs = {"policy": "p", "prompts": "x"}
    hf = GenerateParams.model_validate(refs)
    assert hf.backend == "hf" and hf.vllm is None
    # With hf the vllm block cannot change the result: checked, then left out of the key.
    assert GenerateParams.model_validate({**refs, "vllm": {"max_num_seqs": 8}}) == hf
    with pytest.raises(ValueError, match="vllm.max_num_seq"):
        GenerateParams.model_validate({**refs, "vllm": {"max_num_seq": 8}})
    vllm = GenerateParams.model_validate({**refs, "backend": "vllm"})
    assert vllm.vllm == VllmParams()  # the defaults written out: the key shows what ran
    custom = GenerateParams.model_validate({**refs, "backend": "vllm", "vllm": {"max_num_seqs": 8, "dtype": "float32"}})
    assert custom.model_dump(mode="json")["vllm"] == {
        "tensor_parallel_size": 1, "gpu_memory_utilization": 0.9, "max_num_seqs": 8, "dtype": "float32"}
    with pytest.raises(ValueError):
        VllmParams(gpu_memory_utilization=1.5)


# ---- our code against the stand-in -------------------------------------------------------------


def test_settings_and_prompt_ids_reach_vllm(tiny_demo_model, demo_table, fake_vllm):
    from tasks.models import encode_prompts, load_tokenizer
    from tasks.tables import read_table
    from tasks.vllm_backend import VllmParams, build_request, request_seed, run_request

    prompts = read_table(demo_table("prompts", 5)).column("prompt").to_pylist()
    tokenizer = load_tokenizer(tiny_demo_model)
    ids = encode_prompts(tokenizer, prompts)
    engine = VllmParams(tensor_parallel_size=2, gpu_memory_utilization=0.5, max_num_seqs=7, dtype="bfloat16")
    request = build_request(tiny_demo_model, ids, tokenizer.eos_token_id, n=3, temperature=0.7, top_p=0.9,
                            max_new_tokens=6, seed=11, engine=engine)
    result = run_request(request)

    import vllm

    call = vllm.CALLS[-1]
    max_len = json.loads((tiny_demo_model / "config.json").read_text())["max_position_embeddings"]
    assert max(map(len, ids)) + 6 <= max_len
    assert call["llm"] == {
        "model": str(tiny_demo_model), "tokenizer": str(tiny_demo_model), "tensor_parallel_size": 2,
        "gpu_memory_utilization": 0.5, "max_num_seqs": 7, "dtype": "bfloat16", "seed": 11,
        "generation_config": "vllm", "max_model_len": max(map(len, ids)) + 6,
    }
    assert call["prompts"] == ids and ids[0][0] == tokenizer.bos_token_id  # [bos] + prompt, as the hf backend
    assert call["use_tqdm"] is False
    assert [s["seed"] for s in call["sampling"]] == [request_seed(11, i) for i in range(5)]
    assert len({s["seed"] for s in call["sampling"]}) == 5
    for s in call["sampling"]:
        assert {k: s[k] for k in ("n", "temperature", "top_p", "max_tokens", "stop_token_ids", "detokenize")} == {
            "n": 3, "temperature": 0.7, "top_p": 0.9, "max_tokens": 6,
            "stop_token_ids": [tokenizer.eos_token_id], "detokenize": False}
    # Samples come back in index order, per prompt; eos ends a sample when reached.
    assert len(result["token_ids"]) == 5 and all(len(s) == 3 for s in result["token_ids"])
    assert result["generated_tokens"] == sum(len(x) for s in result["token_ids"] for x in s)
    g = __import__("torch").Generator().manual_seed(request_seed(11, 2) + 1)
    length = int(__import__("torch").randint(1, 7, (1,), generator=g))
    assert len(result["token_ids"][2][1]) == length + (length < 6)

    # Greedy: one sample per prompt (repeated n times by the caller), no top-p.
    greedy = build_request(tiny_demo_model, ids, tokenizer.eos_token_id, n=3, temperature=0, top_p=0.9,
                           max_new_tokens=6, seed=11, engine=engine)
    assert greedy["sampling"]["n"] == 1 and greedy["sampling"]["temperature"] == 0 and greedy["sampling"]["top_p"] == 1
    # A longer request than the model's positions: vLLM's own limit stays.
    assert "max_model_len" not in build_request(tiny_demo_model, ids, tokenizer.eos_token_id, 1, 1.0, 1.0,
                                                max_len, 0, engine)["llm"]


def test_generate_greedy_matches_the_hf_backend(tiny_demo_model, demo_table, run_stage, fake_vllm):
    from tasks.models import encode_prompts, load_tokenizer
    from tasks.tables import read_table

    prompts = demo_table("prompts", 6)
    params = {"kind": "generate", "policy": "p", "prompts": "x", "n": 2, "temperature": 0, "max_new_tokens": 8,
              "batch_size": 4}
    inputs = {"policy": tiny_demo_model, "prompts": prompts}
    hf_out, hf_metrics = run_stage(params, inputs, seed=3)
    with pretend_gpu():
        vllm_out, vllm_metrics = run_stage({**params, "backend": "vllm", "vllm": {"max_num_seqs": 4}}, inputs, seed=3)

    hf, ours = pq.read_table(hf_out / "data.parquet"), pq.read_table(vllm_out / "data.parquet")
    assert ours.schema == hf.schema and ours.column_names == ["prompt_id", "prompt", "sample", "response"]
    assert ours.to_pylist() == hf.to_pylist()
    assert any(r["response"] for r in hf.to_pylist())
    assert vllm_metrics == hf_metrics
    assert sorted(p.name for p in vllm_out.iterdir()) == sorted(p.name for p in hf_out.iterdir())

    (call,) = _calls(fake_vllm)  # one child, one generate call, every prompt in it
    tokenizer = load_tokenizer(tiny_demo_model)
    assert call["prompts"] == encode_prompts(tokenizer, read_table(prompts).column("prompt").to_pylist())
    assert call["llm"]["max_num_seqs"] == 4 and call["llm"]["seed"] == 3 and call["llm"]["model"] == str(tiny_demo_model)
    assert all(s["n"] == 1 and s["temperature"] == 0 and s["max_tokens"] == 8 for s in call["sampling"])


def test_generate_sampled_is_seeded_per_prompt(tiny_demo_model, demo_table, fake_vllm, monkeypatch, tmp_path):
    """n samples per prompt, seeded by (seed, prompt index): the same for any batching, different
    across samples and seeds. In process (the child's path is covered above)."""
    import tasks.vllm_backend as backend
    from tasks.tables import read_table

    monkeypatch.setattr(backend, "run_in_child", lambda request, workdir: backend.run_request(request))
    prompts = read_table(demo_table("prompts", 4)).column("prompt").to_pylist()

    scratch = tmp_path / "scratch"
    scratch.mkdir()

    def sample(subset, seed=0, max_num_seqs=256):
        return backend.sample_responses(tiny_demo_model, subset, n=3, temperature=1.0, top_p=0.95, max_new_tokens=5,
                                        seed=seed, engine=backend.VllmParams(max_num_seqs=max_num_seqs), scratch=scratch)

    full = sample(prompts)
    assert len(full) == 4 and all(len(r) == 3 for r in full)
    assert all(len(set(r)) > 1 for r in full)  # the samples of a prompt differ
    assert sample(prompts, max_num_seqs=2) == full
    assert sample(prompts[:2]) == full[:2]  # the first prompts keep their index, hence their seeds
    assert sample(prompts, seed=1) != full
    assert list(scratch.iterdir()) == []  # nothing left in the scratch folder


def test_evaluate_greedy_matches_the_hf_backend(tiny_demo_model, demo_table, run_stage, fake_vllm, monkeypatch):
    """In process (the child's path is covered above)."""
    import tasks.vllm_backend as backend

    params = {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "temperature": 0, "judge": "demo_gold",
              "max_new_tokens": 6, "batch_size": 8}
    inputs = {"policy": tiny_demo_model, "baseline": tiny_demo_model, "prompts": demo_table("eval_prompts", 6)}
    monkeypatch.setattr(backend, "run_in_child", lambda request, workdir: backend.run_request(request))
    hf_out, hf_metrics = run_stage(params, inputs)
    with pretend_gpu():
        vllm_out, vllm_metrics = run_stage({**params, "backend": "vllm"}, inputs)
    assert vllm_metrics == hf_metrics
    hf, ours = pq.read_table(hf_out / "samples.parquet"), pq.read_table(vllm_out / "samples.parquet")
    assert ours.schema == hf.schema and ours.to_pylist() == hf.to_pylist()
    import vllm

    assert [c["llm"]["max_num_seqs"] for c in vllm.CALLS[-2:]] == [256, 256]  # policy, then baseline


def test_an_adapter_only_artifact_is_merged_for_vllm(tiny_demo_model, demo_table, run_stage, fake_vllm, monkeypatch):
    import tasks.vllm_backend as backend
    from tasks.models import is_adapter_artifact

    adapter, _ = run_stage(
        {"kind": "sft", "model": "m", "data": "d", "epochs": 1, "lr": 1e-2, "batch_size": 32,
         "lora": {"r": 4, "alpha": 8, "dropout": 0.0, "merge": False}},
        {"model": tiny_demo_model, "data": demo_table("sft", 64)},
    )
    assert is_adapter_artifact(adapter)
    monkeypatch.setattr(backend, "run_in_child", lambda request, workdir: backend.run_request(request))
    params = {"kind": "generate", "policy": "p", "prompts": "x", "n": 1, "temperature": 0, "max_new_tokens": 6}
    inputs = {"policy": adapter, "prompts": demo_table("prompts", 4)}
    hf_out, _ = run_stage(params, inputs)
    with pretend_gpu():
        vllm_out, _ = run_stage({**params, "backend": "vllm"}, inputs)
    import vllm

    call = vllm.CALLS[-1]
    assert call["model_has_config"] and call["llm"]["model"].endswith(backend.MERGED_DIR)
    assert not Path(call["llm"]["model"]).exists()  # removed before the artifact was committed
    assert pq.read_table(vllm_out / "data.parquet").to_pylist() == pq.read_table(hf_out / "data.parquet").to_pylist()
    assert sorted(p.name for p in vllm_out.iterdir()) == ["data.parquet"]


def test_a_failing_child_reports_the_end_of_its_log(tmp_path, monkeypatch):
    import tasks.vllm_backend as backend

    folder = tmp_path / "broken"
    (folder / "vllm").mkdir(parents=True)
    (folder / "vllm" / "__init__.py").write_text(textwrap.dedent('''
        class LLM:
            def __init__(self, **kwargs):
                raise RuntimeError("CUDA out of memory (stand-in)")
        SamplingParams = dict
    '''))
    monkeypatch.setenv("PYTHONPATH", str(folder))
    with pytest.raises(RuntimeError, match=r"(?s)vLLM failed \(child process exit code 1\).*CUDA out of memory \(stand-in\)"):
        backend.run_in_child({"llm": {}, "sampling": {}, "prompts": [], "seeds": []}, tmp_path)
