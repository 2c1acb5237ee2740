"""TinyBERT (Jiao et al., 2020): general and task-specific transformer distillation.

Stages (each a folder under ``stages/``, resumable):
    general       optional (``general_data``): intermediate-layer distillation from the
                  pre-trained teacher on unlabeled text;
    teacher       fine-tune the teacher on the task (skipped for a saved fine-tuned teacher);
    student_alone the student fine-tuned on the labels only (the baseline);
    intermediate  stage 1 on augmented task data: attention-score MSE + hidden-state MSE
                  (embeddings included, through a learned projection when widths differ);
    prediction    stage 2 on augmented task data: ``kd_loss(kind="soft_ce")`` at a
                  temperature against the fine-tuned teacher's logits.

``teacher_head=linear`` replaces the teacher's fine-tuning by a head fitted on its frozen
pooled outputs (:mod:`kd_trainers.linear_head`). With ``teacher_cache`` the teacher's logits
(stage 2) and mapped layer outputs (stage 1, when within ``teacher_cache_mb``) are computed
once per example and read from disk (:mod:`kd_trainers.teacher_cache`). A teacher and student
with different tokenizers (``mpnet`` into a MiniLM student) are tokenized separately and, for
stage 1, checked to hold the same wordpieces at the same positions (:class:`TokenAligner`).

Losses, with g the layer map (``layer_map``), A attention scores, H hidden states, W_h the
projection: L_attn = sum_m MSE(A^S_m, A^T_g(m)) over unpadded query/key pairs, entries
<= threshold (-100: the -inf of padding) zeroed; L_hidn = sum_m MSE(H^S_m W_h, H^T_g(m)).
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from transformers import BertForMaskedLM

import kd_kernels as kdk
from kd_trainers.augment import WordAugmenter, augment_dataset
from kd_trainers.config import DistillConfig
from kd_trainers.errors import ConfigError
from kd_trainers.evaluation import predict
from kd_trainers.linear_head import fit_linear_head
from kd_trainers.models import (
    Head,
    SequenceModel,
    TokenAligner,
    build_model,
    load_tokenizer,
    make_student,
    resolve_model_dir,
    saved_heads,
)
from kd_trainers.report import markdown_table
from kd_trainers.tasks import (
    Task,
    batch_plan,
    fine_tune,
    labels_of,
    load_task,
    load_unlabeled,
    task_metrics,
)
from kd_trainers.teacher_cache import (
    LayerTargets,
    cache_key,
    compute_layers,
    layer_bytes,
    open_teacher_cache,
)
from kd_trainers.trainer import Runtime, Stage, run_stage

DESCRIPTION = "TinyBERT: general + task distillation (attention/hidden MSE, then soft CE)"


@dataclass
class TinyBERTConfig(DistillConfig):
    HELP: ClassVar[dict[str, str]] = {
        "mode": "task (teacher, baseline, stage 1 + 2) or general (general distillation only)",
        "task": "labelled data: a built-in name (kd-train data list) or a file/folder",
        "eval_data": "separate evaluation data (default: a held-out split of task)",
        "target": "label (classification) or score (regression)",
        "teacher": "minilm, mpnet (after kd-train data fetch mpnet), a local HF directory (a "
        "saved fine-tuned teacher skips tuning) or tiny[:LxH]",
        "layer_mapping": "uniform, top, bottom or explicit teacher layers, e.g. 1,3,5",
        "hidden_projection": "learn W_h when student and teacher widths differ",
        "attention_threshold": "attention scores <= this count as 0 (TinyBERT: -100)",
        "general_data": "unlabeled text for general distillation (e.g. wiki_sentences)",
        "augment_copies": "augmented copies per training example for stages 1 and 2",
        "augment_mlm": "a BertForMaskedLM directory whose predictions replace single-piece words",
    }
    output_dir: str = "runs/{method}"
    group_by_length: bool = True
    # The main job: 2,000 examples with 2 augmented copies each is what stages 1 and 2 need
    # to beat the student trained alone (1,000 x 1 lost by 1.2 points), and it ends in about
    # 10 minutes on a 2-core CPU. Raise both for a full run.
    max_train: int = 2000
    max_eval: int = 1000
    mode: str = "task"
    task: str = "rotten_tomatoes"
    eval_data: str | None = None
    target: str = "label"
    layer_mapping: str = "uniform"
    hidden_projection: bool = True
    attention_threshold: float = -100.0
    attention_weight: float = 1.0
    hidden_weight: float = 1.0
    hard_weight: float = 0.0
    general_data: str | None = None
    general_max: int = 5000
    general_epochs: float = 1.0
    general_lr: float = 1e-4
    intermediate_epochs: float = 1.0
    intermediate_lr: float = 1e-4
    prediction_epochs: float = 2.0
    prediction_lr: float = 5e-5
    augment_copies: int = 2
    augment_prob: float = 0.4
    augment_candidates: int = 15
    augment_mlm: str | None = None

    def validate(self) -> None:
        super().validate()
        if self.mode not in ("task", "general"):
            raise ConfigError(f"mode must be task or general, got {self.mode!r}")
        if self.mode == "general" and not self.general_data:
            raise ConfigError("mode=general needs general_data (e.g. wiki_sentences)")
        if self.augment_copies < 0:
            raise ConfigError(f"augment_copies must be >= 0, got {self.augment_copies}")


CONFIG = TinyBERTConfig


def parse_mapping(text: str) -> str | list[int]:
    if text in ("uniform", "top", "bottom"):
        return text
    try:
        return [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(
            f"layer_mapping: uniform, top, bottom or ints like 1,3,5; got {text!r}"
        ) from None


class DistillStudent(nn.Module):
    """The student plus TinyBERT's W_h (student width -> teacher width), trained together.

    ``forward`` returns (logits, student encoder outputs, projected hidden states list)."""

    def __init__(self, student: SequenceModel, teacher_width: int, project: bool):
        super().__init__()
        self.student = student
        width = student.encoder.config.hidden_size
        self.projection = nn.Linear(width, teacher_width) if project else None

    def forward(self, inputs: dict):
        logits, outputs = self.student(inputs, output_layers=True)
        hidden = list(outputs.hidden_states)
        if self.projection is not None:
            hidden = [self.projection(h) for h in hidden]
        return logits, outputs, hidden


def check_compatible(config: TinyBERTConfig, student: SequenceModel, teacher: SequenceModel):
    """One-line errors for a student the layer losses cannot compare with the teacher."""
    s_config, t_config = student.encoder.config, teacher.encoder.config
    if s_config.hidden_size != t_config.hidden_size and not config.hidden_projection:
        raise ConfigError(
            f"student width {s_config.hidden_size} != teacher width {t_config.hidden_size}: "
            "set hidden_projection=true (TinyBERT's W_h) or hidden_weight=0"
        )
    if config.attention_weight > 0 and s_config.num_attention_heads != t_config.num_attention_heads:
        raise ConfigError(
            f"student has {s_config.num_attention_heads} heads, teacher "
            f"{t_config.num_attention_heads}: attention maps differ; set attention_weight=0"
        )
    try:
        return kdk.layer_map(
            s_config.num_hidden_layers,
            t_config.num_hidden_layers,
            parse_mapping(config.layer_mapping),
        )
    except ValueError as error:
        raise ConfigError(f"layer_mapping {config.layer_mapping!r}: {error}") from None


class TinyBERT:
    """Holds the run's models and data; each method below is one stage."""

    def __init__(self, config: TinyBERTConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.tokenizer = load_tokenizer(config.teacher, config.tokenizer)
        self.vocab_size = len(self.tokenizer)
        student = config.teacher if config.student == "teacher" else config.student
        self.student_tokenizer = load_tokenizer(student, config.tokenizer)
        self.aligner = TokenAligner(self.tokenizer, self.student_tokenizer)
        self.cache = open_teacher_cache(config, runtime.log)

    def model(self, name: str, task: Task | None, seed_offset: int) -> SequenceModel:
        # General distillation has no task: a 1-output head that no loss touches.
        heads = [task.head] if task else [Head("none", 1, "regression")]
        return build_model(
            name,
            heads,
            vocab_size=self.vocab_size,
            pooling=self.config.pooling,
            scores=True,
            seed=self.config.seed + seed_offset,
        )

    def encode(self, examples, aligned: bool) -> tuple[dict, dict]:
        """(teacher inputs, student inputs); ``aligned``: same wordpiece at each position."""
        return self.aligner.encode(examples, self.config.max_length, self.runtime.device, aligned)

    def plan(self, dataset):
        return batch_plan(dataset.examples, self.config, self.config.seed)

    def layer_losses(
        self, model, teacher, examples, mapping, indices=None, targets: LayerTargets | None = None
    ) -> tuple[torch.Tensor, dict]:
        """TinyBERT stage 1 / general distillation loss on one batch; the teacher's layers come
        from ``targets`` (cached, rows ``indices``) when given."""
        config = self.config
        t_inputs, inputs = self.encode(examples, aligned=True)
        mask = inputs["attention_mask"]
        if targets is not None:
            t_hidden, t_attention = targets.batch(indices, t_inputs["attention_mask"])
        else:
            with torch.no_grad():
                _, t_out = teacher(t_inputs, output_layers=True)
            t_hidden = [t_out.hidden_states[i] for i in mapping.hidden]
            t_attention = [t_out.attentions[i] for i in mapping.attention]
        _, s_out, s_hidden = model(inputs)
        attention = kdk.attention_mse_loss(
            list(s_out.attentions),
            t_attention,
            attention_mask=mask,
            threshold=config.attention_threshold,
            backend=config.loss_backend,
        )
        hidden = kdk.hidden_mse_loss(
            s_hidden,
            t_hidden,
            attention_mask=mask,
            backend=config.loss_backend,
        )
        loss = config.attention_weight * attention + config.hidden_weight * hidden
        return loss, {"attention_mse": attention.detach(), "hidden_mse": hidden.detach()}

    def prediction_loss(
        self, model, teacher, examples, head, cached: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict]:
        """TinyBERT stage 2: soft cross-entropy against the teacher's logits at temperature t
        (MSE against the teacher's score for a regression head); ``cached``: the teacher's
        logits of these examples (B, C), read from the cache."""
        config = self.config
        t_inputs, inputs = self.encode(examples, aligned=False)
        if cached is not None:
            t_logits = cached.to(self.runtime.device)
        else:
            with torch.no_grad():
                t_logits, _ = teacher(t_inputs)
        s_logits, _ = model(inputs)
        if head.kind == "regression":
            loss = nn.functional.mse_loss(s_logits, t_logits.float())
            return loss, {}
        labels = labels_of(examples, s_logits.device) if config.hard_weight > 0 else None
        loss = kdk.kd_loss(
            s_logits,
            t_logits.float(),
            temperature=config.temperature,
            kind="soft_ce",
            labels=labels,
            hard_weight=config.hard_weight,
            backend=config.loss_backend,
        )
        return loss, {}

    def initial_student(self, teacher: SequenceModel) -> SequenceModel:
        """The student before any training: teacher layers kept every k, or a named model."""
        config = self.config
        encoder = make_student(
            teacher.encoder,
            config.student,
            config.student_keep_every,
            vocab_size=len(self.student_tokenizer),
            scores=True,
            seed=config.seed + 1,
        )
        return SequenceModel(encoder, list(teacher.head_specs.values()), config.pooling)

    def with_head(self, student: SequenceModel, task: Task) -> SequenceModel:
        """A copy of ``student``'s encoder with a fresh head for ``task`` (seeded)."""
        with torch.random.fork_rng():
            torch.manual_seed(self.config.seed + 2)
            return SequenceModel(copy.deepcopy(student.encoder), [task.head], self.config.pooling)

    def distill_layers(self, name, student, teacher, dataset, epochs, lr):
        """Stage 1 (or general distillation); returns (student with W_h, StageResult)."""
        mapping = check_compatible(self.config, student, teacher)
        width = teacher.encoder.config.hidden_size
        project = student.encoder.config.hidden_size != width
        wrapped = DistillStudent(student, width, project)
        teacher.to(self.runtime.device).eval()
        targets = self.cached_layers(teacher, dataset, mapping)
        result = run_stage(
            self.runtime,
            Stage(name, epochs, lr),
            wrapped,
            lambda model, batch: self.layer_losses(
                model, teacher, [dataset[i] for i in batch], mapping, batch, targets
            ),
            self.plan(dataset),
        )
        return wrapped, result

    def cached_layers(self, teacher: SequenceModel, dataset, mapping) -> LayerTargets | None:
        """The teacher's mapped layer outputs on ``dataset`` from the cache (computed once),
        or None when the cache is off or they exceed ``teacher_cache_mb``."""
        if self.cache is None:
            return None
        config, examples = self.config, dataset.examples
        hidden, attention = sorted(set(mapping.hidden)), sorted(set(mapping.attention))
        texts = [e.text for e in examples]
        pairs = [e.text_pair for e in examples]
        lengths = self.tokenizer(
            texts,
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=config.max_length,
        )["input_ids"]
        t_config = teacher.encoder.config
        size = layer_bytes(
            [len(ids) for ids in lengths],
            len(hidden),
            len(attention),
            t_config.hidden_size,
            t_config.num_attention_heads,
        )
        if size > config.teacher_cache_mb * 2**20:
            self.runtime.log(
                f"teacher layer outputs need {size / 2**20:.0f} MB > teacher_cache_mb="
                f"{config.teacher_cache_mb:g}: the teacher runs every step"
            )
            return None
        what = {"layers": {"hidden": hidden, "attention": attention}}
        key = cache_key(teacher, self.tokenizer, config.max_length, examples, what)

        def forward(batch):
            inputs = self.aligner.encode(batch, config.max_length, self.runtime.device, False)[0]
            return inputs, teacher(inputs, output_layers=True)[1]

        tensors = self.cache.get(
            key,
            lambda: compute_layers(forward, examples, hidden, attention, config.eval_batch_size),
        )
        # Batches list the teacher's layers in the mapping's order (a layer may repeat).
        return LayerTargets(tensors, mapping.hidden, mapping.attention)

    def cached_logits(self, teacher: SequenceModel, dataset, head: Head) -> torch.Tensor | None:
        """The teacher's (N, C) outputs on ``dataset`` from the cache (computed once)."""
        if self.cache is None:
            return None
        config, examples = self.config, dataset.examples
        key = cache_key(teacher, self.tokenizer, config.max_length, examples, {"logits": head.name})

        def compute():
            outputs = predict(
                teacher,
                self.tokenizer,
                examples,
                head,
                max_length=config.max_length,
                batch_size=config.eval_batch_size,
                device=self.runtime.device,
            )
            return {"logits": outputs.reshape(len(examples), head.num_outputs)}

        return self.cache.get(key, compute)["logits"]

    def fine_tune(self, name: str, model: SequenceModel, task: Task, epochs, lr, tokenizer=None):
        tokenizer = tokenizer or self.student_tokenizer
        return fine_tune(self.runtime, name, model, task, tokenizer, epochs, lr)

    def fit_teacher_head(self, teacher: SequenceModel, task: Task) -> dict:
        """``teacher_head=linear``: the head fitted on the frozen encoder's pooled outputs."""
        started = time.perf_counter()
        fit = fit_linear_head(
            teacher,
            task.head,
            self.tokenizer,
            task.train.examples,
            l2=self.config.linear_head_l2,
            max_length=self.config.max_length,
            batch_size=self.config.eval_batch_size,
            device=self.runtime.device,
        )
        return {"head": "linear", **fit, "seconds": round(time.perf_counter() - started, 2)}

    def evaluate(self, model: SequenceModel, task: Task, tokenizer=None) -> dict[str, float]:
        return task_metrics(model, tokenizer or self.student_tokenizer, task, self.runtime)


def teacher_is_tuned(config: TinyBERTConfig, task: Task) -> bool:
    heads = saved_heads(config.teacher)
    return heads is not None and task.head in heads


def load_mlm(name: str | None) -> nn.Module | None:
    """A masked-LM model for augmentation, or None (embedding neighbours only)."""
    if not name:
        return None
    model = BertForMaskedLM.from_pretrained(str(resolve_model_dir(name)))
    return model.eval()


def run(config: TinyBERTConfig, runtime: Runtime) -> tuple[dict, str]:
    method = TinyBERT(config, runtime)
    task = (
        None if config.mode == "general" else load_task(config, config.task, target=config.target)
    )
    teacher = method.model(config.teacher, task, 0).to(runtime.device)
    # Students start from the teacher as loaded (before any fine-tuning), as TinyBERT's start
    # from a general model; student_alone and the distilled student share that start.
    start = method.initial_student(teacher)
    check_compatible(config, start, teacher)  # fail now, not after the teacher has trained
    results: dict[str, dict] = {}
    if config.general_data:
        unlabeled = load_unlabeled(config, config.general_data, config.general_max)
        general, steps = method.distill_layers(
            "general",
            start,
            teacher,
            unlabeled,
            config.general_epochs,
            config.general_lr,
        )
        start = general.student
        results["general_training"] = {"examples": len(unlabeled), **vars(steps)}
        if runtime.is_main:
            start.save(runtime.output_dir / "general_student", method.student_tokenizer)
        if task is None:
            return results, f"general student: {runtime.output_dir / 'general_student'}"
    assert task is not None
    runtime.log(f"task {config.task}: {len(task.train)} train / {len(task.eval)} eval, {task.head}")
    if teacher_is_tuned(config, task):
        runtime.log(f"teacher {config.teacher} is already fine-tuned on {task.head.name}")
    else:
        if config.teacher_head == "linear":
            results["teacher_training"] = method.fit_teacher_head(teacher, task)
        else:
            steps = method.fine_tune(
                "teacher", teacher, task, config.teacher_epochs, config.teacher_lr, method.tokenizer
            )
            results["teacher_training"] = vars(steps)
        if runtime.is_main:
            teacher.save(runtime.output_dir / "teacher", method.tokenizer)
    results["teacher"] = method.evaluate(teacher, task, method.tokenizer)
    runtime.log(f"teacher: {results['teacher']}")

    if config.baseline:
        alone = method.with_head(start, task)
        steps = method.fine_tune(
            "student_alone", alone, task, config.student_epochs, config.student_lr
        )
        results["student_alone"] = method.evaluate(alone, task)
        results["student_alone_training"] = vars(steps)
        runtime.log(f"student alone: {results['student_alone']}")

    augmented = task.train
    if config.augment_copies > 0:
        embeddings = teacher.encoder.get_input_embeddings().weight.detach().float().cpu()
        augmenter = WordAugmenter(
            method.tokenizer,
            embeddings,
            num_candidates=config.augment_candidates,
            replace_prob=config.augment_prob,
            mlm_model=load_mlm(config.augment_mlm),
        )
        augmented = augment_dataset(task.train, augmenter, config.augment_copies, config.seed)
        runtime.log(f"augmented {len(task.train)} -> {len(augmented)} training examples")
    wrapped, intermediate = method.distill_layers(
        "intermediate",
        method.with_head(start, task),
        teacher,
        augmented,
        config.intermediate_epochs,
        config.intermediate_lr,
    )
    student, head = wrapped.student, task.head
    teacher.eval()  # stage 2's targets come from the teacher without dropout
    logits = method.cached_logits(teacher, augmented, head)
    prediction = run_stage(
        runtime,
        Stage("prediction", config.prediction_epochs, config.prediction_lr),
        student,
        lambda model, batch: method.prediction_loss(
            model,
            teacher,
            [augmented[i] for i in batch],
            head,
            None if logits is None else logits[batch],
        ),
        method.plan(augmented),
    )
    results["student_distilled"] = method.evaluate(student, task)
    results["distill_training"] = {
        "intermediate": vars(intermediate),
        "prediction": vars(prediction),
    }
    runtime.log(f"student distilled: {results['student_distilled']}")
    if runtime.is_main:
        student.save(runtime.output_dir / "student", method.student_tokenizer)
    rows = [
        [name, *results[name].values()]
        for name in ("teacher", "student_alone", "student_distilled")
        if name in results
    ]
    table = markdown_table(["model", *results["teacher"]], rows)
    summary = {
        "task": config.task,
        "train_examples": len(task.train),
        "augmented_examples": len(augmented),
        "eval_examples": len(task.eval),
        "loss_backend": config.loss_backend,
        **results,
    }
    return summary, table
