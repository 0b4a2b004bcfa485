"""max_prompt_length: prompts cut from the left (a leading bos kept), in the one prompt-encoding path."""
from __future__ import annotations

import pyarrow as pa

from tasks.models import cut_left, encode_examples, encode_prompts, load_tokenizer
from tasks.tables import read_table, write_table


def test_cut_left_keeps_the_end_and_a_leading_bos():
    assert cut_left([1, 5, 6, 7, 8], 3, bos=1) == [1, 7, 8]
    assert cut_left([5, 6, 7, 8], 3, bos=1) == [6, 7, 8]
    assert cut_left([1, 5], 3, bos=1) == [1, 5]
    assert cut_left([1, 5, 6], 1, bos=1) == [6]


def test_prompts_and_examples_are_cut_before_the_response(tiny_demo_model):
    tokenizer = load_tokenizer(tiny_demo_model)
    prompt, response = "food cheese apple bread :", "good cake"
    full = encode_prompts(tokenizer, [prompt])[0]
    cut = encode_prompts(tokenizer, [prompt], max_prompt_length=3)[0]
    assert cut == [tokenizer.bos_token_id] + full[-2:]
    example = encode_examples(tokenizer, [prompt], [response], 512, max_prompt_length=3)[0]
    assert example["input_ids"][:3] == cut and example["labels"][:3] == [-100] * 3
    assert len(example["input_ids"]) == 3 + 2 + 1  # the response and eos untouched


def test_generate_reads_the_cut_prompt(tmp_path, tiny_sft_model, run_stage):
    """Sampling from a long prompt with max_prompt_length is sampling from its cut text."""
    long, short = "music piano guitar drum violin food :", "food :"
    tables = {}
    for name, prompts in (("long", [long]), ("short", [short])):
        tables[name] = tmp_path / name
        tables[name].mkdir()
        write_table(pa.table({"prompt_id": [0], "prompt": prompts}), tables[name])
    params = {"kind": "generate", "policy": "p", "prompts": "x", "n": 3, "max_new_tokens": 6, "temperature": 0}
    cut, _ = run_stage({**params, "max_prompt_length": 3}, {"policy": tiny_sft_model, "prompts": tables["long"]})
    plain, _ = run_stage(params, {"policy": tiny_sft_model, "prompts": tables["short"]})
    assert read_table(cut).column("response").to_pylist() == read_table(plain).column("response").to_pylist()
