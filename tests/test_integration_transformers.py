"""kd_kernels.integrations.transformers on tiny random Llama pairs (built from configs, no
download): the fused forward against the unfused loss, and DistillationTrainer: losses fall,
equal an unfused reference trainer step by step, gradient accumulation equals the big batch,
bf16 autocast, sequence classification."""

import copy
import inspect

import pytest
import torch
from hf_tiny import (
    VOCAB,
    Examples,
    counted_tokens,
    examples,
    tiny_llama,
    token_batch,
    training_args,
)

import kd_kernels as kdk

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from kd_kernels.integrations.transformers import (  # noqa: E402
    DistillationTrainer,
    causal_kd_rows,
    fuse_kd_forward,
    teacher_head_inputs,
)

OPTIONS = dict(temperature=2.0, hard_weight=0.5)


def _teacher_forms(teacher, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    head = teacher_head_inputs(teacher, **inputs)
    with torch.no_grad():
        logits = teacher(**inputs).logits
    return {"logits": {"teacher_logits": logits}, "head": head}


# (kind, teacher form, num_items_in_batch): every kind, both forms, both divisors.
FORWARD_CASES = [
    ("kl", "logits", None),
    ("soft_ce", "head", 13),
    ("reverse_kl", "logits", 13),
    ("jsd", "head", None),
]


@pytest.mark.parametrize(("kind", "form", "num_items"), FORWARD_CASES, ids=str)
def test_fused_forward_equals_unfused_loss(kind, form, num_items):
    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    unfused = copy.deepcopy(student)
    fuse_kd_forward(student, kind=kind, **OPTIONS)
    batch = token_batch(seed=3, lengths=(7, 5, 3))
    teacher_kwargs = _teacher_forms(teacher, batch)[form]
    out = student(**batch, **teacher_kwargs, num_items_in_batch=num_items)
    assert out.logits is None
    out.loss.backward()

    logits = unfused(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    teacher_logits = _teacher_forms(teacher, batch)["logits"]["teacher_logits"]
    labels, _ = causal_kd_rows(batch["attention_mask"], batch["labels"])
    expected = kdk.kd_loss(
        logits[:, :-1],
        teacher_logits[:, :-1],
        labels=labels,
        kind=kind,
        reduction="batchmean" if num_items is None else "sum",
        backend="torch",
        **OPTIONS,
    )
    if num_items is not None:
        expected = expected / num_items
    expected.backward()
    torch.testing.assert_close(out.loss, expected, rtol=1e-5, atol=1e-6)
    for (name, got), want in zip(student.named_parameters(), unfused.parameters(), strict=True):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_forward_without_teacher_is_the_models_own():
    student = tiny_llama(16, seed=0)
    plain = copy.deepcopy(student)
    fuse_kd_forward(student)
    batch = token_batch(seed=4)
    torch.testing.assert_close(student(**batch).logits, plain(**batch).logits)
    torch.testing.assert_close(student(**batch).loss, plain(**batch).loss)


def test_fused_forward_without_labels_counts_real_token_pairs():
    student, teacher = tiny_llama(16, seed=0), tiny_llama(24, seed=1)
    unfused = copy.deepcopy(student)
    fuse_kd_forward(student, **{**OPTIONS, "hard_weight": 0.0})
    batch = token_batch(seed=5, lengths=(7, 2))
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    teacher_logits = _teacher_forms(teacher, batch)["logits"]["teacher_logits"]
    loss = student(**inputs, teacher_logits=teacher_logits).loss
    _, mask = causal_kd_rows(batch["attention_mask"], None)
    expected = kdk.kd_loss(
        unfused(**inputs).logits[:, :-1], teacher_logits[:, :-1], mask=mask, temperature=2.0
    )
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


class UnfusedDistillationTrainer(transformers.Trainer):
    """The spec: both models' logits materialised, kd_loss on the torch backend, the summed
    loss divided by num_items_in_batch."""

    def __init__(self, model, teacher_model, kd_options, **kwargs):
        super().__init__(model, **kwargs)
        self.model_accepts_loss_kwargs = True
        self.teacher, self.kd_options = teacher_model.eval(), kd_options

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = {k: inputs[k] for k in ("input_ids", "attention_mask")}
        with torch.no_grad():
            teacher_logits = self.teacher(**ids).logits
        logits = model(**ids).logits
        labels, _ = causal_kd_rows(inputs["attention_mask"], inputs["labels"])
        loss = kdk.kd_loss(
            logits[:, :-1].float(),
            teacher_logits[:, :-1].float(),
            labels=labels,
            reduction="sum",
            backend="torch",
            **self.kd_options,
        )
        return loss / num_items_in_batch


def _train(trainer_class, tmp_path, student, teacher, dataset, kind="kl", **overrides):
    options = dict(kind=kind, **OPTIONS)
    common = dict(args=training_args(tmp_path, **overrides), train_dataset=dataset)
    if trainer_class is DistillationTrainer:
        trainer = DistillationTrainer(model=student, teacher_model=teacher, **options, **common)
    else:
        trainer = trainer_class(student, teacher, options, **common)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return losses, {k: v.detach().clone() for k, v in student.named_parameters()}


def test_trainer_losses_fall_and_equal_unfused_reference_step_by_step(tmp_path):
    teacher, dataset = tiny_llama(24, seed=1), examples(count=4)
    steps = dict(max_steps=8, learning_rate=2e-2)
    fused_losses, fused_params = _train(
        DistillationTrainer, tmp_path, tiny_llama(16, seed=0), teacher, dataset, **steps
    )
    ref_losses, ref_params = _train(
        UnfusedDistillationTrainer, tmp_path, tiny_llama(16, seed=0), teacher, dataset, **steps
    )
    assert len(fused_losses) == 8
    torch.testing.assert_close(fused_losses, ref_losses, rtol=1e-4, atol=1e-6)
    for name, value in fused_params.items():
        torch.testing.assert_close(value, ref_params[name], rtol=1e-4, atol=1e-5, msg=name)
    assert sum(fused_losses[-2:]) < 0.8 * sum(fused_losses[:2]), fused_losses


def test_gradient_accumulation_equals_the_big_batch(tmp_path):
    teacher, dataset = tiny_llama(24, seed=1), examples()
    accumulated, accumulated_params = _train(
        DistillationTrainer,
        tmp_path,
        tiny_llama(16, seed=0),
        teacher,
        dataset,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=2,
    )
    big, big_params = _train(
        DistillationTrainer,
        tmp_path,
        tiny_llama(16, seed=0),
        teacher,
        dataset,
        per_device_train_batch_size=4,
        max_steps=2,
    )
    torch.testing.assert_close(accumulated, big, rtol=1e-5, atol=1e-6)
    for name, value in accumulated_params.items():
        torch.testing.assert_close(value, big_params[name], rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_autocast_follows_fp32(tmp_path):
    teacher, dataset = tiny_llama(24, seed=1), examples(count=4)
    fp32, _ = _train(
        DistillationTrainer, tmp_path, tiny_llama(16, seed=0), teacher, dataset, max_steps=2
    )
    bf16, params = _train(
        DistillationTrainer,
        tmp_path,
        tiny_llama(16, seed=0),
        teacher,
        dataset,
        max_steps=2,
        bf16=True,
    )
    torch.testing.assert_close(bf16, fp32, rtol=3e-2, atol=1e-3)
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in params.values())


def test_sequence_classification_uses_kd_loss(tmp_path):
    def classifier(hidden, seed):
        torch.manual_seed(seed)
        config = transformers.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            num_labels=3,
            pad_token_id=0,
        )
        return transformers.LlamaForSequenceClassification(config)

    batch = token_batch(seed=9, lengths=(7, 5, 4, 6))
    batch["labels"] = torch.tensor([0, 2, 1, 2])
    student, teacher = classifier(16, 0), classifier(24, 1)
    reference_student = copy.deepcopy(student)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=teacher,
        temperature=2.0,
        hard_weight=0.3,
        args=training_args(
            tmp_path, max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2
        ),
        train_dataset=Examples(batch),
    )
    trainer.train()
    (loss,) = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        teacher_logits = teacher(**inputs).logits
    expected = kdk.kd_loss(
        reference_student(**inputs).logits,
        teacher_logits,
        labels=batch["labels"],
        temperature=2.0,
        hard_weight=0.3,
        backend="torch",
    )
    assert loss == pytest.approx(expected.item(), rel=1e-5)


def test_counted_tokens_match_the_trainers_count():
    # The fused forward's rows are the Trainer's num_items_in_batch rows (labels[:, 1:]).
    batch = token_batch(seed=2, lengths=(7, 3))
    labels, _ = causal_kd_rows(batch["attention_mask"], batch["labels"])
    assert int((labels != -100).sum()) == counted_tokens(batch)


def test_soft_capped_heads_are_applied_or_refused():
    # Gemma-style final-logit soft-capping: passed to the fused loss when it takes softcap=,
    # refused otherwise (never silently dropped).
    model = tiny_llama(16, seed=0)
    model.config.final_logit_softcapping = 30.0
    if "softcap" in inspect.signature(kdk.fused_linear_kd_loss).parameters:
        fuse_kd_forward(model)
    else:
        with pytest.raises(NotImplementedError, match="softcap"):
            fuse_kd_forward(model)
