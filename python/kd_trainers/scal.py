"""SCAL and USCAL ("Simple Contrastive Representation Adversarial Learning for NLP Tasks"):
adversarial examples in the word-embedding space, pulled towards their clean originals by a
contrastive loss.

With e the word embeddings, h(.) the pooled sentence vector and delta = eps g / ||g|| (FGM;
``pgd_steps`` > 1 gives PGD, see :mod:`kd_trainers.adversarial`):

supervised (``mode=supervised``), g = dCE/de:
    loss = CE(x) + CE(x + delta) + lambda * InfoNCE(h(x), h(x + delta)), tau = 0.05;
    stages ``plain`` (CE only), ``adversarial`` (no InfoNCE term) and ``scal``, all from
    the same start; each scored on clean and FGM/PGD-attacked eval examples.
unsupervised (``mode=unsupervised``), two dropout views h1, h2 (SimCSE), g = dInfoNCE(h(e), h2)/de:
    loss = InfoNCE(h1, h2) + alpha * InfoNCE(h1, h(x + delta)), alpha < 1;
    stages ``simcse`` (alpha = 0) and ``uscal``, scored by Spearman on sentence-pair data.
    ``grad_cache_chunk`` K runs it under GradCache, K texts of activations at a time: the three
    views are cached embeddings, and g is taken chunk by chunk from the cached gradient of the
    batch's InfoNCE (the perturbation delta (B, L, D) is kept for the replay).
``gather_negatives`` (under torchrun): every process's keys in every InfoNCE.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

import kd_kernels as kdk
from kd_kernels.grad_cache import GradCache
from kd_trainers.adversarial import embedding_perturbation
from kd_trainers.config import TrainConfig
from kd_trainers.errors import ConfigError
from kd_trainers.models import Head, SequenceModel, build_model, encode, load_tokenizer
from kd_trainers.report import markdown_table
from kd_trainers.sentence import (
    LARGE_BATCH_HELP,
    LargeBatchConfig,
    SentenceConfig,
    evaluate_embedder,
    evaluating,
    load_pair_sets,
    text_inputs,
)
from kd_trainers.tasks import labels_of, load_task, load_unlabeled
from kd_trainers.trainer import Runtime, Stage, run_stage, shuffled_batches

DESCRIPTION = "SCAL / USCAL: contrastive adversarial training in the embedding space"
MODES = ("supervised", "unsupervised")


@dataclass
class SCALConfig(LargeBatchConfig, TrainConfig):
    HELP: ClassVar[dict[str, str]] = {
        "mode": "supervised (SCAL, labelled task) or unsupervised (USCAL, unlabelled text)",
        "task": "supervised: labelled data (built-in name or file)",
        "unlabeled_data": "unsupervised: training text (built-in name or file)",
        "similarity_data": "unsupervised: pair sets scored by Spearman (lee, simlex999, "
        "wordsim353, files of sentence1, sentence2, score rows)",
        "model": "encoder: minilm, a local HF directory or tiny[:LxH]",
        "epsilon": "L2 radius of the training perturbation per example (paper grid 0.1-0.5)",
        "pgd_steps": "1: FGM; more: PGD steps for the training perturbation",
        "contrastive_weight": "lambda of InfoNCE(h(x), h(x + delta)) (supervised)",
        "alpha": "weight of InfoNCE(h1, h(x + delta)) (unsupervised, < 1)",
        "symmetric": "InfoNCE in both directions (NT-Xent-like) instead of one",
        "attack_epsilon": "radius of the evaluation attacks (FGM and PGD)",
        "attack_steps": "PGD steps of the evaluation attack",
        **LARGE_BATCH_HELP,
    }
    max_train: int = 2000
    max_eval: int = 1000
    mode: str = "supervised"
    task: str = "rotten_tomatoes"
    eval_data: str | None = None
    unlabeled_data: str = "wiki_sentences"
    similarity_data: list[str] = field(default_factory=lambda: ["lee", "simlex999", "wordsim353"])
    model: str = "minilm"
    tokenizer: str = "minilm"
    pooling: str = "mean"
    epochs: float = 2.0
    lr: float = 5e-5
    epsilon: float = 0.3
    pgd_steps: int = 1
    contrastive_weight: float = 1.0
    alpha: float = 0.5
    temperature: float = 0.05
    symmetric: bool = True
    attack_epsilon: float = 1.0
    attack_steps: int = 5

    def validate(self) -> None:
        super().validate()
        if self.mode not in MODES:
            raise ConfigError(f"mode must be supervised or unsupervised, got {self.mode!r}")
        if self.epsilon <= 0 or self.attack_epsilon <= 0:
            raise ConfigError("epsilon and attack_epsilon must be > 0")
        if self.pgd_steps < 1 or self.attack_steps < 1:
            raise ConfigError("pgd_steps and attack_steps must be >= 1")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.mode == "unsupervised" and not 0 <= self.alpha < 1:
            raise ConfigError(f"USCAL needs 0 <= alpha < 1, got {self.alpha}")
        self.validate_large_batch()
        if self.grad_cache_chunk and self.mode != "unsupervised":
            raise ConfigError("grad_cache_chunk is for mode=unsupervised (USCAL)")
        if self.grad_cache_chunk and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            # DDP wraps the whole SCAL step here, so it cannot see the replayed encoder passes.
            raise ConfigError("grad_cache_chunk with scal runs in one process (not torchrun)")


CONFIG = SCALConfig


def split_inputs(model: SequenceModel, inputs: dict) -> tuple[torch.Tensor, dict]:
    """(word embeddings (B, L, D) of ``input_ids``, the other inputs): the encoder adds
    position and segment embeddings to ``inputs_embeds`` itself."""
    rest = {k: v for k, v in inputs.items() if k != "input_ids"}
    return model.encoder.get_input_embeddings()(inputs["input_ids"]), rest


class ContrastiveAdversarial(nn.Module):
    """The model plus the loss of one SCAL / USCAL step (``forward`` returns (loss, logs)).

    ``adversarial=False`` leaves CE(x) alone (plain fine-tuning); ``contrastive_weight=0``
    (supervised) or ``alpha=0`` (unsupervised) drops the contrastive adversarial term.
    """

    def __init__(self, model: SequenceModel, config: SCALConfig, adversarial: bool, weight: float):
        super().__init__()
        self.model, self.config = model, config
        self.adversarial, self.weight = adversarial, weight

    def info_nce(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return kdk.info_nce_loss(
            query.float(),
            key.float(),
            temperature=self.config.temperature,
            symmetric=self.config.symmetric,
            backend=self.config.loss_backend,
            gather_distributed=self.config.gather_negatives,
        )

    def perturb(self, loss_of, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        config = self.config
        return embedding_perturbation(
            loss_of, embeddings, mask, config.epsilon, steps=config.pgd_steps
        )

    def forward(self, inputs: dict, labels: torch.Tensor | None):
        model = self.model
        if labels is None and self.config.grad_cache_chunk:
            return self.unsupervised_cached(inputs)
        embeddings, rest = split_inputs(model, inputs)
        mask = inputs["attention_mask"]
        features = model.embed({**rest, "inputs_embeds": embeddings})
        if labels is None:
            return self.unsupervised(embeddings, rest, mask, features)
        head = model.head()
        clean = F.cross_entropy(head(model.dropout(features)).float(), labels)
        if not self.adversarial:
            return clean, {"ce": clean.detach()}

        def task_loss(perturbed: torch.Tensor) -> torch.Tensor:
            logits = head(model.embed({**rest, "inputs_embeds": perturbed})).float()
            return F.cross_entropy(logits, labels, reduction="sum")

        delta = self.perturb(task_loss, embeddings, mask)
        adversarial_features = model.embed({**rest, "inputs_embeds": embeddings + delta})
        attacked = F.cross_entropy(head(model.dropout(adversarial_features)).float(), labels)
        loss = clean + attacked
        logs = {"ce": clean.detach(), "ce_adversarial": attacked.detach()}
        if self.weight > 0:
            contrastive = self.info_nce(features, adversarial_features)
            loss = loss + self.weight * contrastive
            logs["info_nce"] = contrastive.detach()
        return loss, logs

    def unsupervised(self, embeddings, rest, mask, first_view):
        model = self.model
        second_view = model.embed({**rest, "inputs_embeds": embeddings})  # new dropout mask
        loss = self.info_nce(first_view, second_view)
        logs = {"info_nce": loss.detach()}
        if self.weight > 0:
            anchor = second_view.detach()

            def contrastive_loss(perturbed: torch.Tensor) -> torch.Tensor:
                return self.info_nce(model.embed({**rest, "inputs_embeds": perturbed}), anchor)

            delta = self.perturb(contrastive_loss, embeddings, mask)
            adversarial = model.embed({**rest, "inputs_embeds": embeddings + delta})
            extra = self.info_nce(first_view, adversarial)
            loss = loss + self.weight * extra
            logs["info_nce_adversarial"] = extra.detach()
        return loss, logs

    def unsupervised_cached(self, inputs: dict):
        """:meth:`unsupervised` under GradCache, ``grad_cache_chunk`` rows at a time: the same
        loss and, given the same dropout masks, the same gradient."""
        model, config = self.model, self.config
        rows, size = inputs["input_ids"].shape[0], config.grad_cache_chunk
        chunks = [{k: v[i : i + size] for k, v in inputs.items()} for i in range(0, rows, size)]

        def encode(piece: tuple[dict, torch.Tensor | None]) -> torch.Tensor:
            """Pooled vectors of a chunk's tokens, moved by its perturbation when it has one."""
            chunk, delta = piece
            embeddings, rest = split_inputs(model, chunk)
            if delta is not None:
                embeddings = embeddings + delta
            return model.embed({**rest, "inputs_embeds": embeddings})

        cache = GradCache(encode)
        views = cache.embed([(chunk, None) for chunk in chunks + chunks])  # two dropout views
        first_view, second_view = torch.cat(views[: len(chunks)]), torch.cat(views[len(chunks) :])
        loss = self.info_nce(first_view, second_view)
        logs = {"info_nce": loss.detach()}
        if self.weight > 0:
            delta = self.cached_perturbation(inputs, chunks, second_view.detach())
            pieces = list(zip(chunks, delta.split(size), strict=True))
            adversarial = torch.cat(cache.embed(pieces))
            extra = self.info_nce(first_view, adversarial)
            loss = loss + self.weight * extra
            logs["info_nce_adversarial"] = extra.detach()
        return cache.loss(loss), logs

    def cached_perturbation(
        self, inputs: dict, chunks: list[dict], anchor: torch.Tensor
    ) -> torch.Tensor:
        """delta (B, L, D) of :meth:`perturb` for InfoNCE(h(e + delta), anchor), its gradient
        with respect to e taken chunk by chunk (``GradCache.input_gradients``)."""
        model = self.model
        with torch.no_grad():
            base, _ = split_inputs(model, inputs)
        rests = [split_inputs(model, chunk)[1] for chunk in chunks]

        def encode(piece: tuple[torch.Tensor, dict]) -> torch.Tensor:
            return model.embed({**piece[1], "inputs_embeds": piece[0]})

        def leaf_of(piece: tuple[torch.Tensor, dict]):
            leaf = piece[0].detach().requires_grad_()
            return (leaf, piece[1]), leaf

        def gradient_of(perturbed: torch.Tensor) -> torch.Tensor:
            cache = GradCache(encode)
            pieces = list(zip(perturbed.split(self.config.grad_cache_chunk), rests, strict=True))
            vectors = torch.cat(cache.embed(pieces))
            return torch.cat(cache.input_gradients(self.info_nce(vectors, anchor), leaf_of))

        config = self.config
        return embedding_perturbation(
            None,
            base,
            inputs["attention_mask"],
            config.epsilon,
            steps=config.pgd_steps,
            gradient_of=gradient_of,
        )


def attacked_correct(
    model: SequenceModel, inputs: dict, labels: torch.Tensor, epsilon: float, steps: int
) -> int:
    """Correct predictions after a ``steps``-step attack of radius ``epsilon`` (0: clean) that
    maximizes the CE of the gold labels."""
    embeddings, rest = split_inputs(model, inputs)
    head = model.head()

    def logits_of(perturbed: torch.Tensor) -> torch.Tensor:
        return head(model.embed({**rest, "inputs_embeds": perturbed})).float()

    def loss_of(perturbed: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits_of(perturbed), labels, reduction="sum")

    delta = 0.0
    if steps:
        mask = inputs["attention_mask"]
        delta = embedding_perturbation(loss_of, embeddings, mask, epsilon, steps=steps)
    return int((logits_of(embeddings + delta).argmax(-1) == labels).sum())


@torch.no_grad()
def robust_accuracy(
    model: SequenceModel, tokenizer, examples, config: SCALConfig, device: torch.device
) -> dict[str, float]:
    """Accuracy on clean examples and under FGM and PGD attacks of radius ``attack_epsilon``
    (the model in eval mode)."""
    was_training = model.training
    model.eval()
    attacks = {"clean": 0, "fgm": 1, "pgd": config.attack_steps}
    correct = dict.fromkeys(attacks, 0)
    for start in range(0, len(examples), config.eval_batch_size):
        batch = examples[start : start + config.eval_batch_size]
        inputs = encode(tokenizer, batch, config.max_length, device)
        labels = labels_of(batch, device)
        for name, steps in attacks.items():
            correct[name] += attacked_correct(model, inputs, labels, config.attack_epsilon, steps)
    model.train(was_training)
    return {name: round(count / len(examples), 4) for name, count in correct.items()}


def similarity_scores(
    model: SequenceModel, tokenizer, pair_sets: dict, config: SCALConfig, device: torch.device
) -> dict[str, float]:
    """``{SET_spearman, SET_pearson}`` of the pooled vectors' cosines on every pair set."""
    with evaluating(model):
        embed = lambda texts: model.embed(  # noqa: E731
            text_inputs(tokenizer, texts, config.max_length, device)
        )
        scores = evaluate_embedder(embed, pair_sets, config.eval_batch_size)
    return {f"{name}_{k}": v for name, values in scores.items() for k, v in values.items()}


def run(config: SCALConfig, runtime: Runtime) -> tuple[dict, str]:
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    device = runtime.device
    if config.mode == "supervised":
        task = load_task(config, config.task, target="label")
        train, head = task.train, task.head
        variants = (("plain", False, 0.0), ("adversarial", True, 0.0))
        variants += (("scal", True, config.contrastive_weight),)
    else:
        train = load_unlabeled(config, config.unlabeled_data, config.max_train)
        head = Head("unused", 1, "regression")
        variants = (("simcse", True, 0.0), ("uscal", True, config.alpha))
    runtime.log(f"{config.mode}: {len(train)} training examples")

    def fresh() -> SequenceModel:
        return build_model(
            config.model,
            [head],
            vocab_size=len(tokenizer),
            pooling=config.pooling,
            scores=False,
            seed=config.seed,
        )

    def score(model: SequenceModel) -> dict[str, float]:
        if config.mode == "supervised":
            return robust_accuracy(model, tokenizer, task.eval.examples, config, device)
        return similarity_scores(model, tokenizer, pair_sets, config, device)

    if config.mode == "unsupervised":
        # The pair sets of the sentence-embedding methods (Lee, SimLex, WordSim, user files).
        pair_sets = load_pair_sets(
            SentenceConfig(
                eval_data=config.similarity_data,
                max_eval=config.max_eval,
                seed=config.seed,
                data_cache=config.data_cache,
            )
        )
    results = {} if config.mode == "supervised" else {"start": score(fresh().to(device))}
    size, batch, seed = len(train), config.batch_size, config.seed
    supervised = config.mode == "supervised"
    for name, adversarial, weight in variants:
        wrapped = ContrastiveAdversarial(fresh(), config, adversarial, weight)

        def loss_fn(model, indices):
            examples = [train[i] for i in indices]
            inputs = encode(tokenizer, examples, config.max_length, device)
            labels = labels_of(examples, device) if supervised else None
            return model(inputs, labels)

        run_stage(
            runtime,
            Stage(name, config.epochs, config.lr),
            wrapped,
            loss_fn,
            lambda epoch: shuffled_batches(size, batch, seed, epoch),
        )
        results[name] = score(wrapped.model)
        runtime.log(f"{name}: {results[name]}")
    first = next(iter(results.values()))
    table = markdown_table(
        ["model", *first], [[name, *values.values()] for name, values in results.items()]
    )
    summary = {"mode": config.mode, "train_examples": len(train), **results}
    return summary, table
