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


# Per class, |u| = |log p_T - log p_S| up to which the log-ratio forms are used. Beyond it the
# terms are O(1) and the log-probability forms lose nothing; they also take the infinite cases
# (a -inf logit on one side only). Both compute the same quantity per class.
LOG_RATIO_LIMIT = 0.5
# |u| below which phi and psi are taken from their Taylor series (the closed forms cancel).
SERIES_LIMIT = 0.1


def phi(u: torch.Tensor) -> torch.Tensor:
    """u e^u - expm1(u) = sum_n>=2 (n - 1) u^n / n!, >= 0: the KL term of a class over p_S.

    The series is used for |u| < SERIES_LIMIT (error < 1e-8 relative), the closed form above.
    """
    where_small = u.abs() < SERIES_LIMIT
    small = torch.where(where_small, u, torch.zeros_like(u))
    big = torch.where(where_small, torch.ones_like(u), u)
    series = (
        small
        * small
        * (
            1 / 2
            + small * (1 / 3 + small * (1 / 8 + small * (1 / 30 + small * (1 / 144 + small / 840))))
        )
    )
    em = torch.expm1(big)
    return torch.where(where_small, series, big * em + big - em)


def psi(u: torch.Tensor) -> torch.Tensor:
    """expm1(u) - u = sum_n>=2 u^n / n!, >= 0: the reverse-KL term of a class over p_S."""
    where_small = u.abs() < SERIES_LIMIT
    small = torch.where(where_small, u, torch.zeros_like(u))
    big = torch.where(where_small, torch.ones_like(u), u)
    series = (
        small
        * small
        * (
            1 / 2
            + small
            * (1 / 6 + small * (1 / 24 + small * (1 / 120 + small * (1 / 720 + small / 5040))))
        )
    )
    return torch.where(where_small, series, torch.expm1(big) - big)


def gap_terms(d: torch.Tensor, log_p_s: torch.Tensor, b_over_a: torch.Tensor) -> torch.Tensor:
    """Per class p_S expm1(d) = e^(b - lse(a)) - p_S; summed over classes, e^delta - 1.

    d = b - a (see ``log_ratio``), log_p_s = a - lse(a), b_over_a = b - lse(a). The product
    where d <= 1, where the difference would cancel; the difference elsewhere, where it does
    not and where the product would be 0 * inf (a -inf student logit).
    """
    p_s = log_p_s.exp()
    rising = d <= 1  # False for NaN (-inf on both sides): that class has no mass
    return torch.where(
        rising,
        p_s * torch.expm1(torch.where(rising, d, torch.zeros_like(d))),
        torch.exp(b_over_a) - p_s,
    )


def delta_from_gaps(gap_sum: torch.Tensor, lse_gap: torch.Tensor) -> torch.Tensor:
    """delta = lse(b) - lse(a) as log1p(gap_sum) where |lse_gap| <= 1 and the sum is usable,
    else the plain difference ``lse_gap`` (the two are far apart: nothing cancels)."""
    usable = (lse_gap.abs() <= 1) & (gap_sum > -1) & gap_sum.isfinite()
    return torch.where(
        usable, torch.log1p(torch.where(usable, gap_sum, torch.zeros_like(gap_sum))), lse_gap
    )


def log_ratio_from_delta(
    d: torch.Tensor, delta: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """u = log p_T - log p_S from d (K, ..., C) and delta (K, ..., 1): u_k = d_k - delta_k;
    K teachers: u = log1p(mean_k expm1(u_k)). Returns u, 0 where not used, and ``near``: every
    |u_k| <= LOG_RATIO_LIMIT. One class: p_S = p_T = 1, u = 0 exactly."""
    u_k = d - delta
    near = (u_k.abs() <= LOG_RATIO_LIMIT).all(dim=0)
    u_k = torch.where(near, u_k, torch.zeros_like(u_k))
    u = u_k[0] if u_k.shape[0] == 1 else torch.log1p(torch.expm1(u_k).mean(dim=0))
    if num_classes == 1:
        u = torch.zeros_like(u)
    return u, near


def log_ratio(
    student: torch.Tensor,
    teacher: torch.Tensor,
    temperature: float,
    log_p_s: torch.Tensor,
    teacher_log_probs: torch.Tensor,
    lse_gap: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """u = log p_T - log p_S per class without cancellation, and where it is used (|u| <= 1/2).

    With a = student / t, b = teacher / t: d = b - a is formed as (teacher - student) / t (the
    logits subtracted first, exact when they are close), delta = lse(b) - lse(a) =
    log1p(sum p_S expm1(d)) (see ``gap_terms``, ``delta_from_gaps``), u_k = d_k - delta_k.
    K teachers: u = log1p(mean_k expm1(u_k)), taken where every |u_k| <= 1.

    Shapes: student (R, C), teacher and teacher_log_probs (K, R, C), log_p_s (R, C), lse_gap
    (K, R, 1) = lse(b) - lse(a). Returns u (R, C), 0 where not used, and the bool mask ``near``.
    """
    d = (teacher - student) / temperature
    # b - lse(a) <= delta: clamped at 2 (a class beyond it makes delta > 1, where the sum is
    # not used), so that no inf enters the backward of exp.
    b_over_a = (teacher_log_probs + lse_gap).clamp(max=2.0)
    gaps = gap_terms(d, log_p_s, b_over_a).sum(dim=-1, keepdim=True)
    delta = delta_from_gaps(gaps, lse_gap)
    return log_ratio_from_delta(d, delta, student.shape[-1])


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
        Computed in log-ratios (see ``log_ratio`` and ``kd_class_terms``), so that the loss
        keeps its digits when student and teacher are close, and is exactly 0 when they agree.
    """
    dtype = _compute_dtype(student)
    student = student.to(dtype)
    teacher = teacher.detach().to(dtype)
    a, b = student / temperature, teacher / temperature
    lse_a = torch.logsumexp(a, dim=-1, keepdim=True)
    lse_b = torch.logsumexp(b, dim=-1, keepdim=True)
    log_p_s, teacher_log_probs = a - lse_a, b - lse_b
    log_p_t = mix_teachers(teacher_log_probs)
    u, near = log_ratio(student, teacher, temperature, log_p_s, teacher_log_probs, lse_b - lse_a)
    per_class = kd_class_terms(log_p_s, log_p_t, kind=kind, beta=beta, u=u, near=near)
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
    log_p_s: torch.Tensor,
    log_p_t: torch.Tensor,
    *,
    kind: str,
    beta: float,
    u: torch.Tensor | None = None,
    near: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-class terms of the soft loss (same shapes); summed over classes they give the row
    loss of ``kd_row_losses`` (before the t^2 scale). Differentiable in ``log_p_s`` and ``u``.

    Where ``near`` (u = log p_T - log p_S from ``log_ratio``, |u| <= 1/2), the log-ratio forms,
    every term >= 0 and exactly 0 at u = 0 (L = log1p(beta expm1(u)) = log(m / p_S)):

    - kl: p_S phi(u), phi(u) = u e^u - expm1(u); soft_ce: that plus -p_T log p_T
    - reverse_kl: p_S psi(u), psi(u) = expm1(u) - u
    - jsd: p_S e^L (beta phi(u - L) + (1 - beta) phi(-L))

    elsewhere the log-probability forms plus a zero-sum correction that makes them equal per
    class (kl: p_T log(p_T / p_S) - p_T + p_S). Terms with a zero probability factor are 0.
    """
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    if near is None:
        near = torch.zeros_like(p_s, dtype=torch.bool)
        u = torch.zeros_like(p_s)
    if kind in ("kl", "soft_ce"):
        terms = torch.where(near, p_s * phi(u), _plogp_ratio(p_t, log_p_t, log_p_s) - p_t + p_s)
        if kind == "soft_ce":
            terms = terms - _plogp_ratio(p_t, log_p_t, torch.zeros_like(log_p_t))
        return terms
    if kind == "reverse_kl":
        return torch.where(near, p_s * psi(u), _plogp_ratio(p_s, log_p_s, log_p_t) + p_t - p_s)
    if kind == "jsd":
        mixture_over_s = 1 + beta * torch.expm1(u)  # e^L = m / p_S
        log_mixture_over_s = torch.log(mixture_over_s)
        near_terms = (
            p_s
            * mixture_over_s
            * (beta * phi(u - log_mixture_over_s) + (1.0 - beta) * phi(-log_mixture_over_s))
        )
        mixture = beta * p_t + (1.0 - beta) * p_s
        # m == 0 only where both p are 0, and there every term is 0: log(1) keeps it finite.
        log_m = torch.log(torch.where(mixture != 0, mixture, torch.ones_like(mixture)))
        # Weights inside the guard, so beta = 0 or 1 gives 0 (not 0 * inf) where p underflows.
        far_terms = _plogp_ratio(beta * p_t, log_p_t, log_m) + _plogp_ratio(
            (1.0 - beta) * p_s, log_p_s, log_m
        )
        return torch.where(near, near_terms, far_terms)
    raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")


def kd_class_gradient_weights(
    log_p_s: torch.Tensor,
    log_p_t: torch.Tensor,
    *,
    kind: str,
    beta: float,
    u: torch.Tensor,
    near: torch.Tensor,
) -> torch.Tensor:
    """Per class w such that d (row loss) / d a_c = w_c - p_S,c sum_j w_j, a = student / t.

    kl, soft_ce: w = p_S - p_T (-p_S expm1(u) where ``near``) and sum_j w_j = 0: the gradient
    is w itself. reverse_kl: w = p_S h with h = -u (near) or log p_S - log p_T; jsd: h =
    -(1 - beta) log(m / p_S), log1p(beta expm1(u)) near. 0 where p_S = 0. What the chunked
    paths use, one vocabulary slice at a time (a second walk for sum_j w_j).
    """
    p_s, p_t = log_p_s.exp(), log_p_t.exp()
    zero = torch.zeros_like(p_s)
    if kind in ("kl", "soft_ce"):
        return torch.where(near, -p_s * torch.expm1(u), p_s - p_t)
    if kind == "reverse_kl":
        h = torch.where(near, -u, log_p_s - log_p_t)
    elif kind == "jsd":
        weighted = (1.0 - beta) * p_s
        log_m = torch.log(beta * p_t + weighted)
        far_h = torch.where(weighted > 0, (1.0 - beta) * (log_p_s - log_m), zero)
        h = torch.where(near, -(1.0 - beta) * torch.log1p(beta * torch.expm1(u)), far_h)
    else:
        raise ValueError(f"kind must be one of {KD_KINDS}, got {kind!r}")
    return torch.where(p_s > 0, p_s * h, zero)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk: tuple[torch.Tensor, torch.Tensor] | None = None,
    topk_remainder: str = "renormalize",
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

    Shapes: student (..., C); teacher (..., C) or (K, ..., C); mask and labels (...). Or a
    sparse teacher ``teacher_topk=(indices, logprobs)``, both (..., k): "renormalize" and
    "spread" through ``topk_teacher_logits``, "bucket" through ``topk_bucket_row_losses``.
    Returns a float32 scalar (float64 for float64 input), or shape (...) for "none".
    """
    row_shape = student_logits.shape[:-1]
    num_classes = student_logits.shape[-1]
    student = student_logits.reshape(-1, num_classes)
    bucket = None
    if teacher_topk is not None and topk_remainder == "bucket":
        k = teacher_topk[0].shape[-1]
        bucket = (teacher_topk[0].reshape(-1, k), teacher_topk[1].reshape(-1, k))
        teacher_logits = student_logits.detach()[None]  # a placeholder, never read
    elif teacher_topk is not None:
        teacher_logits = topk_teacher_logits(*teacher_topk, num_classes, topk_remainder)
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
    soft_options = dict(temperature=temperature, kind=kind, beta=beta, scale_t2=scale_t2)
    if bucket is None:
        soft_rows = kd_row_losses(student[index], teacher[:, index], **soft_options)
    else:
        soft_rows = topk_bucket_row_losses(
            student[index], bucket[0][index], bucket[1][index], **soft_options
        )
    rows = soft_weight * soft_rows
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


TOPK_REMAINDERS = ("renormalize", "spread", "bucket")


def topk_missing_logmass(logprobs: torch.Tensor, num_classes: int) -> torch.Tensor:
    """log r, r = 1 - sum_k exp(logprobs): the teacher's mass outside its top k, (..., 1).

    -inf when k = C or r <= k * eps(dtype of logprobs): a remainder that small is the rounding
    of the stored log-probabilities, not mass (at t > 1 it would otherwise grow into a visible
    floor). Float32 (float64 for float64 input); NaN in the logprobs stays NaN.
    """
    dtype = _compute_dtype(logprobs)
    k = logprobs.shape[-1]
    if k == num_classes:
        shape = (*logprobs.shape[:-1], 1)
        return torch.full(shape, -math.inf, dtype=dtype, device=logprobs.device)
    missing = 1.0 - logprobs.to(dtype).exp().sum(dim=-1, keepdim=True)
    rounding = k * torch.finfo(logprobs.dtype).eps
    # where, not clamp: NaN in the logprobs stays NaN.
    return torch.log(torch.where(missing <= rounding, torch.zeros_like(missing), missing))


def topk_remainder_logprob(
    logprobs: torch.Tensor, num_classes: int, remainder: str
) -> torch.Tensor:
    """The log-probability every class outside a row's top k gets, shape (..., 1).

    ``"renormalize"``: -inf (no mass; softmax renormalises the top k). ``"spread"``: the
    missing mass r (``topk_missing_logmass``) split evenly, log(r / (C - k)). ``"bucket"`` has
    no per-class constant (see ``topk_bucket_teacher_logits``). Float32 (float64 for float64
    input).
    """
    if remainder == "bucket":
        raise ValueError("topk_remainder='bucket' depends on the student: no constant remainder")
    if remainder == "renormalize":
        dtype = _compute_dtype(logprobs)
        shape = (*logprobs.shape[:-1], 1)
        return torch.full(shape, -math.inf, dtype=dtype, device=logprobs.device)
    k = logprobs.shape[-1]
    return topk_missing_logmass(logprobs, num_classes) - math.log(max(num_classes - k, 1))


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


def topk_outside(indices: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(..., C) bool, True on the classes outside each row's top k."""
    outside = torch.ones(
        (*indices.shape[:-1], num_classes), dtype=torch.bool, device=indices.device
    )
    return outside.scatter_(-1, indices, False)


def topk_bucket_row_losses(
    student: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    *,
    temperature: float,
    kind: str,
    beta: float,
    scale_t2: bool,
) -> torch.Tensor:
    """Soft loss of each row against a sparse teacher whose missing mass is one extra class
    (``topk_remainder="bucket"``), from the coarse-grained definition.

    Shapes: student (R, C) logits, indices and logprobs (R, k). With a = student / t, the
    student's (k + 1)-class distribution is (q_i for i in the top k, Q_R), q = softmax(a),
    Q_R = sum of q outside the top k = exp(lse_rest(a) - lse(a)) (a masked log-sum-exp: no
    cancellation). The teacher's is p = softmax([logprobs, log r] / t), r = 1 - sum
    exp(logprobs) (``topk_missing_logmass``): at t = 1 the teacher's top k and its missing mass
    as they are; at t != 1 the bucket is tempered as one class. The row loss is the ``kind``'s
    divergence between p and the student's (k + 1) classes (``kd_class_terms``, plain
    log-probability forms), times t^2 when ``scale_t2``. Float32 (float64 for float64 input).
    """
    dtype = _compute_dtype(student)
    a = student.to(dtype) / temperature
    lse_a = torch.logsumexp(a, dim=-1, keepdim=True)
    outside = topk_outside(indices, a.shape[-1])
    rest = torch.where(outside, a, torch.full_like(a, -math.inf))
    # Rows with no class outside (k = C) or none with mass: logsumexp of all -inf has a NaN
    # gradient, so those rows take a finite stand-in and -inf afterwards.
    empty = ~(rest > -math.inf).any(dim=-1, keepdim=True)
    safe_rest = torch.where(empty, torch.zeros_like(rest), rest)
    lse_rest = torch.logsumexp(safe_rest, dim=-1, keepdim=True)
    lse_rest = torch.where(empty, torch.full_like(lse_rest, -math.inf), lse_rest)
    log_q = torch.cat([a.gather(-1, indices) - lse_a, lse_rest - lse_a], dim=-1)
    log_r = topk_missing_logmass(logprobs.detach(), student.shape[-1]).to(dtype)
    log_p = torch.cat([logprobs.detach().to(dtype), log_r], dim=-1) / temperature
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    rows = kd_class_terms(log_q, log_p, kind=kind, beta=beta).sum(dim=-1)
    return rows * (temperature * temperature) if scale_t2 else rows


def topk_bucket_teacher_logits(
    student: torch.Tensor,
    indices: torch.Tensor,
    logprobs: torch.Tensor,
    temperature: float,
    log_r: torch.Tensor | None = None,
    lse_rest: torch.Tensor | None = None,
) -> torch.Tensor:
    """A dense, detached teacher (..., C) in logit form whose kd_loss equals the bucket loss
    (``topk_bucket_row_losses``) for kl, reverse_kl and jsd, and whose gradient (the teacher
    held constant) equals the bucket loss's gradient. (soft_ce against it would add p_B times
    the entropy of q outside the top k: soft_ce is taken as kl + ``topk_bucket_teacher_entropy``.)

    T_i = logprobs_i on the top k; outside, T_c = log r + s_c - t lse_rest(s / t), so that
    softmax(T / t) gives the top k the bucket teacher's p_i and the other classes p_B q_c / Q_R:
    the ratio p_T / p_S is the constant p_B / Q_R there, and an f-divergence sum_c q_c
    f(p_c / q_c) (kl, reverse_kl, jsd) then sums the other classes into Q_R f(p_B / Q_R), the
    bucket's term; its derivative in q_c depends only on that ratio, so the gradient agrees
    too. Where the student has no mass outside (lse_rest = -inf) and r > 0 the other classes
    share the bucket's tempered mass evenly (T_c = log r - t log(C - k)): every f-divergence
    term of a class with q_c = 0 is linear in p_c, so the sum is again the bucket's (+inf for
    kl and soft_ce; finite for reverse_kl and jsd).

    student (..., C) logits, indices and logprobs (..., k); ``log_r`` (..., 1) and ``lse_rest``
    (..., 1) = lse over the classes outside the top k of student / t, computed here when None
    (the chunked path passes them in). Float32 (float64 for float64 input), no gradient.
    """
    dtype = _compute_dtype(student)
    student = student.detach().to(dtype)
    num_classes = student.shape[-1]
    if log_r is None:
        log_r = topk_missing_logmass(logprobs.detach(), num_classes)
    if lse_rest is None:
        lse_rest = topk_rest_logsumexp(student, indices, temperature)
    num_rest = num_classes - indices.shape[-1]
    dense = topk_bucket_rest_logits(student, log_r, lse_rest, temperature, num_rest)
    return dense.scatter_(-1, indices, logprobs.detach().to(dtype))


def topk_rest_logsumexp(
    student: torch.Tensor, indices: torch.Tensor, temperature: float
) -> torch.Tensor:
    """lse over the classes outside the top k of student / t, (..., 1), -inf when there are
    none or none has mass. No gradient (float32, float64 for float64 input)."""
    a = student.detach().to(_compute_dtype(student)) / temperature
    outside = topk_outside(indices, a.shape[-1])
    return torch.where(outside, a, -math.inf).logsumexp(dim=-1, keepdim=True)


def topk_bucket_rest_logits(
    student: torch.Tensor,
    log_r: torch.Tensor,
    lse_rest: torch.Tensor,
    temperature: float,
    num_rest: int,
) -> torch.Tensor:
    """The bucket teacher's logits log r + s_c - t lse_rest for student logits s (..., w) (a
    row or a vocabulary slice of it); in rows whose lse_rest is -inf, log r - t log(num_rest)
    (the bucket's tempered mass r^(1/t) spread evenly). Rows and lse_rest, log_r (..., 1)."""
    student = student.to(lse_rest.dtype)
    has_rest = lse_rest > -math.inf
    shift = torch.where(has_rest, log_r - temperature * lse_rest, 0.0)
    spread = log_r - temperature * math.log(max(num_rest, 1))
    return torch.where(has_rest, student + shift, spread)


def topk_bucket_teacher_entropy(
    logprobs: torch.Tensor, num_classes: int, temperature: float
) -> torch.Tensor:
    """H(p) = -sum p log p of the bucket teacher's k + 1 classes (see
    ``topk_bucket_row_losses``), (...,), 0 log 0 = 0: bucket soft_ce = bucket kl + H(p), and
    kl has soft_ce's gradient. No gradient; float32 (float64 for float64 input)."""
    dtype = _compute_dtype(logprobs)
    log_r = topk_missing_logmass(logprobs.detach(), num_classes)
    log_p = torch.cat([logprobs.detach().to(dtype), log_r], dim=-1) / temperature
    log_p = log_p - torch.logsumexp(log_p, dim=-1, keepdim=True)
    return -_plogp_ratio(log_p.exp(), log_p, torch.zeros_like(log_p)).sum(dim=-1)


def fused_linear_kd_loss(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    student_bias: torch.Tensor | None = None,
    transform: object | None = None,
    **kd_options,
) -> torch.Tensor:
    """The unfused spec of ``kd_kernels.fused_linear_kd_loss``: the student's logits
    h @ W^T + b materialised whole (through the head's ``transform``: logit scale and
    soft-cap, see kd_kernels._logit_transform), then ``kd_loss``. Shapes: hidden (..., H),
    weight (V, H), bias (V,), teacher logits (..., V) or (K, ..., V), or ``teacher_topk``
    (and ``topk_remainder``) in ``kd_options``."""
    logits = torch.nn.functional.linear(student_hidden, student_weight, student_bias)
    if transform is not None:
        logits = transform.apply(logits)
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
