"""MT-DNN-KD (Liu et al., 2019, "Improving Multi-Task Deep Neural Networks via Knowledge
Distillation for Natural Language Understanding").

Stages (each resumable under ``stages/``):
    teacher_0 .. teacher_{K-1}  multi-task models (shared encoder, one head per task) trained
                                on hard labels, each with its own seed and dropout rate;
    soft targets                every teacher's outputs on every distilled task's training set,
                                computed once and cached in ``soft_targets.pt``;
    student_alone               the multi-task student on hard labels (the baseline);
    student_kd                  the student on soft targets plus hard labels.

``teacher_head=linear``: each teacher is its frozen encoder with one head per task fitted
on the pooled outputs (:mod:`kd_trainers.linear_head`), no multi-task training; teachers that
load the same pretrained encoder then share their heads too (the fit is deterministic).
``teacher_cache`` keeps each teacher's outputs per task on disk
(:mod:`kd_trainers.teacher_cache`).

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
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

import kd_kernels as kdk
from kd_trainers.config import DistillConfig
from kd_trainers.data import default_cache_dir
from kd_trainers.errors import ConfigError
from kd_trainers.evaluation import predict, score
from kd_trainers.linear_head import fit_linear_head
from kd_trainers.models import (
    SequenceModel,
    build_model,
    encode,
    load_tokenizer,
    make_student,
)
from kd_trainers.report import markdown_table
from kd_trainers.tasks import Task, cache_of, head_name, labels_of, load_task, supervised_loss
from kd_trainers.teacher_cache import TeacherCache, cache_key
from kd_trainers.trainer import Runtime, Stage, atomic_save, run_stage, shuffled_batches

DESCRIPTION = "MT-DNN-KD: multi-task student distilled from an ensemble of multi-task teachers"
KD_FORMS = ("ensemble", "cached")


@dataclass
class MTDNNKDConfig(DistillConfig):
    HELP: ClassVar[dict[str, str]] = {
        "tasks": "comma-separated SPEC[=label|score]: built-in names or files, e.g. "
        "rotten_tomatoes,vader:movie=score,bbc",
        "teacher_tasks": "tasks with a teacher (default: all); the rest use hard labels only",
        "teacher": "encoder of every teacher: minilm, a directory or tiny[:LxH]",
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
        unknown = set(self.teacher_tasks or []) - {task_spec(t)[0] for t in self.tasks}
        if unknown:
            raise ConfigError(f"teacher_tasks names tasks not in tasks: {sorted(unknown)}")


CONFIG = MTDNNKDConfig


def task_spec(text: str) -> tuple[str, str]:
    """``SPEC[=label|score]`` -> (spec, target)."""
    spec, _, target = text.partition("=")
    return spec, target or "label"


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

    def outputs(self, model: SequenceModel, task: Task, examples) -> torch.Tensor:
        return predict(
            model,
            self.tokenizer,
            examples,
            task.head,
            max_length=self.config.max_length,
            batch_size=self.config.eval_batch_size,
            device=self.runtime.device,
        )

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
    config, disk = method.config, None
    if config.teacher_cache is not None:
        folder = Path(config.teacher_cache).expanduser()
        if config.teacher_cache == "auto":
            folder = (cache_of(config) or default_cache_dir()) / "teacher_outputs"
        disk = TeacherCache(folder, config.teacher_cache_mb, method.runtime.log)

    def outputs(teacher: SequenceModel, task: Task) -> torch.Tensor:
        examples = task.train.examples
        if disk is None:
            return method.outputs(teacher, task, examples)
        what = {"logits": task.head.name}
        key = cache_key(teacher, method.tokenizer, config.max_length, examples, what)
        return disk.get(key, lambda: {"logits": method.outputs(teacher, task, examples)})["logits"]

    cached = {}
    for task in method.tasks:
        if task.head.name in method.distilled:
            cached[task.head.name] = torch.stack([outputs(t, task) for t in teachers])
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
        outputs = torch.stack([method.outputs(t, task, task.eval.examples) for t in teachers])
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
    teachers = []
    for k in range(config.num_teachers):
        seed = config.seed + 101 * k
        teacher = build_model(
            config.teacher,
            method.heads,
            vocab_size=vocab,
            pooling=config.pooling,
            scores=False,
            seed=seed,
        )
        if k == 0:
            # Students start from the teacher as loaded, before multi-task training.
            start = copy.deepcopy(teacher.encoder)
        set_dropout(teacher, config.teacher_dropouts[k % len(config.teacher_dropouts)])
        if config.teacher_head == "linear":
            started = time.perf_counter()
            teacher.to(runtime.device)
            for task in method.tasks:
                fit_linear_head(
                    teacher,
                    task.head,
                    method.tokenizer,
                    task.train.examples,
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
        **results,
    }
    return summary, markdown_table(header, rows)
