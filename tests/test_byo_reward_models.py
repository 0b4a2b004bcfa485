"""A pretrained reward model with its own tokenizer: score and evaluate re-tokenize the text with it
(plain text, and conversations through its chat template), whatever the policy's vocabulary."""
from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from byo_tiny import reward_model_folder
from tasks.base import BadInput
from tasks.tables import read_table, write_table


@pytest.fixture(scope="module")
def rm_folder(tmp_path_factory):
    return reward_model_folder(tmp_path_factory.mktemp("byo") / "someone_elses_rm")


def reference_score(folder, text_ids) -> float:
    """The reward model's score of token ids, straight from transformers."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=torch.tensor([text_ids])).logits[0, 0].item()


def candidates(tmp_path, prompts, responses):
    out = tmp_path / "candidates"
    out.mkdir()
    write_table(pa.table({"prompt_id": list(range(len(prompts))), "prompt": prompts, "response": responses}), out)
    return out


def test_a_pretrained_reward_model_scores_with_its_own_tokenizer(tmp_path, rm_folder, tiny_demo_model, run_stage):
    from transformers import AutoTokenizer

    rm, metrics = run_stage({"kind": "pretrained_reward_model", "path": str(rm_folder)})
    assert metrics["parameters"] > 0
    rm_tokenizer, policy_tokenizer = AutoTokenizer.from_pretrained(rm), AutoTokenizer.from_pretrained(tiny_demo_model)
    prompt, response = "food the pizza", "good tasty pizza"
    assert rm_tokenizer(prompt)["input_ids"] != policy_tokenizer(prompt)["input_ids"]  # two vocabularies

    chat = [{"role": "user", "content": prompt}]
    table = candidates(tmp_path, [prompt, prompt], [response, "bad"])
    scored, _ = run_stage({"kind": "score", "candidates": "c", "reward_model": "rm"}, {"candidates": table, "reward_model": rm})
    rewards = read_table(scored).column("reward").to_pylist()
    bos, eos = rm_tokenizer.bos_token_id, rm_tokenizer.eos_token_id
    ids = [bos] + rm_tokenizer(prompt, add_special_tokens=False)["input_ids"] + rm_tokenizer(response, add_special_tokens=False)["input_ids"] + [eos]
    assert rewards[0] == pytest.approx(reference_score(rm_folder, ids), abs=1e-5)

    # A conversation goes through the reward model's own chat template.
    chat_table = tmp_path / "chat"
    chat_table.mkdir()
    write_table(pa.table({"prompt_id": [0], "prompt": [chat], "response": [response]}), chat_table)
    scored, _ = run_stage({"kind": "score", "candidates": "c", "reward_model": "rm"}, {"candidates": chat_table, "reward_model": rm})
    text = rm_tokenizer.apply_chat_template(chat + [{"role": "assistant", "content": response}], tokenize=False)
    assert text == "<s>user: food the pizza</s><s>assistant: good tasty pizza</s>"
    expected = reference_score(rm_folder, rm_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert read_table(scored).column("reward").to_pylist()[0] == pytest.approx(expected, abs=1e-5)


def test_evaluate_judges_with_a_pretrained_reward_model_of_another_vocabulary(rm_folder, tiny_sft_model, tiny_demo_model,
                                                                                demo_table, run_stage):
    rm, _ = run_stage({"kind": "pretrained_reward_model", "path": str(rm_folder)})
    _, metrics = run_stage(
        {"kind": "evaluate", "policy": "p", "baseline": "b", "prompts": "x", "judge_model": "rm", "max_new_tokens": 8},
        {"policy": tiny_sft_model, "baseline": tiny_demo_model, "prompts": demo_table("eval_prompts", 16), "judge_model": rm},
    )
    assert 0 <= metrics["win_rate"] <= 1 and metrics["reward_policy"] != metrics["reward_baseline"]


def test_a_classifier_with_more_than_one_label_is_refused(tmp_path, run_stage):
    from transformers import AutoConfig

    folder = reward_model_folder(tmp_path / "two_labels")
    config = AutoConfig.from_pretrained(folder)
    config.num_labels = 2
    config.save_pretrained(folder)
    with pytest.raises(BadInput, match="num_labels.*one label; this one has 2"):
        run_stage({"kind": "pretrained_reward_model", "path": str(folder)})


def test_a_spec_takes_a_pretrained_reward_model_where_a_reward_model_goes(tmp_path, rm_folder):
    import yaml

    from conftest import DEMO_SPEC
    from flows.spec import load_spec

    spec = yaml.safe_load(DEMO_SPEC.read_text())
    spec["models"]["rm"] = {"kind": "pretrained_reward_model", "path": str(rm_folder), "dtype": "float32"}
    spec["stages"]["score"]["reward_model"] = "rm"
    spec["stages"]["evaluate"] = {**spec["stages"]["evaluate"], "judge": None, "judge_model": "rm"}
    del spec["stages"]["reward_model"]
    (tmp_path / "spec.yaml").write_text(yaml.safe_dump(spec))
    loaded = load_spec(tmp_path / "spec.yaml")
    assert loaded.nodes["rm"].output == "reward_model"
    assert loaded.nodes["rm"].params.source_files() == [rm_folder]  # its content is in the key


def test_dtype_sets_the_stored_weights(rm_folder, run_stage):
    from safetensors import safe_open

    rm, _ = run_stage({"kind": "pretrained_reward_model", "path": str(rm_folder), "dtype": "bfloat16"})
    with safe_open(str(rm / "model.safetensors"), "pt") as f:
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.bfloat16}
    auto, _ = run_stage({"kind": "pretrained_reward_model", "path": str(rm_folder), "dtype": "auto"})
    with safe_open(str(auto / "model.safetensors"), "pt") as f:  # auto: float32 on a CPU
        assert {f.get_tensor(name).dtype for name in f.keys()} == {torch.float32}
