"""SimCSE (Gao et al., 2021, "SimCSE: Simple Contrastive Learning of Sentence Embeddings").

Unsupervised: every sentence of a batch goes through the encoder twice (one forward of the
batch stacked on itself, so each copy gets its own dropout mask); the two views are each
other's positive and the rest of the batch are negatives:
    loss = info_nce_loss(e, e', temperature=tau, similarity="cosine")
         = mean_i [ logsumexp_j cos(e_i, e'_j) / tau - cos(e_i, e'_i) / tau ].
Supervised (``positive_column`` set): anchor a_i against positives p_i and, with
``negative_column``, hard negatives n_i appended as extra keys (M = 2N > N when every row
has one; a row without one just adds no key):
    loss = info_nce_loss(e(a), [e(p); e(n)]), the positive of query i being key i.

Large batches: ``grad_cache_chunk`` K embeds a batch K texts at a time under GradCache (the
same loss and gradient; memory is the embeddings plus one chunk's activations), and
``gather_negatives`` (under torchrun) scores every query against every process's keys.

Stage ``simcse`` (resumable). Every pair set in ``eval_data`` is scored before and after.
Trans-Encoder's step 1 reuses :func:`contrastive_stage`.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

import kd_kernels as kdk
from kd_trainers.data import ColumnSpec, load_dataset
from kd_trainers.errors import ConfigError
from kd_trainers.models import load_tokenizer
from kd_trainers.report import markdown_table
from kd_trainers.sentence import (
    SENTENCE_HELP,
    BiEncoder,
    SentenceConfig,
    build_encoder,
    check_pooling,
    contrastive_views,
    evaluate_bi_encoder,
    load_pair_sets,
    load_texts,
    results_table,
    save_encoder,
    text_inputs,
)
from kd_trainers.tasks import cache_of, first_split
from kd_trainers.trainer import Runtime, Stage, StageResult, run_stage, shuffled_batches

DESCRIPTION = "SimCSE: contrastive sentence embeddings (dropout views, or hard negatives)"


@dataclass
class SimCSEConfig(SentenceConfig):
    HELP: ClassVar[dict[str, str]] = {
        **SENTENCE_HELP,
        "pooling": "sentence vector: mean (of tokens) or cls",
        "epochs": "epochs of contrastive training",
        "lr": "peak learning rate",
        "positive_column": "supervised SimCSE: column of each text's positive (none: "
        "unsupervised, dropout views)",
        "negative_column": "supervised SimCSE: column of each text's hard negative",
    }
    pooling: str = "mean"
    epochs: float = 1.0
    lr: float = 3e-5
    positive_column: str | None = None
    negative_column: str | None = None

    def validate(self) -> None:
        super().validate()
        check_pooling(self.pooling)
        if self.negative_column and not self.positive_column:
            raise ConfigError("negative_column needs positive_column (supervised SimCSE)")


CONFIG = SimCSEConfig


@dataclass(frozen=True)
class Triple:
    """A supervised example: anchor, positive, optional hard negative."""

    anchor: str
    positive: str
    negative: str | None = None


def pair_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float,
    backend: str,
    gather: bool = False,
) -> tuple[torch.Tensor, dict]:
    """InfoNCE of queries (N, D) against keys (M >= N, D), query i's positive being key i
    (keys past N are hard negatives); ``gather``: every process's keys. Logs the mean cosine
    of the positive pairs."""
    loss = kdk.info_nce_loss(
        query, key, temperature=temperature, backend=backend, gather_distributed=gather
    )
    count = query.shape[0]
    agreement = torch.nn.functional.cosine_similarity(query.float(), key[:count].float()).mean()
    return loss, {"positive_cosine": agreement.detach()}


def dropout_views(model, inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Two views (B, D) of each of B tokenized texts: one forward of the batch stacked on
    itself, so each copy gets its own dropout mask."""
    doubled = {name: torch.cat([value, value]) for name, value in inputs.items()}
    first, second = model(doubled).chunk(2)
    return first, second


def dropout_views_loss(
    model, inputs: dict, *, temperature: float, backend: str, gather: bool = False
) -> tuple[torch.Tensor, dict]:
    """Unsupervised SimCSE on one batch of tokenized texts (B rows)."""
    return pair_loss(
        *dropout_views(model, inputs), temperature=temperature, backend=backend, gather=gather
    )


def hard_negative_loss(
    model, inputs: dict, count: int, *, temperature: float, backend: str, gather: bool = False
) -> tuple[torch.Tensor, dict]:
    """Supervised SimCSE: rows [anchors (N); positives (N); hard negatives (K)] of
    ``inputs``; keys are positives then negatives (M = N + K), labels default arange(N)."""
    vectors = model(inputs)
    return pair_loss(
        vectors[:count], vectors[count:], temperature=temperature, backend=backend, gather=gather
    )


def contrastive_stage(
    runtime: Runtime,
    stage: Stage,
    model: BiEncoder,
    tokenizer,
    data: Sequence[str] | Sequence[Triple],
) -> StageResult:
    """One SimCSE stage on texts (unsupervised) or :class:`Triple` s (supervised)."""
    config = runtime.config
    assert isinstance(config, SentenceConfig)
    options = {
        "temperature": config.temperature,
        "backend": config.loss_backend,
        "gather": config.gather_negatives,
    }

    def text_rows(texts: Sequence[str]) -> dict:
        return text_inputs(tokenizer, texts, config.max_length, runtime.device)

    def triple_rows(triples: Sequence[Triple]) -> tuple[dict, int, int]:
        texts = [t.anchor for t in triples] + [t.positive for t in triples]
        negatives = [t.negative for t in triples if t.negative is not None]
        return text_rows(texts + negatives), len(triples), len(negatives)

    def triple_views(wrapped, rows: tuple[dict, int, int]) -> list[torch.Tensor]:
        """Anchors, positives, hard negatives of the triples: one forward pass."""
        inputs, count, negatives = rows
        return list(wrapped(inputs).split([count, count, negatives]))

    def loss_fn(wrapped, batch: list[int]):
        picked = [data[i] for i in batch]
        chunk = config.grad_cache_chunk
        if isinstance(picked[0], str):
            (first, second), finish = contrastive_views(
                wrapped, picked, chunk, text_rows, dropout_views
            )
            loss, logs = pair_loss(first, second, **options)
        else:
            (anchors, positives, negatives), finish = contrastive_views(
                wrapped, picked, chunk, triple_rows, triple_views
            )
            loss, logs = pair_loss(anchors, torch.cat([positives, negatives]), **options)
        return finish(loss), logs

    def plan(epoch: int) -> list[list[int]]:
        return shuffled_batches(len(data), config.batch_size, config.seed, epoch)

    return run_stage(runtime, stage, model, loss_fn, plan)


def load_triples(config: SimCSEConfig) -> list[Triple]:
    """(anchor, positive[, hard negative]) rows of ``train_data``, capped at ``max_train``."""
    assert config.positive_column is not None

    def column_pairs(second: str) -> list:
        columns = ColumnSpec(text=config.text_column, text_pair=second, label=None, score=None)
        loaded = load_dataset(config.train_data, columns=columns, cache_dir=cache_of(config))
        return first_split(loaded, ("train",)).examples

    positives = column_pairs(config.positive_column)
    negatives = column_pairs(config.negative_column) if config.negative_column else None
    triples = []
    for i, example in enumerate(positives):
        # A row without a hard negative still trains: negatives are extra keys, any number.
        negative = (negatives[i].text_pair or "").strip() if negatives is not None else ""
        if example.text.strip() and (example.text_pair or "").strip():
            triples.append(Triple(example.text, example.text_pair or "", negative or None))
    if not triples:
        raise ConfigError(f"training data {config.train_data!r} has no (anchor, positive) rows")
    if config.max_train and config.max_train < len(triples):
        # The seeded sample, in file order, that TextDataset.subset draws.
        kept = sorted(random.Random(config.seed).sample(range(len(triples)), config.max_train))
        triples = [triples[i] for i in kept]
    return triples


def run(config: SimCSEConfig, runtime: Runtime) -> tuple[dict, str]:
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    encoder = build_encoder(config.model, config.keep_every, len(tokenizer), config.seed)
    model = BiEncoder(encoder, config.pooling).to(runtime.device)
    pair_sets = load_pair_sets(config)
    if config.positive_column:
        data: list = load_triples(config)
    else:
        data = load_texts(config, config.train_data, config.max_train)
    kind = "supervised" if config.positive_column else "unsupervised"
    runtime.log(f"{kind} SimCSE on {len(data)} examples of {config.train_data}")

    def evaluate() -> dict:
        return evaluate_bi_encoder(
            model,
            tokenizer,
            pair_sets,
            max_length=config.eval_max_length,
            batch_size=config.eval_batch_size,
            device=runtime.device,
        )

    before = evaluate()
    runtime.log(f"before: {before}")
    result = contrastive_stage(
        runtime, Stage("simcse", config.epochs, config.lr), model, tokenizer, data
    )
    after = evaluate()
    runtime.log(f"after: {after}")
    if runtime.is_main:
        save_encoder(model.encoder, tokenizer, runtime.output_dir / "model", pooling=config.pooling)
    header, rows = results_table([("before", before), ("after", after)])
    summary = {
        "model": config.model,
        "layers": model.encoder.config.num_hidden_layers,
        "kind": kind,
        "train_examples": len(data),
        "pair_sets": {name: len(pairs) for name, pairs in pair_sets.items()},
        "loss_backend": config.loss_backend,
        "before": before,
        "after": after,
        "training": vars(result),
    }
    return summary, markdown_table(header, rows)
