"""Adversarial perturbations in the word-embedding space (FGM and PGD), for SCAL / USCAL
training and for the attacks that evaluate robustness.

With e (B, L, D) the word embeddings of a batch and g = dL/de masked to real tokens, FGM
takes delta = eps * g / ||g|| with the norm over each example's (L, D) entries, so every
example's perturbation has norm exactly eps. PGD takes ``steps`` such steps of size
``step_size`` from delta = 0 and projects delta back into the eps-ball after each.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def per_example_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm over every dimension but the first: (B, ...) -> (B, 1, ..., 1)."""
    norm = tensor.flatten(1).norm(dim=1)
    return norm.view(-1, *([1] * (tensor.dim() - 1)))


def embedding_perturbation(
    loss_of: Callable[[torch.Tensor], torch.Tensor] | None,
    embeddings: torch.Tensor,
    token_mask: torch.Tensor,
    epsilon: float,
    *,
    steps: int = 1,
    step_size: float | None = None,
    gradient_of: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """The perturbation delta (B, L, D) that raises ``loss_of(embeddings + delta)``.

    Args:
        loss_of: maps perturbed embeddings (B, L, D) to a scalar loss (a sum or mean over
            examples, so each example's gradient is its own).
        embeddings: (B, L, D) word embeddings; detached here, no parameter gets a gradient.
        token_mask: (B, L), nonzero for tokens that may be perturbed (padding is not).
        epsilon: the L2 radius per example, > 0.
        steps: 1 is FGM; more is PGD.
        step_size: PGD step (default ``epsilon / steps * 2``, so the ball's edge is reachable).
        gradient_of: instead of ``loss_of``, a function giving d loss / d perturbed (B, L, D)
            itself (a loss whose gradient is taken piece by piece under GradCache).

    Returns:
        delta (B, L, D), detached, in the embeddings' dtype. ||delta_b|| = epsilon for FGM
        (when the example's gradient is not zero), <= epsilon for PGD.
    """
    if epsilon <= 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    base = embeddings.detach()
    mask = token_mask.to(base.dtype).unsqueeze(-1)
    size = epsilon if steps == 1 else (step_size or 2.0 * epsilon / steps)
    delta = torch.zeros_like(base)
    for _ in range(steps):
        if gradient_of is not None:
            gradient = gradient_of(base + delta)
        else:
            assert loss_of is not None
            delta.requires_grad_(True)
            with torch.enable_grad():
                (gradient,) = torch.autograd.grad(loss_of(base + delta), delta)
        gradient = gradient * mask
        step = size * gradient / per_example_norm(gradient).clamp_min(1e-12)
        delta = delta.detach() + step
        # Projection onto the eps-ball: shrink only the examples that left it.
        delta = delta * (epsilon / per_example_norm(delta).clamp_min(epsilon))
    return delta.detach()
