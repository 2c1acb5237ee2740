"""Hugging Face transformers: the fused LM-head KD loss inside a causal LM's forward, and a
``DistillationTrainer``.

    from kd_kernels.integrations.transformers import DistillationTrainer
    trainer = DistillationTrainer(model=student, teacher_model=teacher, temperature=2.0,
                                  kind="kl", hard_weight=0.5, args=args, train_dataset=data)

Causal LMs: the student's forward is replaced (``fuse_kd_forward``) by one that runs the body,
then ``kd_kernels.fused_linear_kd_loss`` on its last hidden states and LM head, chunk by
chunk: the (tokens, V) logits of neither model ever exist. The loss is computed inside the
model's forward, where FSDP2 has gathered ``lm_head.weight`` and from where it reduce-scatters
its gradient like every other parameter's; that is the supported way to use the fused loss
under FSDP2 (a sharded weight passed from outside is refused). Sequence classifiers: kd_loss
on the two models' logits.

Needs ``pip install 'kd_kernels[hf]'`` (transformers >= 5 and accelerate); only this module
imports them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch

import kd_kernels as kdk

try:
    import transformers
    from transformers.modeling_outputs import CausalLMOutputWithPast
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "kd_kernels.integrations.transformers needs transformers: pip install 'kd_kernels[hf]'"
    ) from error

__all__ = ["DistillationTrainer", "causal_kd_rows", "fuse_kd_forward", "teacher_head_inputs"]

TEACHER_KEYS = (
    "teacher_logits",
    "teacher_hidden",
    "teacher_weight",
    "teacher_bias",
    "teacher_topk",
    "teacher_softcap",
    "teacher_logit_scale",
)


def causal_kd_rows(
    attention_mask: torch.Tensor | None, labels: torch.Tensor | None, ignore_index: int = -100
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The rows of a causal LM's KD loss: position i (all but the last) predicts token i + 1.

    Returns (labels[:, 1:], mask): with labels, a row counts where its shifted label is not
    ``ignore_index`` (what the Trainer's ``num_items_in_batch`` counts) and mask is None;
    without, where both tokens i and i + 1 are real (attention_mask), or every row.
    """
    if labels is not None:
        return labels[:, 1:], None
    if attention_mask is None:
        return None, None
    real = attention_mask.bool()
    return None, real[:, 1:] & real[:, :-1]


def fuse_kd_forward(
    model: torch.nn.Module,
    *,
    temperature: float = 1.0,
    kind: str = "kl",
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    beta: float = 0.5,
    scale_t2: bool = True,
    ignore_index: int = -100,
    chunk_size: int | tuple[int, int | None] | None = None,
    backend: str = "auto",
) -> torch.nn.Module:
    """Makes ``model(input_ids, attention_mask, labels, teacher_... = ...)`` return the fused
    KD loss of a Hugging Face causal LM, without its logits; returns ``model`` (patched).

    The new forward takes the model's own arguments and, as keywords, one teacher:
    ``teacher_logits`` (B, L, V) (or (K, B, L, V)); or ``teacher_hidden`` (B, L, H_T) with
    ``teacher_weight`` (V, H_T) and ``teacher_bias``; or ``teacher_topk`` ((B, L, k) ids,
    log-probabilities); and ``num_items_in_batch``: the number of counted tokens over all the
    micro-batches (and ranks) of an optimizer step, which divides the summed loss (otherwise
    the counted rows of this batch do). Rows: position i predicts token i + 1
    (``causal_kd_rows``); ``labels`` give the hard term (``hard_weight``) and which rows
    count. It returns ``CausalLMOutputWithPast(loss=..., logits=None, ...)``. Without a
    teacher it is the model's own forward.

    Under autocast the head runs in the autocast dtype (hidden states and weight cast, the
    loss math in float32), as the model's own ``lm_head`` would. Soft-capped (Gemma) or scaled
    (Cohere) logits are taken from the config. The LM head must be gathered by the root
    module under FSDP2 (do not ``fully_shard`` the head alone).
    """
    original = model.forward
    options = dict(
        temperature=temperature,
        kind=kind,
        hard_weight=hard_weight,
        soft_weight=soft_weight,
        beta=beta,
        scale_t2=scale_t2,
        ignore_index=ignore_index,
        chunk_size=chunk_size,
        backend=backend,
    )
    options.update(_head_transform(model.config, "softcap", "logit_scale"))

    @functools.wraps(original)  # the Trainer reads the signature to keep dataset columns
    def forward(*args: Any, **kwargs: Any):
        teacher = {key: kwargs.pop(key) for key in TEACHER_KEYS if kwargs.get(key) is not None}
        for key in TEACHER_KEYS:
            kwargs.pop(key, None)
        num_items = kwargs.pop("num_items_in_batch", None)
        if not teacher:
            return original(*args, **kwargs)
        return _fused_kd_forward(model, args, kwargs, teacher, num_items, options)

    model.forward = forward
    model._kd_kernels_fused_forward = True
    return model


def _head_transform(config: Any, softcap_key: str, scale_key: str) -> dict:
    """fused_linear_kd_loss's softcap / logit_scale arguments for a model config (Gemma 2/3
    soft-cap final logits; Cohere multiplies them), empty when the head is a plain linear."""
    found = {}
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        found[softcap_key] = float(softcap)
    scale = getattr(config, "logit_scale", None)
    if scale is not None and float(scale) != 1.0:
        found[scale_key] = float(scale)
    accepted = inspect.signature(kdk.fused_linear_kd_loss).parameters
    missing = [key for key in found if key not in accepted]
    if missing:
        raise NotImplementedError(
            f"{type(config).__name__} transforms its final logits ({', '.join(missing)}), which "
            "this version of fused_linear_kd_loss cannot apply: the fused loss would differ "
            "from the model's own"
        )
    return found


def _fused_kd_forward(model, args, kwargs, teacher, num_items, options):
    names = ("input_ids", "attention_mask")
    if len(args) > len(names):
        raise TypeError("with a teacher, pass arguments after attention_mask by keyword")
    for name, value in zip(names, args, strict=False):
        kwargs[name] = value
    labels = kwargs.pop("labels", None)
    kwargs.pop("logits_to_keep", None)  # every position but the last is a KD row
    kwargs.setdefault("use_cache", False)
    body = model.base_model
    if body is model:
        raise TypeError(f"{type(model).__name__} has no separate body (base_model) and LM head")
    outputs = body(**kwargs)
    hidden = outputs.last_hidden_state[:, :-1]
    shifted_labels, mask = causal_kd_rows(kwargs.get("attention_mask"), labels)
    teacher = {k: _drop_last_position(k, v) for k, v in teacher.items()}
    head = model.get_output_embeddings()
    weight, bias = head.weight, getattr(head, "bias", None)
    device_type = hidden.device.type
    with _head_precision(device_type) as dtype:
        if dtype is not None:
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
            if "teacher_logits" in teacher:
                teacher["teacher_logits"] = teacher["teacher_logits"].to(dtype)
        elif "teacher_logits" in teacher:
            teacher["teacher_logits"] = teacher["teacher_logits"].to(hidden.dtype)
        loss = kdk.fused_linear_kd_loss(
            hidden,
            weight,
            student_bias=bias,
            labels=shifted_labels,
            mask=mask,
            normalizer=num_items,
            **teacher,
            **options,
        )
    return CausalLMOutputWithPast(
        loss=loss,
        logits=None,
        past_key_values=getattr(outputs, "past_key_values", None),
        hidden_states=getattr(outputs, "hidden_states", None),
        attentions=getattr(outputs, "attentions", None),
    )


def _drop_last_position(key: str, value: Any) -> Any:
    """A teacher tensor over positions (B, L, ...) -> (B, L - 1, ...); weights unchanged."""
    if key == "teacher_topk":
        return tuple(x[:, :-1] for x in value)
    if key == "teacher_logits":
        return value[..., :-1, :]
    if key == "teacher_hidden":
        return value[:, :-1]
    return value


@contextlib.contextmanager
def _head_precision(device_type: str):
    """Yields autocast's dtype for the head when autocast is on (and turns it off inside, so
    the loss math stays float32), else None."""
    if not torch.is_autocast_enabled(device_type):
        yield None
        return
    dtype = torch.get_autocast_dtype(device_type)
    with torch.autocast(device_type, enabled=False):
        yield dtype


def teacher_head_inputs(teacher: torch.nn.Module, **inputs: Any) -> dict:
    """The teacher side of the fused loss under no_grad: its last hidden states (B, L, H_T)
    and LM head weight and bias (gathered whole if the teacher is FSDP2-sharded: it gets no
    gradient, so a gathered copy is exact), plus its soft-cap / logit scale."""
    body = teacher.base_model
    inputs.pop("labels", None)
    with torch.no_grad():
        hidden = body(**inputs, use_cache=False).last_hidden_state
    head = teacher.get_output_embeddings()
    weight, bias = _whole(head.weight), _whole(getattr(head, "bias", None))
    found = {"teacher_hidden": hidden, "teacher_weight": weight.detach()}
    if bias is not None:
        found["teacher_bias"] = bias.detach()
    return found


def _whole(tensor: torch.Tensor | None) -> torch.Tensor | None:
    full = getattr(tensor, "full_tensor", None)
    return full() if full is not None else tensor


def _is_causal_lm(model: torch.nn.Module) -> bool:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    name = type(model).__name__
    return (
        name in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
        or name.endswith("ForCausalLM")  # remote-code and custom classes
        or bool(getattr(model, "_kd_kernels_fused_forward", False))
    )


class DistillationTrainer(transformers.Trainer):
    """``transformers.Trainer`` that distills ``teacher_model`` into ``model``.

    Causal LMs: the student's forward computes ``fused_linear_kd_loss`` (``fuse_kd_forward``)
    on the teacher's last hidden states and head (run under no_grad, chunked with the
    student's), divided by the Trainer's ``num_items_in_batch`` (the counted tokens of the
    whole optimizer step, over micro-batches and ranks), so gradient accumulation equals the
    big batch. Sequence classifiers: ``kd_loss`` of the two models' logits, with the labels'
    cross-entropy weighted by ``hard_weight``.

    Args:
        model, teacher_model: the student and the teacher (same tokenizer and vocabulary).
        temperature, kind, hard_weight, soft_weight, beta, scale_t2: as in ``kd_loss``.
        chunk_size, backend: as in ``fused_linear_kd_loss``.
        All other arguments go to ``transformers.Trainer`` (args, datasets, collator, ...).
        Works with gradient accumulation, bf16 autocast, DDP and FSDP2 (torchrun, accelerate).
    """

    def __init__(
        self,
        model: torch.nn.Module | None = None,
        teacher_model: torch.nn.Module | None = None,
        *args: Any,
        temperature: float = 1.0,
        kind: str = "kl",
        hard_weight: float = 0.0,
        soft_weight: float = 1.0,
        beta: float = 0.5,
        scale_t2: bool = True,
        chunk_size: int | tuple[int, int | None] | None = None,
        backend: str = "auto",
        **kwargs: Any,
    ) -> None:
        if model is None or teacher_model is None:
            raise ValueError("DistillationTrainer needs model (the student) and teacher_model")
        self.kd_options = dict(
            temperature=temperature,
            kind=kind,
            hard_weight=hard_weight,
            soft_weight=soft_weight,
            beta=beta,
            scale_t2=scale_t2,
        )
        self.causal = _is_causal_lm(model)
        if self.causal and not getattr(model, "_kd_kernels_fused_forward", False):
            fuse_kd_forward(model, chunk_size=chunk_size, backend=backend, **self.kd_options)
        self.backend = backend
        super().__init__(model, *args, **kwargs)
        # The loss is divided by num_items_in_batch: have the Trainer count it (over the
        # accumulated micro-batches and ranks) and not divide by the accumulation steps again.
        self.model_accepts_loss_kwargs = True
        self.teacher = teacher_model.to(self.args.device).eval().requires_grad_(False)
        self.teacher_transform = _head_transform(
            teacher_model.config, "teacher_softcap", "teacher_logit_scale"
        )

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        with self.accelerator.autocast():  # the teacher too runs in the mixed precision
            if self.causal:
                teacher = {**teacher_head_inputs(self.teacher, **inputs), **self.teacher_transform}
                outputs = model(**inputs, **teacher, num_items_in_batch=num_items_in_batch)
                loss = outputs.loss
            else:
                loss, outputs = self._classifier_loss(model, inputs, num_items_in_batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            # num_items_in_batch counts every rank's tokens while DDP/FSDP average gradients.
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss

    def _classifier_loss(self, model, inputs, num_items_in_batch):
        inputs = dict(inputs)
        labels = inputs.pop("labels", None)
        with torch.no_grad():
            teacher_logits = self.teacher(**inputs).logits
        outputs = model(**inputs)
        logits = outputs.logits
        loss = kdk.kd_loss(
            logits,
            teacher_logits.to(logits.dtype),
            labels=labels,
            normalizer=num_items_in_batch,
            backend=self.backend,
            **self.kd_options,
        )
        return loss, outputs
