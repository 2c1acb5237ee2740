"""AAD (Ryu, Lee & Lee, 2022, "Knowledge distillation for BERT unsupervised domain
adaptation"): adversarial adaptation (ADDA) of a target encoder, regularized by distilling the
source model's predictions on source data.

Stages (each resumable under ``stages/``):
    source              E_s + classifier C fine-tuned on labelled source data (cross-entropy);
    adapt               E_t starts as E_s; E_s and C frozen. Optimizer steps alternate:
                        (a) the discriminator D (an MLP on pooled features) minimizes
                            -log D(E_s(x_s)) - log(1 - D(E_t(x_t)));
                        (b) E_t minimizes -log D(E_t(x_t))
                            + kd_weight * t^2 KL(softmax(C(E_s(x_s))/t) || softmax(C(E_t(x_s))/t))
                            (``kd_loss(kind="kl")``, t = 20);
    adapt_no_kd         the same with kd_weight = 0: the adversarial-only ablation (ADDA);
    target_supervised   E + C trained on the target's labels: the ceiling, where labels exist.
Prediction on the target domain is C(E_t(x_t)).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.nn import functional as F

import kd_kernels as kdk
from kd_trainers.config import TrainConfig
from kd_trainers.data import TextDataset
from kd_trainers.errors import ConfigError
from kd_trainers.models import SequenceModel, build_model, encode, load_tokenizer
from kd_trainers.report import markdown_table
from kd_trainers.tasks import Task, fine_tune, load_task, load_unlabeled, task_metrics
from kd_trainers.trainer import Runtime, Stage, run_stage, shuffled_batches

DESCRIPTION = "AAD: adversarial domain adaptation of BERT with knowledge distillation"


@dataclass
class AADConfig(TrainConfig):
    HELP: ClassVar[dict[str, str]] = {
        "source": "labelled source-domain data (built-in name or file)",
        "target": "target-domain data: its train split is used unlabelled; its labels, "
        "where present, only score the target eval split (and train the ceiling)",
        "model": "encoder of E_s and E_t: minilm, a local HF directory or tiny[:LxH]",
        "tokenizer": "tokenizer of tiny random models",
        "pooling": "feature for C and D: mean (of tokens) or cls",
        "temperature": "t of the distillation term (AAD: 20)",
        "kd_weight": "weight of the distillation term in E_t's loss",
        "adversarial_weight": "weight of -log D(E_t(x_t)) in E_t's loss",
        "discriminator_hidden": "width of D's two hidden layers (0: 2 x encoder width)",
        "ablation": "also run the adversarial-only adaptation (kd_weight = 0)",
        "ceiling": "also train on the target's labels (when it has them)",
        "target_labels": "false for an unlabelled target file: no target scores, no ceiling",
    }
    max_train: int = 2000
    max_eval: int = 1000
    source: str = "vader:movie"
    target: str = "vader:amazon"
    model: str = "minilm"
    tokenizer: str = "minilm"
    pooling: str = "mean"
    source_epochs: float = 2.0
    source_lr: float = 5e-5
    adapt_epochs: float = 1.0
    adapt_lr: float = 1e-5
    temperature: float = 20.0
    kd_weight: float = 1.0
    adversarial_weight: float = 1.0
    discriminator_hidden: int = 0
    ablation: bool = True
    ceiling: bool = True
    target_labels: bool = True

    def validate(self) -> None:
        super().validate()
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.kd_weight < 0 or self.adversarial_weight < 0:
            raise ConfigError("kd_weight and adversarial_weight must be >= 0")
        if self.source == self.target:
            raise ConfigError(f"source and target are the same data: {self.source!r}")


CONFIG = AADConfig
SOURCE_LABEL, TARGET_LABEL = 1.0, 0.0


class Adaptation(nn.Module):
    """E_t (a copy of the source model whose classifier C stays frozen) and D.

    ``forward(kind, source_inputs, target_inputs)`` returns (loss, logs) for one alternating
    step: ``kind="discriminator"`` moves only D, ``kind="encoder"`` only E_t. The frozen
    source model is held outside the module's parameters (not trained, not checkpointed).
    ``kd_weight`` (0 for the adversarial-only ablation) weights the distillation term.
    """

    def __init__(self, source: SequenceModel, config: AADConfig, kd_weight: float):
        super().__init__()
        self.config, self.kd_weight = config, kd_weight
        self.target = copy.deepcopy(source)
        for parameter in self.target.heads.parameters():
            parameter.requires_grad_(False)
        width = source.encoder.config.hidden_size
        hidden = config.discriminator_hidden or 2 * width
        self.discriminator = nn.Sequential(
            nn.Linear(width, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, hidden),
            nn.LeakyReLU(0.2),
            nn.Linear(hidden, 1),
        )
        self.frozen_source = [source.eval()]  # a list keeps it out of the module tree

    def forward(self, kind: str, source_inputs: dict, target_inputs: dict):
        source = self.frozen_source[0]
        with torch.no_grad():
            source_features = source.embed(source_inputs)
        if kind == "discriminator":
            with torch.no_grad():
                target_features = self.target.embed(target_inputs)
            on_source = self.discriminator(source_features).squeeze(-1)
            on_target = self.discriminator(target_features).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(
                on_source, torch.full_like(on_source, SOURCE_LABEL)
            ) + F.binary_cross_entropy_with_logits(
                on_target, torch.full_like(on_target, TARGET_LABEL)
            )
            return loss, {"discriminator": loss.detach()}
        # Encoder step: D's parameters are detached, so -log D(E_t(x_t)) moves E_t only.
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        judged = torch.func.functional_call(
            self.discriminator, frozen, (self.target.embed(target_inputs),)
        ).squeeze(-1)
        adversarial = F.binary_cross_entropy_with_logits(
            judged, torch.full_like(judged, SOURCE_LABEL)
        )
        loss = self.config.adversarial_weight * adversarial
        logs = {"adversarial": adversarial.detach()}
        if self.kd_weight > 0:
            with torch.no_grad():
                teacher = source.head()(source_features).float()
            student = self.target.head()(self.target.embed(source_inputs)).float()
            distill = kdk.kd_loss(
                student,
                teacher,
                temperature=self.config.temperature,
                kind="kl",
                backend=self.config.loss_backend,
            )
            loss = loss + self.kd_weight * distill
            logs["kd"] = distill.detach()
        return loss, logs


class AAD:
    """The run's data, tokenizer and stage helpers."""

    def __init__(self, config: AADConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        self.source = load_task(config, config.source, target="label", name="sentiment")
        if config.target_labels:
            self.target = load_task(config, config.target, target="label", name="sentiment")
        else:
            self.target = unlabelled_task(config, self.source.head)
        if config.target_labels and self.source.train.label_names != self.target.train.label_names:
            raise ConfigError(
                f"source labels {self.source.train.label_names} differ from target labels "
                f"{self.target.train.label_names}"
            )
        self.head = self.source.head

    def encode(self, examples) -> dict:
        return encode(self.tokenizer, examples, self.config.max_length, self.runtime.device)

    def fresh_model(self) -> SequenceModel:
        return build_model(
            self.config.model,
            [self.head],
            vocab_size=len(self.tokenizer),
            pooling=self.config.pooling,
            scores=False,
            seed=self.config.seed,
        )

    def supervised(self, name: str, model: SequenceModel, task: Task, epochs: float, lr: float):
        return fine_tune(self.runtime, name, model, task, self.tokenizer, epochs, lr)

    def adaptation_plan(self, epoch: int) -> list[tuple[str, list[int], list[int]]]:
        """One epoch over the target batches; each pairs with a source batch (source order
        cycles) and gives two optimizer steps: D, then E_t."""
        config = self.config
        target = shuffled_batches(len(self.target.train), config.batch_size, config.seed, epoch)
        source = shuffled_batches(len(self.source.train), config.batch_size, config.seed + 1, epoch)
        plan = []
        for i, target_batch in enumerate(target):
            source_batch = source[i % len(source)]
            plan.append(("discriminator", source_batch, target_batch))
            plan.append(("encoder", source_batch, target_batch))
        return plan

    def adapt(self, name: str, source_model: SequenceModel, kd_weight: float) -> SequenceModel:
        config = self.config
        adaptation = Adaptation(source_model, config, kd_weight)

        def loss_fn(model, batch):
            kind, source_batch, target_batch = batch
            source_inputs = self.encode([self.source.train[i] for i in source_batch])
            target_inputs = self.encode([self.target.train[i] for i in target_batch])
            return model(kind, source_inputs, target_inputs)

        run_stage(
            self.runtime,
            Stage(name, config.adapt_epochs, config.adapt_lr),
            adaptation,
            loss_fn,
            self.adaptation_plan,
            examples_in=lambda batch: len(batch[1]) + len(batch[2]),
        )
        return adaptation.target

    def accuracy(self, model: SequenceModel, task: Task) -> dict[str, float]:
        return task_metrics(model, self.tokenizer, task, self.runtime)


def unlabelled_task(config: AADConfig, head) -> Task:
    """A target with text only: all of it trains E_t and D; nothing is scored on it."""
    data = load_unlabeled(config, config.target, config.max_train)
    return Task(head, data, TextDataset(data.name, []))


def run(config: AADConfig, runtime: Runtime) -> tuple[dict, str]:
    method = AAD(config, runtime)
    for role, task in (("source", method.source), ("target", method.target)):
        runtime.log(f"{role} {task.train.name}: {len(task.train)} train / {len(task.eval)} eval")
    source_model = method.fresh_model()
    method.supervised("source", source_model, method.source, config.source_epochs, config.source_lr)
    results = {
        "source_in_domain": method.accuracy(source_model, method.source),
    }
    scored = config.target_labels
    if scored:
        results["source_only"] = method.accuracy(source_model, method.target)
        runtime.log(f"source only on target: {results['source_only']}")
    adapted = method.adapt("adapt", source_model, config.kd_weight)
    if scored:
        results["aad"] = method.accuracy(adapted, method.target)
        runtime.log(f"AAD on target: {results['aad']}")
    if config.ablation and scored:
        adversarial_only = method.adapt("adapt_no_kd", source_model, 0.0)
        results["adversarial_only"] = method.accuracy(adversarial_only, method.target)
    if config.ceiling and scored:
        ceiling = method.fresh_model()
        method.supervised(
            "target_supervised", ceiling, method.target, config.source_epochs, config.source_lr
        )
        results["target_supervised"] = method.accuracy(ceiling, method.target)
    if runtime.is_main:
        adapted.save(runtime.output_dir / "target_model", method.tokenizer)
    order = ("source_in_domain", "source_only", "aad", "adversarial_only", "target_supervised")
    rows = [[name, *results[name].values()] for name in order if name in results]
    header = [f"{config.source} -> {config.target}", *results["source_in_domain"]]
    table = markdown_table(header, rows)
    summary = {
        "source": config.source,
        "target": config.target,
        "examples": {
            "source_train": len(method.source.train),
            "target_train": len(method.target.train),
            "target_eval": len(method.target.eval),
        },
        "loss_backend": config.loss_backend,
        **results,
    }
    return summary, table
