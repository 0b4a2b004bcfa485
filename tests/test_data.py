"""Preference data formats (tasks/preferences.py), the table sources that read them (jsonl, parquet,
hub) and chat-template encoding (tasks/models.py). No network: tokenizers are built here."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from tasks import load_stage_kinds
from tasks.base import BadInput
from tasks.preferences import MESSAGES, normalise_preferences, shared_prefix_at_word_boundary
from tasks.tables import read_table, write_table

DROPPED_NONE = {"dropped_missing": 0, "dropped_malformed": 0, "dropped_prefix_mismatch": 0,
                "dropped_empty": 0, "dropped_identical": 0}


def rows(folder):
    return read_table(folder).to_pylist()


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def write_parquet(path, records):
    pq.write_table(pa.Table.from_pylist(records), path)
    return path


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def dropped(**counts):
    return {k: float(v) for k, v in {**DROPPED_NONE, **{f"dropped_{k}": n for k, n in counts.items()}}.items()}


# ---- trl's explicit-prompt formats ----------------------------------------------------------


def test_explicit_plain_text_preferences_from_jsonl(tmp_path, run_stage):
    path = write_jsonl(tmp_path / "prefs.jsonl", [
        {"prompt": "animals cat :", "chosen": "good cat", "rejected": "bad saw", "score": 1.5},
        {"prompt": "food rice :", "chosen": "good rice"},                                 # missing
        {"prompt": "food rice :", "chosen": "good rice", "rejected": None, "score": 2.0},  # null
        {"prompt": "tools saw :", "chosen": "   ", "rejected": "bad saw"},                 # empty
        {"prompt": "tools saw :", "chosen": "new saw", "rejected": " new saw "},           # identical
        {"prompt": "tools saw :", "chosen": 3, "rejected": "bad saw"},                     # not a string
        {"prompt": "tools saw :", "chosen": "new saw", "rejected": "bad saw", "score": -1.0},
    ])
    out, metrics = run_stage({"kind": "jsonl", "path": str(path), "format": "preferences"})
    assert rows(out) == [
        {"prompt": "animals cat :", "chosen": "good cat", "rejected": "bad saw", "score": 1.5},
        {"prompt": "tools saw :", "chosen": "new saw", "rejected": "bad saw", "score": -1.0},
    ]
    assert metrics == {"rows": 2.0, "rows_read": 7.0, **dropped(missing=2, empty=1, identical=1, malformed=1)}
    # `columns` picks from the normalised table
    out, _ = run_stage({"kind": "jsonl", "path": str(path), "format": "preferences", "columns": ["prompt", "chosen", "rejected"]})
    assert read_table(out).column_names == ["prompt", "chosen", "rejected"]


def test_explicit_conversational_preferences_from_parquet(tmp_path, run_stage):
    prompt = [{"role": "system", "content": "be kind", "name": None}, {**user("animals cat :"), "name": "ann"}]
    path = write_parquet(tmp_path / "chat.parquet", [
        {"id": 1, "prompt": prompt, "chosen": [assistant("good cat")], "rejected": [assistant("bad saw")]},
        {"id": 2, "prompt": prompt, "chosen": [user("good cat")], "rejected": [assistant("bad saw")]},  # not the assistant
        {"id": 3, "prompt": [], "chosen": [assistant("good cat")], "rejected": [assistant("bad saw")]},  # no prompt
        {"id": 4, "prompt": prompt, "chosen": [assistant(" ")], "rejected": [assistant("bad saw")]},    # empty reply
        {"id": 5, "prompt": prompt, "chosen": [assistant("a")], "rejected": [assistant("a")]},          # identical
        {"id": 6, "prompt": prompt, "chosen": None, "rejected": [assistant("bad saw")]},                # null
    ])
    out, metrics = run_stage({"kind": "parquet", "path": str(path), "format": "preferences"})
    table = read_table(out)
    assert table.schema.field("prompt").type == MESSAGES == table.schema.field("chosen").type
    assert table.to_pylist() == [{
        "prompt": [{"role": "system", "content": "be kind"}, user("animals cat :")],  # only role and content
        "chosen": [assistant("good cat")], "rejected": [assistant("bad saw")], "id": 1,
    }]
    assert metrics == {"rows": 1.0, "rows_read": 6.0, **dropped(malformed=1, empty=2, identical=1, missing=1)}


# ---- trl's implicit-prompt formats ----------------------------------------------------------


def test_implicit_conversational_preferences_split_off_the_prompt(tmp_path, run_stage):
    history = [user("animals cat :"), assistant("cat"), user("more")]
    path = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": history + [assistant("good cat")], "rejected": history + [assistant("bad saw")], "source": "a"},
        {"chosen": history + [assistant("good cat")], "rejected": [user("other"), assistant("bad")], "source": "b"},
        {"chosen": history, "rejected": history + [assistant("bad saw")], "source": "c"},  # ends with the user
        {"chosen": [assistant("good cat")], "rejected": [assistant("bad saw")], "source": "d"},  # no prompt
    ])
    out, metrics = run_stage({"kind": "jsonl", "path": str(path), "format": "preferences"})
    assert rows(out) == [{"prompt": history, "chosen": [assistant("good cat")], "rejected": [assistant("bad saw")], "source": "a"}]
    assert metrics == {"rows": 1.0, "rows_read": 4.0, **dropped(prefix_mismatch=1, malformed=1, empty=1)}


def test_a_text_prompt_beside_full_conversations_is_replaced_by_the_conversation_prompt(tmp_path, run_stage):
    # UltraFeedback-binarized's layout: prompt is the question's text, chosen/rejected whole chats.
    path = write_parquet(tmp_path / "uf.parquet", [{
        "prompt": "animals cat :", "prompt_id": "x1",
        "chosen": [user("animals cat :"), assistant("good cat")],
        "rejected": [user("animals cat :"), assistant("bad saw")],
    }])
    out, _ = run_stage({"kind": "parquet", "path": str(path), "format": "preferences"})
    assert rows(out) == [{"prompt": [user("animals cat :")], "chosen": [assistant("good cat")],
                          "rejected": [assistant("bad saw")], "prompt_id": "x1"}]


def test_implicit_plain_text_preferences_split_at_a_word_boundary(tmp_path, run_stage):
    path = write_jsonl(tmp_path / "implicit.jsonl", [
        {"chosen": "The sky is blue.", "rejected": "The sky is black."},
        {"chosen": "Q: pets ? A: cats", "rejected": "Q: pets ? A: catfish"},
        {"chosen": "blue", "rejected": "green"},                   # no shared prompt
        {"chosen": "Q: x A: yes", "rejected": "Q: x A: yes indeed"},  # chosen is all prompt
        {"chosen": "Q: x A: no", "rejected": "Q: x A: no"},
    ])
    out, metrics = run_stage({"kind": "jsonl", "path": str(path), "format": "preferences"})
    assert rows(out) == [
        {"prompt": "The sky is", "chosen": "blue.", "rejected": "black."},
        {"prompt": "Q: pets ? A:", "chosen": "cats", "rejected": "catfish"},
    ]
    assert metrics == {"rows": 2.0, "rows_read": 5.0, **dropped(empty=2, identical=1)}


@pytest.mark.parametrize("a, b, expected", [
    ("The sky is blue.", "The sky is black.", "The sky is "),
    ("a b c", "a b d", "a b "),
    ("a b", "a b c", "a b"),       # a ends where b's next word starts
    ("cat", "catfish", ""),
    ("x", "y", ""),
    ("same text", "same text", "same text"),
])
def test_shared_prefix_never_splits_a_word(a, b, expected):
    assert a[: shared_prefix_at_word_boundary(a, b)] == expected


# ---- Anthropic HH-RLHF ----------------------------------------------------------------------

HH_PROMPT = ("\n\nHuman: What are some pets?\n\nAssistant: Cats and dogs."
             "\n\nHuman: Which is quieter?\n\nAssistant:")


def hh_rows():
    return [
        {"chosen": HH_PROMPT + " Cats, mostly.", "rejected": HH_PROMPT + " Dogs never bark."},
        {"chosen": HH_PROMPT + " Cats.", "rejected": "\n\nHuman: Other?\n\nAssistant: No."},  # other dialogue
        {"chosen": "\n\nHuman: hi", "rejected": HH_PROMPT + " Dogs."},                        # no assistant turn
        {"chosen": HH_PROMPT + " Cats.\n\nHuman: ok", "rejected": HH_PROMPT + " Dogs."},      # ends with human
        {"chosen": HH_PROMPT + " ", "rejected": HH_PROMPT + " Dogs."},                        # empty reply
        {"chosen": HH_PROMPT + " Same.", "rejected": HH_PROMPT + " Same."},                   # identical
        {"chosen": HH_PROMPT + " Fish.", "rejected": None},                                   # missing
        {"chosen": "\n\nHuman: Say hi.\n\nAssistant: Hi there!\n", "rejected": "\n\nHuman: Say hi.\n\nAssistant: No."},
    ]


@pytest.mark.parametrize("kind", ["jsonl", "parquet"])
def test_hh_rlhf_dialogues_become_prompt_and_final_replies(tmp_path, run_stage, kind):
    path = tmp_path / f"hh.{kind}"
    (write_jsonl if kind == "jsonl" else write_parquet)(path, hh_rows())
    out, metrics = run_stage({"kind": kind, "path": str(path), "format": "hh_rlhf"})
    assert rows(out) == [
        {"prompt": HH_PROMPT, "chosen": "Cats, mostly.", "rejected": "Dogs never bark."},
        {"prompt": "\n\nHuman: Say hi.\n\nAssistant:", "chosen": "Hi there!", "rejected": "No."},
    ]
    assert metrics == {"rows": 2.0, "rows_read": 8.0,
                       **dropped(prefix_mismatch=1, malformed=2, empty=1, identical=1, missing=1)}


# ---- strict mode and bad files --------------------------------------------------------------


def test_strict_names_file_row_and_field_and_writes_nothing(tmp_path, run_stage):
    path = write_jsonl(tmp_path / "prefs.jsonl", hh_rows()[:1])
    with path.open("a") as f:
        f.write("\n" + json.dumps(hh_rows()[1]) + "\n")  # a blank line: the error names the file's line
    with pytest.raises(BadInput, match=r"prefs\.jsonl: line 3: rejected: the same dialogue as 'chosen'") as error:
        run_stage({"kind": "jsonl", "path": str(path), "format": "hh_rlhf", "strict": True})
    assert (error.value.file, error.value.field) == (str(path), "line 3: rejected")
    assert not any(tmp_path.glob("jsonl-*/*"))  # nothing written

    path = write_parquet(tmp_path / "prefs.parquet", [
        {"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a", "rejected": ""}])
    with pytest.raises(BadInput, match=r"prefs\.parquet: row 2: rejected: a non-empty response"):
        run_stage({"kind": "parquet", "path": str(path), "format": "preferences", "strict": True})
    _, metrics = run_stage({"kind": "parquet", "path": str(path), "format": "preferences"})
    assert metrics["rows"] == 1 and metrics["dropped_empty"] == 1


def test_unusable_preference_files_are_bad_input(tmp_path, run_stage):
    path = write_jsonl(tmp_path / "none.jsonl", [{"chosen": "a b", "rejected": "a b"}, {"chosen": "x"}])
    with pytest.raises(BadInput, match=r"none\.jsonl: rows: at least one usable preference pair; all 2 rows "
                                       r"were dropped \(1 missing, 1 identical\)"):
        run_stage({"kind": "jsonl", "path": str(path), "format": "preferences"})
    path = write_parquet(tmp_path / "nochosen.parquet", [{"prompt": "a", "response": "b"}])
    with pytest.raises(BadInput, match=r"nochosen\.parquet: chosen: a column 'chosen'"):
        run_stage({"kind": "parquet", "path": str(path), "format": "hh_rlhf"})
    with pytest.raises(ValidationError):
        run_stage({"kind": "jsonl", "path": str(path), "format": "trl"})


# ---- Arrow / parquet round trip -------------------------------------------------------------


def test_conversational_columns_round_trip_through_parquet(tmp_path):
    records = [{"prompt": [user("hi"), assistant("yo"), user("and?")], "chosen": [assistant("good")],
                "rejected": [assistant("bad")], "n": 1}]
    table, counts = normalise_preferences(records, "preferences")
    assert counts == DROPPED_NONE
    assert table.schema == pa.schema([("prompt", MESSAGES), ("chosen", MESSAGES), ("rejected", MESSAGES), ("n", pa.int64())])
    folder = tmp_path / "t"
    folder.mkdir()
    write_table(table, folder)
    again = read_table(folder)
    assert again.schema == table.schema and again.to_pylist() == records
    # read back as explicit conversational data, it is unchanged
    assert normalise_preferences(again)[0].equals(table)


# ---- the hub kind (a local folder; no network) ----------------------------------------------


def test_hub_kind_reads_a_local_folder(tmp_path, run_stage):
    folder = tmp_path / "hh_data"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", hh_rows())
    write_jsonl(folder / "test.jsonl", hh_rows()[:1])
    before = sorted(p.name for p in folder.iterdir())
    params = load_stage_kinds()["hub"].params
    assert params.model_validate({"kind": "hub", "path": str(folder)}).source_files() == [folder]

    out, metrics = run_stage({"kind": "hub", "path": str(folder), "split": "train", "format": "hh_rlhf"})
    assert rows(out)[0] == {"prompt": HH_PROMPT, "chosen": "Cats, mostly.", "rejected": "Dogs never bark."}
    assert metrics["rows"] == 2 and metrics["rows_read"] == 8 and metrics["dropped_malformed"] == 2
    out, metrics = run_stage({"kind": "hub", "path": str(folder), "split": "test", "format": "hh_rlhf"})
    assert metrics["rows"] == 1
    out, _ = run_stage({"kind": "hub", "path": str(folder), "split": "test", "columns": ["chosen"]})  # format: table
    assert rows(out) == [{"chosen": hh_rows()[0]["chosen"]}]
    assert sorted(p.name for p in folder.iterdir()) == before  # nothing cached into the user's folder

    with pytest.raises(BadInput, match=r"hh_data: split: .*Unknown split"):
        run_stage({"kind": "hub", "path": str(folder), "split": "validation"})
    with pytest.raises(BadInput, match=r"hh_data: data_files: "):
        run_stage({"kind": "hub", "path": str(folder), "data_files": "nope.jsonl"})


def test_hub_kind_reads_conversational_parquet_with_data_files(tmp_path, run_stage):
    folder = tmp_path / "chat_data"
    (folder / "data").mkdir(parents=True)
    history = [user("animals cat :")]
    write_parquet(folder / "data" / "prefs.parquet", [
        {"chosen": history + [assistant("good cat")], "rejected": history + [assistant("bad saw")]},
        {"chosen": history + [assistant("good cat")], "rejected": history + [assistant("good cat")]},
    ])
    out, metrics = run_stage({"kind": "hub", "path": str(folder), "data_files": {"train": "data/*.parquet"},
                              "format": "preferences", "columns": ["prompt", "chosen", "rejected"]})
    assert rows(out) == [{"prompt": history, "chosen": [assistant("good cat")], "rejected": [assistant("bad saw")]}]
    assert metrics["dropped_identical"] == 1
    assert read_table(out).schema.field("chosen").type == MESSAGES


def test_hub_ids_need_a_revision(tmp_path):
    params = load_stage_kinds()["hub"].params
    with pytest.raises(ValidationError, match="a revision"):
        params.model_validate({"kind": "hub", "path": "Anthropic/hh-rlhf"})
    pinned = params.model_validate({"kind": "hub", "path": "Anthropic/hh-rlhf", "revision": "09be8c5", "format": "hh_rlhf"})
    assert pinned.source_files() == []  # the revision, in the config, is what the key sees
    with pytest.raises(ValidationError, match="datasets builder"):
        params.model_validate({"kind": "hub", "path": "json", "data_files": "x.jsonl"})
    # a folder relative to the spec is found there and hashed
    (tmp_path / "local").mkdir()
    local = params.model_validate({"kind": "hub", "path": "local"}, context={"base_dir": str(tmp_path)})
    assert local.source_files() == [tmp_path / "local"]


# ---- chat templates -------------------------------------------------------------------------

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "system user assistant be kind animals cat dog : good bad saw".split()


def word_tokenizer(specials, template=None, **special_tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **special_tokens)
    tokenizer.chat_template = template
    return tokenizer


def chatml_tokenizer():
    """SmolLM2-like: ChatML template, bos <|im_start|>, eos = end of turn = <|im_end|>."""
    return word_tokenizer(["<|im_start|>", "<|im_end|>", "<unk>"], CHATML,
                          bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>")


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens([i for i in ids if i != -100])


def test_chat_prompts_are_rendered_by_the_template_without_a_second_bos():
    from tasks.models import encode_prompts

    tokenizer = chatml_tokenizer()
    prompt = [{"role": "system", "content": "be kind"}, user("animals cat :")]
    [ids] = encode_prompts(tokenizer, [prompt])
    assert tokens(tokenizer, ids) == ["<|im_start|>", "system", "be", "kind", "<|im_end|>",
                                      "<|im_start|>", "user", "animals", "cat", ":", "<|im_end|>",
                                      "<|im_start|>", "assistant"]
    assert ids.count(tokenizer.bos_token_id) == 3  # one per turn: no bos added before the first


def test_chat_examples_label_exactly_the_reply_and_its_end_of_turn():
    from tasks.models import encode_examples, encode_prompts

    tokenizer = chatml_tokenizer()
    prompt = [user("animals cat :")]
    [example] = encode_examples(tokenizer, [prompt], [[assistant("good cat")]], max_length=64)
    [prompt_ids] = encode_prompts(tokenizer, [prompt])
    assert example["input_ids"][: len(prompt_ids)] == prompt_ids
    assert example["labels"] == [-100] * len(prompt_ids) + tokenizer.convert_tokens_to_ids(["good", "cat", "<|im_end|>"])
    assert example["input_ids"][len(prompt_ids):] == example["labels"][len(prompt_ids):]
    # the whole conversation, as the template renders it, less what follows the end of turn ("\n")
    rendered = tokenizer.apply_chat_template(prompt + [assistant("good cat")], tokenize=False)
    assert example["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # a generated (plain string) response after a conversational prompt is one assistant message
    assert encode_examples(tokenizer, [prompt], ["good cat"], 64) == [example]
    # several assistant messages: one end of turn each, the labels end at the last
    [two] = encode_examples(tokenizer, [prompt], [[assistant("good"), assistant("cat")]], 64)
    assert tokens(tokenizer, two["labels"]) == ["good", "<|im_end|>", "<|im_start|>", "assistant", "cat", "<|im_end|>"]
    # truncation cuts the reply's tail
    [cut] = encode_examples(tokenizer, [prompt], [[assistant("good cat")]], max_length=len(prompt_ids) + 1)
    assert tokens(tokenizer, cut["labels"]) == ["good"]


def test_chat_end_of_turn_that_is_not_eos_and_templates_without_one():
    from tasks.models import encode_examples

    gemma_like = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
                  "{% if add_generation_prompt %}<start_of_turn>assistant\n{% endif %}")
    tokenizer = word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], gemma_like,
                               bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                               additional_special_tokens=["<start_of_turn>", "<end_of_turn>"])
    [example] = encode_examples(tokenizer, [[user("cat")]], [[assistant("good cat")]], 64)
    assert tokens(tokenizer, example["labels"]) == ["good", "cat", "<end_of_turn>"]

    plain_template = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}{% if add_generation_prompt %}assistant :{% endif %}"
    tokenizer = word_tokenizer(["<pad>", "<bos>", "<eos>", "<unk>"], plain_template,
                               bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")
    [example] = encode_examples(tokenizer, [[user("cat")]], [[assistant("good cat")]], 64)
    assert tokens(tokenizer, example["input_ids"]) == ["user", ":", "cat", "assistant", ":", "good", "cat", "<eos>"]
    assert tokens(tokenizer, example["labels"]) == ["good", "cat", "<eos>"]


def test_plain_text_encoding_is_unchanged():
    from tasks.models import build_word_tokenizer, encode_examples, encode_prompts

    tokenizer = build_word_tokenizer(["animals", "cat", ":", "good", "bad"])  # <pad> 0, <bos> 1, <eos> 2, <unk> 3
    tokenizer.chat_template = CHATML  # a template does not change plain-text prompts
    assert encode_prompts(tokenizer, ["animals cat :", "cat"]) == [[1, 4, 5, 6], [1, 5]]
    assert encode_examples(tokenizer, ["animals cat :", "cat"], ["good cat", "bad"], max_length=6) == [
        {"input_ids": [1, 4, 5, 6, 7, 5], "labels": [-100, -100, -100, -100, 7, 5]},
        {"input_ids": [1, 5, 8, 2], "labels": [-100, -100, 8, 2]},
    ]


def test_chat_values_need_a_template_and_a_chat_prompt():
    from tasks.models import build_word_tokenizer, encode_examples, encode_prompts

    tokenizer = build_word_tokenizer(["cat"])
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        encode_prompts(tokenizer, [[user("cat")]])
    with pytest.raises(ValueError, match="needs a conversational prompt"):
        encode_examples(chatml_tokenizer(), ["cat"], [[assistant("cat")]], 64)


def test_conversational_prompts_generate_and_train_through_the_stages(tmp_path, run_stage):
    """A tiny model with a chat template: generation and reward-model training on chat pairs."""
    from tasks.models import build_tiny_llama, save_model, sample_responses

    tokenizer = chatml_tokenizer()
    model = build_tiny_llama(tokenizer, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    prompts = [[user("animals cat :")], [{"role": "system", "content": "be kind"}, user("dog")]]
    responses = sample_responses(model, tokenizer, prompts, n=2, max_new_tokens=4, seed=0)
    assert len(responses) == 2 and all(len(r) == 2 and all(isinstance(x, str) for x in r) for r in responses)
    assert "<|im_end|>" not in " ".join(sum(responses, []))

    model_dir = tmp_path / "chat_model"
    save_model(model, tokenizer, model_dir)
    path = write_jsonl(tmp_path / "chat.jsonl", [
        {"chosen": p + [assistant("good cat")], "rejected": p + [assistant("bad saw")]} for p in prompts * 2])
    pairs, metrics = run_stage({"kind": "jsonl", "path": str(path), "format": "preferences"})
    assert metrics["rows"] == 4
    _, rm_metrics = run_stage({"kind": "reward_model", "model": "m", "data": "d", "epochs": 1, "batch_size": 2},
                              {"model": model_dir, "data": pairs})
    assert rm_metrics
