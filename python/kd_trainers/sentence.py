"""Sentence embeddings shared by SimCSE, Trans-Encoder and PromptBERT: the bi-encoder (encoder
+ pooling), embedding texts in batches, and evaluation on scored pairs.

A bi-encoder maps a text to one vector e = pool(H), H = encoder(text) (B, L, D):
    cls    e = H[:, 0]
    mean   e = sum_t m_t H[:, t] / sum_t m_t over the attention mask m
    mask   e = H[b, p_b], p_b the position of a prompt's [MASK] (``mask_positions`` input)
A pair is scored by cos(e_a, e_b); an evaluation set is scored by the Spearman (and Pearson)
correlation of those cosines with human scores. Sets: ``lee`` (1,225 document pairs, the STS
stand-in), ``simlex999``, ``wordsim353``, or a user file of (sentence1, sentence2, score) rows
(``eval_columns``), so the STS benchmarks work unchanged when a user has them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertModel

from kd_kernels.grad_cache import GradCache
from kd_trainers import metrics
from kd_trainers.config import TrainConfig
from kd_trainers.data import ColumnSpec, Example, TextDataset, load_dataset
from kd_trainers.errors import ConfigError
from kd_trainers.models import encode, load_encoder, student_from_teacher
from kd_trainers.tasks import cache_of, first_split, head_name, load_unlabeled

POOLINGS = ("cls", "mean", "mask")
# The inputs a BertModel takes; prompt batches also carry ``mask_positions``.
ENCODER_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")
# texts -> (B, D) embeddings; called under no_grad with the model in eval mode.
Embed = Callable[[Sequence[str]], torch.Tensor]


@dataclasses.dataclass
class LargeBatchConfig:
    """Keys of every contrastive (InfoNCE) training step: GradCache and negatives from every
    process. A mixin of the sentence methods' configs and SCAL's."""

    grad_cache_chunk: int = 0
    gather_negatives: bool = False

    def validate_large_batch(self) -> None:
        if self.grad_cache_chunk < 0:
            raise ConfigError(f"grad_cache_chunk must be >= 0, got {self.grad_cache_chunk}")
        if self.gather_negatives and int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise ConfigError(
                "gather_negatives needs several processes: torchrun --nproc_per_node N "
                "-m kd_trainers ..."
            )


LARGE_BATCH_HELP: dict[str, str] = {
    "grad_cache_chunk": "GradCache: embed each batch K texts at a time without gradient, then "
    "re-embed chunk by chunk with the loss's gradient (memory: the embeddings plus one chunk's "
    "activations; 0: one pass)",
    "gather_negatives": "under torchrun, every process's embeddings are negatives for every "
    "query (all-gather with gradient)",
}


@dataclasses.dataclass
class SentenceConfig(LargeBatchConfig, TrainConfig):
    """Keys every sentence-embedding method shares: the encoder, the unlabeled training text,
    the contrastive temperature and the pair sets evaluated before and after training."""

    model: str = "minilm"
    keep_every: int = 1
    tokenizer: str = "minilm"
    train_data: str = "wiki_sentences"
    max_train: int = 10000
    batch_size: int = 64
    max_length: int = 32
    temperature: float = 0.05
    eval_data: list[str] = dataclasses.field(
        default_factory=lambda: ["lee", "simlex999", "wordsim353"]
    )
    eval_columns: list[str] = dataclasses.field(
        default_factory=lambda: ["sentence1", "sentence2", "score"]
    )
    eval_max_length: int = 256

    def validate(self) -> None:
        super().validate()
        if self.keep_every < 1:
            raise ConfigError(f"keep_every must be >= 1, got {self.keep_every}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if not self.eval_data:
            raise ConfigError("eval_data is empty: name at least one pair set (e.g. lee)")
        if len(self.eval_columns) != 3:
            raise ConfigError(
                f"eval_columns needs 3 names (text, text pair, score), got {self.eval_columns}"
            )
        if self.eval_max_length < 2:
            raise ConfigError(f"eval_max_length must be >= 2, got {self.eval_max_length}")
        self.validate_large_batch()


SENTENCE_HELP: dict[str, str] = {
    "model": "encoder: minilm (the packaged all-MiniLM-L6-v2), a local HF directory or tiny[:LxH]",
    "keep_every": "keep every k-th layer of model (2 on MiniLM-L6: the 3-layer student; 1: all)",
    "tokenizer": "tokenizer of tiny random models (minilm or a directory)",
    "train_data": "unlabeled training text: wiki_sentences or a file/folder (text_column)",
    "max_train": "cap on training texts (0: all)",
    "temperature": "InfoNCE temperature tau of the contrastive loss",
    "eval_data": "pair sets scored by cosine: lee, simlex999, wordsim353 or files of "
    "(sentence1, sentence2, score) rows",
    "eval_columns": "text, text pair and score columns of user eval pair files",
    "eval_max_length": "tokens per text when evaluating (a cross-encoder's pair shares it)",
    "max_eval": "cap on pairs per evaluation set (0: all)",
    **LARGE_BATCH_HELP,
}


def check_pooling(pooling: str, allowed: Sequence[str] = ("cls", "mean")) -> None:
    if pooling not in allowed:
        raise ConfigError(f"pooling must be one of {', '.join(allowed)}, got {pooling!r}")


def pool(
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    pooling: str,
    mask_positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, L, D) last hidden states -> (B, D) sentence vectors (see the module docstring)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "mean":
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    if pooling == "mask":
        if mask_positions is None:
            raise ValueError("pooling='mask' needs the inputs' mask_positions (B,)")
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), mask_positions]
    raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")


class BiEncoder(nn.Module):
    """Encoder + pooling: ``forward(inputs) -> (B, D)`` sentence vectors (no normalization;
    the cosine is taken by the loss or the evaluation)."""

    def __init__(self, encoder: BertModel, pooling: str = "mean"):
        super().__init__()
        if pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.encoder = encoder
        self.pooling = pooling

    def forward(self, inputs: dict) -> torch.Tensor:
        hidden = self.encoder(**{k: v for k, v in inputs.items() if k in ENCODER_INPUTS})
        return pool(
            hidden.last_hidden_state,
            inputs["attention_mask"],
            self.pooling,
            inputs.get("mask_positions"),
        )


def build_encoder(
    name: str, keep_every: int, vocab_size: int, seed: int, key: str = "keep_every"
) -> BertModel:
    """``name``'s encoder, keeping every ``keep_every``-th layer (1: all of them)."""
    encoder = load_encoder(name, vocab_size=vocab_size, seed=seed)
    layers = encoder.config.num_hidden_layers
    if layers % keep_every:
        raise ConfigError(f"{key}={keep_every} does not divide the {layers} layers of {name}")
    return student_from_teacher(encoder, keep_every) if keep_every > 1 else encoder


def text_inputs(tokenizer, texts: Sequence[str], max_length: int, device: torch.device) -> dict:
    """Token ids of single texts, padded to the longest: (B, L) int64 tensors."""
    return encode(tokenizer, [Example(t) for t in texts], max_length, device)


def contrastive_views(
    model: nn.Module,
    items: Sequence,
    chunk: int,
    prepare: Callable[[Sequence], Any],
    embed: Callable[[nn.Module, Any], Sequence[torch.Tensor]],
) -> tuple[list[torch.Tensor], Callable[[torch.Tensor], torch.Tensor]]:
    """The views of a contrastive batch, and what turns the loss made of them into the loss to
    back-propagate.

    ``prepare(items)`` builds the model's inputs of some items (tokenized, on the device);
    ``embed(model, inputs)`` returns their views, each (rows_v, D) (two dropout views; or
    anchors, positives, hard negatives). ``chunk`` 0 (or >= len(items)): one pass with gradient,
    and the returned function is the identity. ``chunk`` K: GradCache
    (:class:`kd_kernels.grad_cache.GradCache`): the items are prepared and embedded K at a
    time without gradient, each view concatenated over the chunks in item order, and the
    returned function gives the loss whose backward re-embeds chunk by chunk (same dropout).
    """
    if chunk <= 0 or chunk >= len(items):
        return list(embed(model, prepare(items))), lambda loss: loss
    pieces = [
        (i, prepare(items[start : start + chunk]))
        for i, start in enumerate(range(0, len(items), chunk))
    ]
    sizes: dict[int, list[int]] = {}

    def encode(piece: tuple[int, Any]) -> torch.Tensor:
        views = embed(model, piece[1])
        sizes[piece[0]] = [view.shape[0] for view in views]
        return torch.cat(list(views))

    cache = GradCache(encode, module=model)
    parts = [
        embedded.split(sizes[index])
        for (index, _), embedded in zip(pieces, cache.embed(pieces), strict=True)
    ]
    views = [torch.cat([part[v] for part in parts]) for v in range(len(parts[0]))]
    return views, cache.loss


def text_embedder(model: BiEncoder, tokenizer, max_length: int, device: torch.device) -> Embed:
    """The :data:`Embed` of a cls/mean bi-encoder on plain texts."""
    return lambda texts: model(text_inputs(tokenizer, texts, max_length, device))


@contextlib.contextmanager
def evaluating(*modules: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout) and no_grad inside; each module's training flag restored."""
    flags = [m.training for m in modules]
    for module in modules:
        module.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in zip(modules, flags, strict=True):
            module.train(flag)


def embed_texts(embed: Embed, texts: Sequence[str], batch_size: int) -> torch.Tensor:
    """(N, D) fp32 CPU embeddings of ``texts``. Each distinct text is embedded once (the 1,225
    Lee pairs hold 50 documents), in batches of similar length (less padding)."""
    distinct = list(dict.fromkeys(texts))
    order = sorted(range(len(distinct)), key=lambda i: -len(distinct[i]))
    vectors: list[torch.Tensor | None] = [None] * len(distinct)
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        out = embed([distinct[i] for i in chunk]).float().cpu()
        for row, i in enumerate(chunk):
            vectors[i] = out[row]
    index = {text: i for i, text in enumerate(distinct)}
    return torch.stack([vectors[index[t]] for t in texts])  # type: ignore[misc]


def cosine_scores(
    embed: Embed, firsts: Sequence[str], seconds: Sequence[str], batch_size: int
) -> torch.Tensor:
    """cos(e(a_i), e(b_i)) for every pair: (N,) fp32."""
    vectors = embed_texts(embed, [*firsts, *seconds], batch_size)
    a, b = vectors[: len(firsts)], vectors[len(firsts) :]
    return nn.functional.cosine_similarity(a, b, dim=-1)


def pair_metrics(predicted: Sequence[float] | torch.Tensor, examples: Sequence[Example]):
    """``{"spearman", "pearson"}`` (4 decimals) of predictions against the pairs' scores."""
    values = metrics.regression_metrics(
        [float(p) for p in predicted],
        [float(e.score) for e in examples],  # type: ignore[arg-type]
    )
    return {"spearman": round(values["spearman"], 4), "pearson": round(values["pearson"], 4)}


def evaluate_embedder(
    embed: Embed, pair_sets: dict[str, list[Example]], batch_size: int
) -> dict[str, dict[str, float]]:
    """Per pair set, Spearman and Pearson of the cosines against the human scores. Call it
    inside :func:`evaluating` so that no dropout is applied."""
    results = {}
    for name, pairs in pair_sets.items():
        scores = cosine_scores(
            embed, [e.text for e in pairs], [e.text_pair for e in pairs], batch_size
        )
        results[name] = pair_metrics(scores, pairs)
    return results


def evaluate_bi_encoder(
    model: BiEncoder,
    tokenizer,
    pair_sets: dict[str, list[Example]],
    *,
    max_length: int,
    batch_size: int,
    device: torch.device,
) -> dict[str, dict[str, float]]:
    """:func:`evaluate_embedder` of a cls/mean bi-encoder, without dropout."""
    with evaluating(model):
        embed = text_embedder(model, tokenizer, max_length, device)
        return evaluate_embedder(embed, pair_sets, batch_size)


def save_encoder(encoder: BertModel, tokenizer, directory: Path, **info: object) -> None:
    """HF files of ``encoder`` and ``tokenizer`` (loadable as ``--model DIR``), plus
    ``sentence.json`` with ``info`` (the pooling or template to use it with)."""
    directory.mkdir(parents=True, exist_ok=True)
    encoder.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    (directory / "sentence.json").write_text(json.dumps(info, indent=2) + "\n")


def load_pair_sets(config: SentenceConfig) -> dict[str, list[Example]]:
    """Name -> scored pairs of every ``eval_data`` entry, each capped at ``max_eval`` (a seeded
    sample). A DatasetDict folder gives its test split, else validation, else train."""
    text, pair, score = config.eval_columns
    columns = ColumnSpec(text=text, text_pair=pair, label=None, score=score)
    sets = {}
    for spec in config.eval_data:
        loaded = load_dataset(spec, columns=columns, cache_dir=cache_of(config))
        dataset = first_split(loaded, ("test", "validation", "train"))
        scored = [e for e in dataset.examples if e.score is not None and e.text_pair is not None]
        if not scored:
            raise ConfigError(f"eval data {spec!r} has no (text, text pair, score) rows")
        capped = TextDataset(dataset.name, scored).subset(config.max_eval or None, config.seed)
        sets[head_name(spec)] = capped.examples
    return sets


def load_texts(config: SentenceConfig, spec: str, cap: int) -> list[str]:
    """The texts of :func:`kd_trainers.tasks.load_unlabeled`."""
    return [e.text for e in load_unlabeled(config, spec, cap).examples]


def results_table(
    rows: Sequence[tuple[str, dict[str, dict[str, float]]]], metric: str = "spearman"
) -> tuple[list[str], list[list[object]]]:
    """(header, rows) of a table: one row per (label, per-set results), one column per set."""
    names = list(rows[0][1]) if rows else []
    header = ["model", *(f"{name} {metric}" for name in names)]
    return header, [[label, *(result[n][metric] for n in names)] for label, result in rows]
