"""Tiny models for the bring-your-own tests, built here with `tokenizers` (nothing downloaded):
a reward model whose tokenizer (BPE, with a chat template) is not the demo policy's (word-level)."""
from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant:{% endif %}"
)


def bpe_tokenizer(vocab_size: int = 200):
    """A BPE tokenizer trained on the demo task's words, with <s>, </s>, <pad>, <unk> and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tasks import demo_task

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"], show_progress=False)
    words = demo_task.vocabulary() + ["user", "assistant", "system", ":"]
    tokenizer.train_from_iterator([" ".join(words)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def reward_model_folder(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised one-label LlamaForSequenceClassification with the BPE tokenizer, saved
    as someone else's reward model would be (a folder from_pretrained loads)."""
    import torch
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tokenizer = bpe_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
