"""MT-DNN-KD (Liu et al., 2019, "Improving Multi-Task Deep Neural Networks via Knowledge
Distillation for Natural Language Understanding").

Stages (each resumable under ``stages/``):
    teacher_0 .. teacher_{K-1}  multi-task models (shared encoder, one head per task) trained
                                on hard labels, each with its own seed and dropout rate;
    soft targets                every teacher's outputs on every distilled task's training set,
                                computed once and cached in ``soft_targets.pt``;
    student_alone               the multi-task student on hard labels (the baseline);
    student_kd                  the student on soft targets plus hard labels.

``teachers`` gives each teacher its own encoder (``minilm,minilm,mpnet``: a cross-model
ensemble) and ``teacher_heads`` its own head mode; each teacher reads the text with its own
tokenizer, since only its outputs reach the student. The student starts from ``teacher`` (as
loaded) and uses that tokenizer.

``teacher_head=linear``: a teacher is its frozen encoder with one head per task fitted on the
pooled outputs (:mod:`kd_trainers.linear_head`), no multi-task training; teachers that load
the same pretrained encoder then share their heads too (the fit is deterministic). A linear
teacher's outputs are its head applied to those pooled vectors, so its encoder runs once per
example and split, however many teachers share it. ``teacher_cache`` keeps the pooled vectors
of linear teachers and the outputs of fine-tuned ones on disk (:mod:`kd_trainers.teacher_cache`).

Mini-batches hold one task each; every epoch lists all tasks' batches and shuffles them, so
a task is drawn in proportion to its size (MT-DNN's sampling). For a classification task
with a teacher the loss is ``kd_loss(kind="soft_ce")`` against the ensemble: the K teachers'
cached logits in the (K, B, C) form (probabilities averaged inside the kernel) or, with
``kd_form=cached``, the log of the averaged probabilities, plus ``hard_weight`` x CE. A
regression task uses MSE to the teachers' mean score plus ``hard_weight`` x MSE to the gold.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

import kd_kernels as kdk
from kd_trainers.config import DistillConfig
from kd_trainers.errors import ConfigError
from kd_trainers.evaluation import predict, score
from kd_trainers.linear_head import TEACHER_HEADS, fit_linear_head, pooled_features
from kd_trainers.models import (
    SequenceModel,
    build_model,
    encode,
    load_encoder,
    load_tokenizer,
    make_student,
    tiny_shape,
)
from kd_trainers.report import markdown_table
from kd_trainers.tasks import Task, head_name, labels_of, load_task, supervised_loss
from kd_trainers.teacher_cache import cache_key, open_teacher_cache
from kd_trainers.trainer import Runtime, Stage, atomic_save, run_stage, shuffled_batches

DESCRIPTION = "MT-DNN-KD: multi-task student distilled from an ensemble of multi-task teachers"
KD_FORMS = ("ensemble", "cached")


@dataclass
class MTDNNKDConfig(DistillConfig):
    HELP: ClassVar[dict[str, str]] = {
        "tasks": "comma-separated SPEC[=label|score]: built-in names or files, e.g. "
        "rotten_tomatoes,vader:movie=score,bbc",
        "teacher_tasks": "tasks with a teacher (default: all); the rest use hard labels only",
        "teacher": "encoder the student starts from, and of every teacher unless teachers is "
        "set: minilm, mpnet, a directory or tiny[:LxH]",
        "teachers": "encoder of each teacher, cycled to num_teachers (e.g. minilm,minilm,mpnet; "
        "each uses its own tokenizer); default: teacher",
        "teacher_heads": "finetune or linear for each teacher, cycled to num_teachers; default: "
        "teacher_head",
        "num_teachers": "K, the size of the teacher ensemble",
        "teacher_dropouts": "dropout of each teacher (cycled when shorter than K)",
        "kd_form": "ensemble: (K, B, C) teacher logits into kd_loss; cached: log mean probs",
        "hard_weight": "weight of the gold-label loss next to the soft one",
    }
    max_train: int = 1500
    max_eval: int = 500
    tasks: list[str] = field(
        default_factory=lambda: ["rotten_tomatoes", "vader:movie=score", "bbc"]
    )
    teacher_tasks: list[str] | None = None
    teachers: list[str] | None = None
    teacher_heads: list[str] | None = None
    num_teachers: int = 2
    teacher_dropouts: list[float] = field(default_factory=lambda: [0.1, 0.2])
    hard_weight: float = 1.0
    soft_weight: float = 1.0
    kd_form: str = "ensemble"

    def validate(self) -> None:
        super().validate()
        if not self.tasks:
            raise ConfigError("tasks is empty: name at least one dataset")
        if self.num_teachers < 1:
            raise ConfigError(f"num_teachers must be >= 1, got {self.num_teachers}")
        if self.kd_form not in KD_FORMS:
            raise ConfigError(f"kd_form must be one of {', '.join(KD_FORMS)}")
        if any(not 0.0 <= p < 1.0 for p in self.teacher_dropouts) or not self.teacher_dropouts:
            raise ConfigError("teacher_dropouts must be values in [0, 1)")
        if self.teachers is not None and not self.teachers:
            raise ConfigError("teachers is empty: name an encoder per teacher or leave it unset")
        if self.teacher_heads is not None:
            bad = [h for h in self.teacher_heads if h not in TEACHER_HEADS]
            if bad or not self.teacher_heads:
                raise ConfigError(
                    f"teacher_heads must list {' or '.join(TEACHER_HEADS)} per teacher, "
                    f"got {self.teacher_heads}"
                )
        unknown = set(self.teacher_tasks or []) - {task_spec(t)[0] for t in self.tasks}
        if unknown:
            raise ConfigError(f"teacher_tasks names tasks not in tasks: {sorted(unknown)}")


CONFIG = MTDNNKDConfig


def task_spec(text: str) -> tuple[str, str]:
    """``SPEC[=label|score]`` -> (spec, target)."""
    spec, _, target = text.partition("=")
    return spec, target or "label"


def cycled(values: list, count: int) -> list:
    """``values`` repeated to ``count`` entries (``[a, b], 3`` -> ``[a, b, a]``)."""
    return [values[k % len(values)] for k in range(count)]


def set_dropout(model: nn.Module, rate: float) -> None:
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = rate


class MultiTask:
    """The run's tasks, tokenizer and batch plan; the stages are the functions below."""

    def __init__(self, config: MTDNNKDConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.tokenizer = load_tokenizer(config.teacher, config.tokenizer)
        self.tasks: list[Task] = []
        for text in config.tasks:
            spec, target = task_spec(text)
            self.tasks.append(load_task(config, spec, target=target, name=head_name(spec)))
        distilled = config.teacher_tasks or [task_spec(t)[0] for t in config.tasks]
        self.distilled = {head_name(spec) for spec in distilled}
        self.heads = [task.head for task in self.tasks]
        count = config.num_teachers
        self.teacher_names = cycled(config.teachers or [config.teacher], count)
        self.teacher_modes = cycled(config.teacher_heads or [config.teacher_head], count)
        self.tokenizers = {config.teacher: self.tokenizer}
        for name in self.teacher_names:
            if name not in self.tokenizers:
                self.tokenizers[name] = load_tokenizer(name, config.tokenizer)
        self.disk = open_teacher_cache(config, runtime.log)
        self.pooled: dict[tuple[str, str, str], torch.Tensor] = {}

    def plan(self, seed: int):
        """``plan(epoch)``: every task's seeded batches, shuffled together: [(task, indices)]."""

        def batches(epoch: int) -> list[tuple[int, list[int]]]:
            listed = []
            for number, task in enumerate(self.tasks):
                cut = shuffled_batches(
                    len(task.train), self.config.batch_size, seed + 7919 * number, epoch
                )
                listed += [(number, batch) for batch in cut]
            random.Random(seed * 1_000_003 + epoch).shuffle(listed)
            return listed

        return batches

    def encode(self, examples) -> dict:
        return encode(self.tokenizer, examples, self.config.max_length, self.runtime.device)

    def hard_loss(self, model, batch) -> tuple[torch.Tensor, dict]:
        number, indices = batch
        task = self.tasks[number]
        examples = [task.train[i] for i in indices]
        logits, _ = model(self.encode(examples), task=task.head.name)
        loss = supervised_loss(logits, examples, task.head)
        return loss, {f"loss[{task.head.name}]": loss.detach()}

    def outputs(self, model: SequenceModel, task: Task, examples, tokenizer=None) -> torch.Tensor:
        return predict(
            model,
            tokenizer or self.tokenizer,
            examples,
            task.head,
            max_length=self.config.max_length,
            batch_size=self.config.eval_batch_size,
            device=self.runtime.device,
        )

    def features(self, k: int, teacher: SequenceModel, task: Task, split: str) -> torch.Tensor:
        """Pooled vectors (N, D) fp32 of teacher ``k``'s frozen encoder on ``task``'s
        ``split`` (train / eval): computed once per encoder (teachers loading the same encoder
        share them) and kept in the disk cache keyed by the encoder's weights."""
        name = self.teacher_names[k]
        # tiny:LxH encoders are random from each teacher's own seed: not shared.
        memo = (name if tiny_shape(name) is None else f"{name}#{k}", task.head.name, split)
        if memo not in self.pooled:
            examples = getattr(task, split).examples
            tokenizer, config = self.tokenizers[name], self.config

            def compute() -> dict:
                vectors = pooled_features(
                    teacher,
                    tokenizer,
                    examples,
                    max_length=config.max_length,
                    batch_size=config.eval_batch_size,
                    device=self.runtime.device,
                )
                return {"pooled": vectors}

            if self.disk is None:
                self.pooled[memo] = compute()["pooled"]
            else:
                what = {"pooled": config.pooling}
                key = cache_key(teacher.encoder, tokenizer, config.max_length, examples, what)
                self.pooled[memo] = self.disk.get(key, compute)["pooled"]
        return self.pooled[memo]

    def teacher_outputs(
        self, k: int, teacher: SequenceModel, task: Task, split: str
    ) -> torch.Tensor:
        """Teacher ``k``'s outputs on ``task``'s ``split``, as :func:`predict` returns them: a
        linear teacher applies its head to the pooled vectors, a fine-tuned one runs (with the
        disk cache for the training split, which the student reads every epoch)."""
        if self.teacher_modes[k] == "linear":
            head = teacher.head(task.head.name)
            with torch.no_grad():
                vectors = self.features(k, teacher, task, split)
                logits = (vectors.to(head.weight) @ head.weight.T + head.bias).float().cpu()
            return logits.squeeze(-1) if task.head.kind == "regression" else logits
        tokenizer = self.tokenizers[self.teacher_names[k]]
        examples = getattr(task, split).examples
        if self.disk is None or split != "train":
            return self.outputs(teacher, task, examples, tokenizer)
        what = {"logits": task.head.name}
        key = cache_key(teacher, tokenizer, self.config.max_length, examples, what)
        compute = lambda: {"logits": self.outputs(teacher, task, examples, tokenizer)}  # noqa: E731
        return self.disk.get(key, compute)["logits"]

    def train(self, name: str, model, epochs: float, lr: float, loss_fn, seed: int):
        return run_stage(
            self.runtime,
            Stage(name, epochs, lr),
            model,
            loss_fn,
            self.plan(seed),
            examples_in=lambda batch: len(batch[1]),
        )


def soft_targets(method: MultiTask, teachers: list[SequenceModel]) -> dict[str, torch.Tensor]:
    """Per distilled task, the teachers' outputs on its training set: (K, N, C) logits or
    (K, N) scores; computed once, cached in ``soft_targets.pt``."""
    path = method.runtime.output_dir / "soft_targets.pt"
    if method.config.resume and path.is_file():
        return torch.load(path)
    cached = {}
    for task in method.tasks:
        if task.head.name in method.distilled:
            cached[task.head.name] = torch.stack(
                [method.teacher_outputs(k, t, task, "train") for k, t in enumerate(teachers)]
            )
    if method.runtime.is_main:
        atomic_save(cached, path)
    return cached


def distill_loss(method: MultiTask, targets: dict[str, torch.Tensor], model, batch):
    """Soft (ensemble) loss plus ``hard_weight`` x gold loss on one task's batch."""
    config = method.config
    number, indices = batch
    task = method.tasks[number]
    examples = [task.train[i] for i in indices]
    logits, _ = model(method.encode(examples), task=task.head.name)
    logged = f"loss[{task.head.name}]"
    if task.head.name not in targets:
        loss = supervised_loss(logits, examples, task.head)
        return loss, {logged: loss.detach()}
    teacher = targets[task.head.name][:, indices].to(logits.device)
    if task.head.kind == "regression":
        soft = nn.functional.mse_loss(logits.squeeze(-1), teacher.mean(0))
        hard = supervised_loss(logits, examples, task.head)
        loss = config.soft_weight * soft + config.hard_weight * hard
        return loss, {logged: loss.detach()}
    if config.kd_form == "cached":
        # log of the averaged probabilities: softmax of it at t = 1 is the ensemble's p_T.
        teacher = torch.logsumexp(teacher.log_softmax(-1), 0) - torch.log(
            torch.tensor(float(teacher.shape[0]))
        )
    labels = labels_of(examples, logits.device)
    loss = kdk.kd_loss(
        logits,
        teacher,
        temperature=config.temperature,
        kind="soft_ce",
        labels=labels,
        hard_weight=config.hard_weight,
        soft_weight=config.soft_weight,
        backend=config.loss_backend,
    )
    return loss, {logged: loss.detach()}


def ensemble_metrics(method: MultiTask, teachers: list[SequenceModel]) -> dict[str, dict]:
    """Eval metrics of each teacher and of their ensemble (mean probabilities / scores)."""
    results: dict[str, dict] = {f"teacher_{k}": {} for k in range(len(teachers))}
    results["ensemble"] = {}
    for task in method.tasks:
        outputs = torch.stack(
            [method.teacher_outputs(k, t, task, "eval") for k, t in enumerate(teachers)]
        )
        for k in range(len(teachers)):
            results[f"teacher_{k}"][task.head.name] = score(task.head, outputs[k], task.eval)
        combined = (
            outputs.mean(0) if task.head.kind == "regression" else outputs.softmax(-1).mean(0)
        )
        results["ensemble"][task.head.name] = score(task.head, combined, task.eval)
    return results


def run(config: MTDNNKDConfig, runtime: Runtime) -> tuple[dict, str]:
    method = MultiTask(config, runtime)
    for task in method.tasks:
        runtime.log(f"task {task.head}: {len(task.train)} train / {len(task.eval)} eval")
    vocab = len(method.tokenizer)
    teachers, start = [], None
    for k, name in enumerate(method.teacher_names):
        seed = config.seed + 101 * k
        tokenizer = method.tokenizers[name]
        teacher = build_model(
            name,
            method.heads,
            vocab_size=len(tokenizer),
            pooling=config.pooling,
            scores=False,
            seed=seed,
        )
        if start is None and name == config.teacher:
            # Students start from the teacher as loaded, before multi-task training.
            start = copy.deepcopy(teacher.encoder)
        set_dropout(teacher, config.teacher_dropouts[k % len(config.teacher_dropouts)])
        if method.teacher_modes[k] == "linear":
            started = time.perf_counter()
            teacher.to(runtime.device)
            for task in method.tasks:
                fit_linear_head(
                    teacher,
                    task.head,
                    tokenizer,
                    task.train.examples,
                    features=method.features(k, teacher, task, "train"),
                    l2=config.linear_head_l2,
                    max_length=config.max_length,
                    batch_size=config.eval_batch_size,
                    device=runtime.device,
                )
            runtime.log(
                f"teacher_{k}: linear heads fitted in {time.perf_counter() - started:.1f} s"
            )
        else:
            method.train(
                f"teacher_{k}",
                teacher,
                config.teacher_epochs,
                config.teacher_lr,
                method.hard_loss,
                seed,
            )
        teachers.append(teacher.eval())
        runtime.log(f"teacher_{k}: {name}, {method.teacher_modes[k]} head")
    if start is None:
        start = load_encoder(config.teacher, vocab_size=vocab, scores=False, seed=config.seed)
    results = ensemble_metrics(method, teachers)
    targets = soft_targets(method, teachers)

    def student() -> SequenceModel:
        encoder = make_student(
            start,
            config.student,
            config.student_keep_every,
            vocab_size=vocab,
            scores=False,
            seed=config.seed + 1,
        )
        with torch.random.fork_rng():
            torch.manual_seed(config.seed + 2)
            return SequenceModel(encoder, method.heads, config.pooling)

    def evaluate(model) -> dict:
        return {
            task.head.name: score(
                task.head, method.outputs(model, task, task.eval.examples), task.eval
            )
            for task in method.tasks
        }

    if config.baseline:
        alone = student()
        method.train(
            "student_alone",
            alone,
            config.student_epochs,
            config.student_lr,
            method.hard_loss,
            config.seed,
        )
        results["student_alone"] = evaluate(alone)
    distilled = student()
    method.train(
        "student_kd",
        distilled,
        config.student_epochs,
        config.student_lr,
        lambda model, batch: distill_loss(method, targets, model, batch),
        config.seed,
    )
    results["student_kd"] = evaluate(distilled)
    if runtime.is_main:
        distilled.save(runtime.output_dir / "student", method.tokenizer)
    rows, header = [], ["model"]
    for task in method.tasks:
        metric = "accuracy" if task.head.kind == "classification" else "spearman"
        header.append(f"{task.head.name} {metric}")
    for name, per_task in results.items():
        row = [name]
        for task in method.tasks:
            metric = "accuracy" if task.head.kind == "classification" else "spearman"
            row.append(per_task[task.head.name][metric])
        rows.append(row)
    summary = {
        "tasks": {t.head.name: {"train": len(t.train), "eval": len(t.eval)} for t in method.tasks},
        "distilled_tasks": sorted(method.distilled),
        "loss_backend": config.loss_backend,
        "teachers": [
            {"encoder": name, "head": mode}
            for name, mode in zip(method.teacher_names, method.teacher_modes, strict=True)
        ],
        **results,
    }
    return summary, markdown_table(header, rows)
