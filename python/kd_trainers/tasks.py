"""Labelled tasks for the trainers: a dataset spec becomes train/eval splits and a head, and
one supervised loss serves every head (cross-entropy or MSE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from kd_trainers.config import TrainConfig
from kd_trainers.data import ColumnSpec, TextDataset, load_dataset, load_splits
from kd_trainers.errors import ConfigError
from kd_trainers.evaluation import evaluate
from kd_trainers.models import Head, SequenceModel, encode
from kd_trainers.trainer import Runtime, Stage, StageResult, run_stage, shuffled_batches

TARGETS = ("label", "score")


@dataclass
class Task:
    """A labelled dataset split once: ``train`` and ``eval`` plus the head that fits them."""

    head: Head
    train: TextDataset
    eval: TextDataset


def columns_of(config: TrainConfig, target: str) -> ColumnSpec:
    """The columns a task reads from user files: text (and pair) plus its target's column."""
    return ColumnSpec(
        text=config.text_column,
        text_pair=config.text_pair_column,
        label=config.label_column if target == "label" else None,
        score=config.score_column if target == "score" else None,
    )


def cache_of(config: TrainConfig) -> Path | None:
    return Path(config.data_cache).expanduser() if config.data_cache else None


def first_split(loaded: TextDataset | dict[str, TextDataset], order: Sequence[str]):
    """A dataset, or the first of ``order`` (then any) split of a DatasetDict folder."""
    if isinstance(loaded, TextDataset):
        return loaded
    name = next((n for n in order if n in loaded), next(iter(loaded)))
    return loaded[name]


def load_unlabeled(config: TrainConfig, spec: str, cap: int) -> TextDataset:
    """Unlabeled text: ``text_column`` of ``spec`` (its train split if a DatasetDict folder),
    empty texts dropped, then a seeded sample of ``cap`` (0: all)."""
    columns = ColumnSpec(text=config.text_column, label=None, score=None)
    loaded = load_dataset(spec, columns=columns, cache_dir=cache_of(config))
    dataset = first_split(loaded, ("train",))
    kept = TextDataset(dataset.name, [e for e in dataset.examples if e.text.strip()])
    if not kept.examples:
        raise ConfigError(f"training data {spec!r} has no non-empty text")
    return kept.subset(cap or None, config.seed)


def head_name(spec: str) -> str:
    """A ModuleDict-safe head name: a file's stem (dots replaced), or the built-in name."""
    return Path(spec).stem.replace(".", "_") if ("/" in spec or "." in spec) else spec


def load_task(
    config: TrainConfig, spec: str, *, target: str = "label", name: str | None = None
) -> Task:
    """Splits ``spec`` (a built-in name or a path) with the run's seed; the head is named
    ``name`` (default: the spec) with one output per class, or 1 output for ``score``."""
    if target not in TARGETS:
        raise ConfigError(f"target must be label or score, got {target!r}")
    eval_spec = getattr(config, "eval_data", None)
    train, evaluation = load_splits(
        spec,
        columns=columns_of(config, target),
        target=target,
        eval_spec=eval_spec,
        eval_fraction=config.eval_fraction,
        seed=config.seed,
        max_train=config.max_train or None,
        max_eval=config.max_eval or None,
        cache_dir=cache_of(config),
    )
    if target == "label":
        if train.num_labels < 2:
            raise ConfigError(f"{spec}: classification needs at least 2 labels")
        head = Head(name or head_name(spec), train.num_labels, "classification")
    else:
        head = Head(name or head_name(spec), 1, "regression")
    return Task(head, train, evaluation)


def supervised_loss(logits: torch.Tensor, examples: Sequence, head: Head) -> torch.Tensor:
    """Cross-entropy on ``label`` (classification) or MSE on ``score`` (regression)."""
    if head.kind == "regression":
        gold = torch.tensor([e.score for e in examples], device=logits.device)
        return F.mse_loss(logits.squeeze(-1), gold)
    gold = torch.tensor([e.label for e in examples], device=logits.device)
    return F.cross_entropy(logits, gold)


def labels_of(examples: Sequence, device: torch.device) -> torch.Tensor:
    return torch.tensor([e.label for e in examples], device=device)


def batch_plan(examples: Sequence, config: TrainConfig, seed: int):
    """``plan(epoch)``: seeded batches of indices into ``examples``; with ``group_by_length``
    (:func:`~kd_trainers.trainer.shuffled_batches`) grouped by text length in characters, a
    tokenizer-free stand-in for the token count."""
    lengths = None
    if config.group_by_length:
        lengths = [len(e.text) + len(e.text_pair or "") for e in examples]
    return lambda epoch: shuffled_batches(len(examples), config.batch_size, seed, epoch, lengths)


def fine_tune(
    runtime: Runtime, name: str, model: SequenceModel, task: Task, tokenizer, epochs, lr
) -> StageResult:
    """Stage ``name``: ``model``'s head for ``task`` trained on its labels (CE or MSE)."""
    config = runtime.config

    def loss_fn(wrapped, batch):
        examples = [task.train[i] for i in batch]
        inputs = encode(tokenizer, examples, config.max_length, runtime.device)
        logits, _ = wrapped(inputs, task=task.head.name)
        return supervised_loss(logits, examples, task.head), {}

    plan = batch_plan(task.train.examples, config, config.seed)
    return run_stage(runtime, Stage(name, epochs, lr), model, loss_fn, plan)


def task_metrics(model: SequenceModel, tokenizer, task: Task, runtime: Runtime) -> dict:
    """The head's metrics on ``task``'s held-out split."""
    return evaluate(
        model,
        tokenizer,
        task.eval.examples,
        task.head,
        max_length=runtime.config.max_length,
        batch_size=runtime.config.eval_batch_size,
        device=runtime.device,
    )
