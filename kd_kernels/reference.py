"""Plain PyTorch versions of every loss: the specification the kernels are tested against.

These functions are written for clarity, not speed: they materialise every intermediate,
work in float32 (float64 stays float64, for gradcheck) and are differentiable with autograd.
They also serve as the ``backend="torch"`` implementation. Argument checking lives in
``kd_kernels.functional``; the functions here assume already-validated inputs.
"""

from __future__ import annotations

import math

import torch

KD_KINDS = ("kl", "soft_ce", "reverse_kl", "jsd")
KD_REDUCTIONS = ("batchmean", "sum", "mean", "none")


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _plogp_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """Elementwise p * (log p - log q) with the convention 0 * log 0 = 0.

    ``p != 0`` (not ``p > 0``) lets NaN through. The logs are replaced by 0 where p == 0
    before the product, so that the unselected branch has no -inf whose backward would
    turn the zero gradient into NaN (0 * inf).
    """
    nonzero = p != 0
    safe_log_p = torch.where(nonzero, log_p, torch.zeros_like(log_p))
    safe_log_q = torch.where(nonzero, log_q, torch.zeros_like(log_q))
    return torch.where(nonzero, p * (safe_log_p - safe_log_q), torch.zeros_like(p))


def kd_row_losses(
    student: torch.Tensor,
    teacher: torch.Tensor,
    *,
    temperature: float,
    kind: str,
    beta: float,
    scale_t2: bool,
) -> torch.Tensor:
    """Soft distillation loss of each row.

    Args:
        student: (R, C) logits.
        teacher: (K, R, C) logits of K teachers (K = 1 for a single teacher).
    Returns:
        (R,) losses in float32 (float64 for float64 input), with, for
        p_S = softmax(student / t) and p_T = mean_k softmax(teacher_k / t):

        - ``kl``: sum_c p_T (log p_T - log p_S)
        - ``soft_ce``: sum_c -p_T log p_S
        - ``reverse_kl``: sum_c p_S (log p_S - log p_T)
        - ``jsd``: beta KL(p_T || m) + (1 - beta) KL(p_S || m), m = beta p_T + (1 - beta) p_S

        each multiplied by t^2 when ``scale_t2``. Terms with a zero probability factor are 0.
    """
    dtype = _compute_dtype(student)
    log_p_s = torch.log_softmax(student.to(dtype) / temperature, dim=-1)
    teacher_log_probs = torch.log_softmax(teacher.detach().to(dtype) / temperature, dim=-1)
    log_p_t = mix_teachers(teacher_log_probs)
    per_class = kd_class_terms(log_p_s, log_p_t, kind=kind, beta=beta)
    rows = per_class.sum(dim=-1)
    return rows * (temperature * temperature) if scale_t2 else rows


def mix_teachers(teacher_log_probs: torch.Tensor) -> torch.Tensor:
    """log p_T of an ensemble from its members' (K, ...) log-probabilities.

    MT-DNN-KD averages the teachers' probabilities, not their logits:
    log p_T = logsumexp_k log p_k - log K.
    """
    if teacher_log_probs.shape[0] == 1:
        return teacher_log_probs[0]
    return torch.logsumexp(teacher_log_probs, dim=0) - math.log(teacher_log_probs.shape[0])


def kd_class_terms(
    log_p_s: torch.Tensor, log_p_t: torch.Tensor, *, kind: str, beta: float
) -> torch.Tensor:
    """Per-class terms of the soft loss from normalised log-probabilities (same shapes).

    Summed over classes they give the row loss of ``kd_row_losses`` (before the t^2 scale).
    Differentiable in ``log_p_s``; terms with a zero probability factor are 0.
    """
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if kind == "kl":
        return _plogp_ratio(p_t, log_p_t, log_p_s)
    if kind == "soft_ce":
        return torch.where(p_t != 0, -p_t * log_p_s, torch.zeros_like(p_t))
    if kind == "reverse_kl":
        return _plogp_ratio(p_s, log_p_s, log_p_t)
    if kind == "jsd":
        mixture = beta * p_t + (1.0 - beta) * p_s
        # m == 0 only where both p are 0, and there every term is 0: log(1) keeps it finite.
        log_m = torch.log(torch.where(mixture != 0, mixture, torch.ones_like(mixture)))
        # Weights inside the guard, so beta = 0 or 1 gives 0 (not 0 * inf) where p underflows.
        return _plogp_ratio(beta * p_t, log_p_t, log_m) + _plogp_ratio(
            (1.0 - beta) * p_s, log_p_s, log_m
        )
    raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    kind: str = "kl",
    reduction: str = "batchmean",
    mask: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    soft_weight: float = 1.0,
    beta: float = 0.5,
    scale_t2: bool = True,
) -> torch.Tensor:
    """Temperature-softmax distillation loss; see ``kd_kernels.kd_loss`` for the semantics.

    Shapes: student (..., C); teacher (..., C) or (K, ..., C); mask and labels (...).
    Returns a float32 scalar (float64 for float64 input), or shape (...) for "none".
    """
    row_shape = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, num_classes)
    if teacher_logits.dim() == student_logits.dim():
        teacher = teacher_logits.reshape(1, -1, num_classes)
    else:
        teacher = teacher_logits.reshape(teacher_logits.shape[0], -1, num_classes)
    counted = torch.ones(student.shape[0], dtype=torch.bool, device=student.device)
    if mask is not None:
        counted = counted & mask.reshape(-1).to(torch.bool)
    if labels is not None:
        flat_labels = labels.reshape(-1)
        counted = counted & (flat_labels != ignore_index)

    # Only counted rows enter the computation, so that nothing in an uncounted row (NaN
    # included) can reach the loss or the gradient.
    index = counted.nonzero().squeeze(-1)
    dtype = _compute_dtype(student)
    rows = soft_weight * kd_row_losses(
        student[index],
        teacher[:, index],
        temperature=temperature,
        kind=kind,
        beta=beta,
        scale_t2=scale_t2,
    )
    if hard_weight != 0.0:
        hard = torch.nn.functional.cross_entropy(
            student[index].to(dtype), flat_labels[index], reduction="none"
        )
        rows = rows + hard_weight * hard
    row_losses = torch.zeros(student.shape[0], dtype=dtype, device=student.device)
    row_losses = row_losses.index_put((index,), rows)

    if reduction == "none":
        return row_losses.reshape(row_shape)
    total = row_losses.sum()
    if reduction == "sum":
        return total
    num_counted = index.numel()
    if reduction == "batchmean":
        return total / max(num_counted, 1)
    if reduction == "mean":
        return total / max(num_counted * num_classes, 1)
    raise ValueError(f"reduction must be one of {KD_REDUCTIONS}, got {reduction!r}")


TOPK_REMAINDERS = ("renormalize", "spread")


def topk_remainder_logprob(
    logprobs: torch.Tensor, num_classes: int, remainder: str
) -> torch.Tensor:
    """The log-probability every class outside a row's top k gets, shape (..., 1).

    ``"renormalize"``: -inf (no mass; softmax renormalises the top k). ``"spread"``: the
    missing mass r = 1 - sum_k exp(logprobs) split evenly, log(r / (C - k)); -inf when k = C
    or r <= k * eps(dtype of logprobs): a remainder that small is the rounding of the stored
    log-probabilities, not mass (at t > 1 it would otherwise grow into a visible floor).
    Float32 (float64 for float64 input).
    """
    dtype = _compute_dtype(logprobs)
    k = logprobs.shape[-1]
    shape = (*logprobs.shape[:-1], 1)
    if remainder == "renormalize" or k == num_classes:
        return torch.full(shape, -math.inf, dtype=dtype, device=logprobs.device)
    missing = 1.0 - logprobs.to(dtype).exp().sum(dim=-1, keepdim=True)
    rounding = k * torch.finfo(logprobs.dtype).eps
    # where, not clamp: NaN in the logprobs stays NaN.
    missing = torch.where(missing <= rounding, torch.zeros_like(missing), missing)
    return torch.log(missing / (num_classes - k))


def topk_teacher_logits(
    indices: torch.Tensor, logprobs: torch.Tensor, num_classes: int, remainder: str
) -> torch.Tensor:
    """Dense teacher log-probabilities (..., C) from a stored sparse teacher.

    Args:
        indices: (..., k) int64, distinct classes in [0, C) per row.
        logprobs: (..., k) float, the teacher's log-probabilities of those classes at
            temperature 1 (``"renormalize"`` also accepts any logits: only their
            differences matter).
        remainder: ``"renormalize"`` or ``"spread"`` (see ``topk_remainder_logprob``).

    The result is a teacher in logit form: kd_loss applies the temperature to it like to
    any logits, p_T = softmax(dense / t). Float32 (float64 for float64 input).
    """
    rest = topk_remainder_logprob(logprobs, num_classes, remainder)
    dense = rest.expand(*logprobs.shape[:-1], num_classes).clone()
    return dense.scatter_(-1, indices, logprobs.to(dense.dtype))


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    student_bias: torch.Tensor | None = None,
    **kd_options,
) -> torch.Tensor:
    """The unfused spec of ``kd_kernels.fused_linear_kd_loss``: the student's logits
    h @ W^T + b materialised whole, then ``kd_loss``. Shapes: hidden (..., H), weight (V, H),
    bias (V,), teacher logits (..., V) or (K, ..., V)."""
    logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    return kd_loss(logits, teacher_logits, **kd_options)


LAYER_REDUCTIONS = ("sum", "mean", "none")


def _replace_at_or_below(x: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """TinyBERT's ``torch.where(att <= threshold, 0, att)``, in the compute dtype."""
    x = x.to(_compute_dtype(x))
    if threshold is None:
        return x
    return torch.where(x <= threshold, torch.zeros_like(x), x)


def _masked_mean_square(diff: torch.Tensor, counted: torch.Tensor | None) -> torch.Tensor:
    """sum(counted * diff^2) / sum(counted); 0 when nothing is counted.

    Uncounted entries are zeroed with ``where`` before squaring (not multiplied by the mask),
    so that NaN there reaches neither the loss nor, through 0 * NaN in backward, the gradient.
    """
    if counted is None:
        return diff.square().sum() / max(diff.numel(), 1)
    counted_diff = torch.where(counted, diff, torch.zeros_like(diff))
    return counted_diff.square().sum() / counted.sum().clamp_min(1)


def attention_mse_layer_losses(
    student_attn: list[torch.Tensor],
    teacher_attn: list[torch.Tensor],
    *,
    attention_mask: torch.Tensor | None = None,
    threshold: float | None = -100.0,
) -> torch.Tensor:
    """Per matched layer l: mean over counted (b, h, q, k) of (s' - t')^2.

    Args:
        student_attn, teacher_attn: equal-length lists of (B, H, L, L) (or (B, H, Lq, Lk)
            without a mask) float tensors, equal shapes pairwise.
        attention_mask: (B, L) bool; (q, k) counts when both tokens are real. None: all count.
        threshold: s' = 0 where s <= threshold (TinyBERT zeroes scores masked with -10000),
            likewise t'. None keeps every value.

    Returns:
        (num_layers,) float32 (float64 for float64 input); 0 for a layer with no counted entry.
    """
    losses = []
    for student, teacher in zip(student_attn, teacher_attn, strict=True):
        teacher = teacher.detach()  # the teacher is read, never differentiated
        diff = _replace_at_or_below(student, threshold) - _replace_at_or_below(teacher, threshold)
        counted = None
        if attention_mask is not None:
            real = attention_mask.to(torch.bool)
            counted = (real[:, None, :, None] & real[:, None, None, :]).expand_as(diff)
        losses.append(_masked_mean_square(diff, counted))
    return torch.stack(losses)


def hidden_mse_layer_losses(
    student_hidden: list[torch.Tensor],
    teacher_hidden: list[torch.Tensor],
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per matched layer l: sum over real tokens (b, l) and d of (s - t)^2 / (tokens * D).

    Args:
        student_hidden, teacher_hidden: equal-length lists of (B, L, D) float tensors.
        attention_mask: (B, L) bool, False for padding. None: every token counts.

    Returns:
        (num_layers,) float32 (float64 for float64 input); 0 for a layer with no real token.
    """
    losses = []
    for student, teacher in zip(student_hidden, teacher_hidden, strict=True):
        diff = student.to(_compute_dtype(student)) - teacher.detach().to(_compute_dtype(student))
        counted = None
        if attention_mask is not None:
            counted = attention_mask.to(torch.bool)[:, :, None].expand_as(diff)
        losses.append(_masked_mean_square(diff, counted))
    return torch.stack(losses)


def reduce_layers(layer_losses: torch.Tensor, layer_reduction: str) -> torch.Tensor:
    """``"sum"`` over layers (TinyBERT), ``"mean"``, or ``"none"`` (the (num_layers,) vector)."""
    if layer_reduction == "sum":
        return layer_losses.sum()
    if layer_reduction == "mean":
        return layer_losses.mean()
    return layer_losses


INFO_NCE_SIMILARITIES = ("cosine", "dot")
INFO_NCE_REDUCTIONS = ("mean", "sum", "none")


def info_nce_row_losses(
    query: torch.Tensor,
    key: torch.Tensor,
    labels: torch.Tensor,
    temperature: float | torch.Tensor,
    similarity: str,
) -> torch.Tensor:
    """One direction of InfoNCE: loss_i = logsumexp_j z_ij - z_{i, labels_i}.

    z_ij = sim(q_i, k_j) / temperature, sim = cosine (``F.normalize`` rows, eps 1e-12) or dot.
    query (N, D), key (M, D), labels (N,) int64 in [0, M). Materialises the N x M matrix.
    Returns (N,) float32 (float64 for float64 input).
    """
    dtype = _compute_dtype(query)
    q, k = query.to(dtype), key.to(dtype)
    if similarity == "cosine":
        q, k = torch.nn.functional.normalize(q, dim=-1), torch.nn.functional.normalize(k, dim=-1)
    logits = q @ k.T / temperature
    positive = logits.gather(1, labels[:, None]).squeeze(1)
    return torch.logsumexp(logits, dim=1) - positive


def info_nce_loss(
    query: torch.Tensor,
    key: torch.Tensor,
    *,
    temperature: float | torch.Tensor = 0.05,
    labels: torch.Tensor | None = None,
    similarity: str = "cosine",
    symmetric: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """In-batch InfoNCE (SimCSE, CLIP), the spec of ``kd_kernels.info_nce_loss``.

    labels default to arange(N) (M >= N; keys past N are hard negatives). ``symmetric``
    (labels None) adds the key-to-query direction over the first N keys,
    rev_j = logsumexp_i z_ij - z_jj, and each query's loss is (loss_i + rev_i) / 2.
    ``reduction``: "mean" over queries, "sum", or "none" (N,).
    """
    if labels is None:
        labels = torch.arange(query.shape[0], device=query.device)
    losses = info_nce_row_losses(query, key, labels, temperature, similarity)
    if symmetric:
        count = query.shape[0]
        reverse = info_nce_row_losses(
            key[:count], query, torch.arange(count, device=query.device), temperature, similarity
        )
        losses = (losses + reverse) / 2
    return reduce_queries(losses, reduction)


def reduce_queries(losses: torch.Tensor, reduction: str) -> torch.Tensor:
    """``"mean"`` over queries, ``"sum"``, or ``"none"`` (the (N,) vector)."""
    if reduction == "mean":
        return losses.mean()
    if reduction == "sum":
        return losses.sum()
    return losses
