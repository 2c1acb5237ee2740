"""Tiny random Hugging Face causal LMs built from configs (no download) and token batches,
shared by the transformers integration tests."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

VOCAB = 64
SEQUENCE = 7


def tiny_llama(hidden: int, seed: int, vocab: int = VOCAB, **config) -> LlamaForCausalLM:
    """A 2-layer LlamaForCausalLM of width ``hidden`` with weights drawn from ``seed``."""
    torch.manual_seed(seed)
    settings = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        pad_token_id=0,
    )
    settings.update(config)
    return LlamaForCausalLM(LlamaConfig(**settings))


def token_batch(seed: int, batch: int = 2, lengths: tuple[int, ...] | None = None) -> dict:
    """input_ids, attention_mask (right padding to SEQUENCE) and labels (-100 on padding)."""
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or tuple(
        int(x) for x in torch.randint(3, SEQUENCE + 1, (batch,), generator=g)
    )
    input_ids = torch.randint(1, VOCAB, (len(lengths), SEQUENCE), generator=g)
    attention_mask = torch.zeros(len(lengths), SEQUENCE, dtype=torch.long)
    for row, length in enumerate(lengths):
        attention_mask[row, :length] = 1
    input_ids[attention_mask == 0] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def counted_tokens(*batches: dict) -> int:
    """What the Trainer's num_items_in_batch counts for a causal LM: labels[:, 1:] != -100."""
    return sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)


class Examples(torch.utils.data.Dataset):
    """The rows of a token batch as a dataset of dicts (the Trainer's default collator
    stacks them back)."""

    def __init__(self, batch: dict):
        self.rows = [{k: v[i] for k, v in batch.items()} for i in range(len(batch["labels"]))]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict:
        return self.rows[index]


def examples(count: int = 8, seed: int = 7) -> Examples:
    """``count`` sequences of 3 to 7 tokens (unequal counted tokens per batch)."""
    lengths = tuple(3 + (3 * i) % 5 for i in range(count))
    return Examples(token_batch(seed=seed, lengths=lengths))


def training_args(output_dir, **overrides):
    """TrainingArguments for short deterministic CPU runs (constant LR, a log line per step)."""
    from transformers import TrainingArguments

    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=2,
        max_steps=4,
        learning_rate=5e-3,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)
