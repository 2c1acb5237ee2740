"""Held-out evaluation of a :class:`SequenceModel` head: accuracy and macro-F1 for
classification heads, Pearson and Spearman for regression heads."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kd_trainers import metrics
from kd_trainers.models import Head, SequenceModel, by_length, encode, in_order


@torch.no_grad()
def predict(
    model: SequenceModel,
    tokenizer,
    examples: Sequence,
    head: Head,
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Head outputs for every example: (N, num_outputs) fp32 logits, or (N,) scores."""
    was_training = model.training
    model.eval()
    outputs, batches = [], by_length(examples, batch_size)
    for batch in batches:
        inputs = encode(tokenizer, [examples[i] for i in batch], max_length, device)
        logits, _ = model(inputs, task=head.name)
        outputs.append(logits.float().cpu())
    model.train(was_training)
    logits = in_order(outputs, batches) if outputs else torch.empty(0, head.num_outputs)
    return logits.squeeze(-1) if head.kind == "regression" else logits


def score(head: Head, outputs: torch.Tensor, examples: Sequence) -> dict[str, float]:
    """Metrics (4 decimals) of ``outputs`` (as :func:`predict` returns) against the gold."""
    if head.kind == "regression":
        gold = [e.score for e in examples]
        values = metrics.regression_metrics(outputs.tolist(), gold)
    else:
        gold = [e.label for e in examples]
        values = metrics.classification_metrics(outputs.argmax(-1).tolist(), gold)
    return {name: round(value, 4) for name, value in values.items()}


def evaluate(model: SequenceModel, tokenizer, examples: Sequence, head: Head, **options):
    """:func:`score` of :func:`predict` (same keyword options): the head's eval metrics."""
    return score(head, predict(model, tokenizer, examples, head, **options), examples)
