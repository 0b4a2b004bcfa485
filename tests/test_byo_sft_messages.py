"""sft on a `messages` column (trl's conversational format): the chat template renders each
conversation, and the loss covers the assistant turns only."""
from __future__ import annotations

import pyarrow as pa
import pytest

from tasks.base import BadInput
from tasks.tables import write_table

TEMPLATE = "{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} <eos> {% endfor %}{% if add_generation_prompt %}assistant : {% endif %}"


@pytest.fixture
def chat_model(tmp_path, tiny_demo_model):
    from tasks.models import load_causal_lm, save_model

    model, tokenizer = load_causal_lm(tiny_demo_model, device="cpu")
    tokenizer.chat_template = TEMPLATE
    save_model(model, tokenizer, tmp_path / "chat_model")
    return tmp_path / "chat_model"


CONVERSATION = [{"role": "system", "content": "food the"}, {"role": "user", "content": "pizza :"},
                {"role": "assistant", "content": "good cheese cake"}, {"role": "user", "content": "more"},
                {"role": "assistant", "content": "great pasta"}]


def test_only_the_assistant_turns_are_labelled(chat_model):
    from tasks.models import IGNORE, load_tokenizer
    from tasks.train.sft import encode_conversation

    tokenizer = load_tokenizer(chat_model)
    example = encode_conversation(tokenizer, CONVERSATION)
    tokens = tokenizer.convert_ids_to_tokens(example["input_ids"])
    labelled = [t for t, label in zip(tokens, example["labels"]) if label != IGNORE]
    assert labelled == ["good", "cheese", "cake", "<eos>", "great", "pasta", "<eos>"]
    full = tokenizer.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == tokenizer(full, add_special_tokens=False)["input_ids"]  # the whole conversation


def test_sft_trains_on_a_messages_column(tmp_path, chat_model, run_stage):
    data = tmp_path / "messages"
    data.mkdir()
    write_table(pa.table({"messages": [CONVERSATION] * 32}), data)
    log = []
    _, metrics = run_stage({"kind": "sft", "model": "m", "data": "d", "lr": 1e-2, "batch_size": 8, "epochs": 3},
                           {"model": chat_model, "data": data}, log=log)
    losses = [m["loss"] for _, m in log if "loss" in m]
    assert losses[-1] < 0.8 * losses[0]

    bad = tmp_path / "bad"
    bad.mkdir()
    write_table(pa.table({"messages": [[{"role": "user", "content": "pizza"}]]}), bad)
    with pytest.raises(BadInput, match="row 1: messages.*no assistant message"):
        run_stage({"kind": "sft", "model": "m", "data": "d"}, {"model": chat_model, "data": bad})


def test_messages_need_a_chat_template(tmp_path, tiny_demo_model, run_stage):
    data = tmp_path / "messages"
    data.mkdir()
    write_table(pa.table({"messages": [CONVERSATION]}), data)
    with pytest.raises(BadInput, match="messages: a model whose tokenizer has a chat template"):
        run_stage({"kind": "sft", "model": "m", "data": "d"}, {"model": tiny_demo_model, "data": data})
