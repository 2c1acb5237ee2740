"""``teacher_head=linear``: a frozen teacher encoder with a head fitted on its pooled outputs.

No teacher fine-tuning: the encoder's pooled vectors X (N, D) of the training set are computed
once (eval mode, no gradients) and the head is fitted in float64 on standardized features
Z = (X - mu) / sigma, then folded back so that it applies to X directly:

    classification  multinomial logistic regression,
                    min_{W, b} mean_n CE(W z_n + b, y_n) + l2/2 ||W||^2   (LBFGS, convex);
    regression      ridge, W = (Z^T Z / N + l2 I)^-1 Z^T (y - mean y) / N, b = mean y.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.nn import functional as F

from kd_trainers.errors import ConfigError
from kd_trainers.models import Head, SequenceModel, by_length, encode, in_order

TEACHER_HEADS = ("finetune", "linear")


@torch.no_grad()
def pooled_features(
    model: SequenceModel, tokenizer, examples: Sequence, *, max_length: int, batch_size: int, device
) -> torch.Tensor:
    """The encoder's pooled sentence vectors (N, D) float32 on the CPU, in eval mode."""
    was_training = model.training
    model.eval()
    chunks, batches = [], by_length(examples, batch_size)
    for batch in batches:
        inputs = encode(tokenizer, [examples[i] for i in batch], max_length, device)
        chunks.append(model.embed(inputs).float().cpu())
    model.train(was_training)
    return in_order(chunks, batches)


def fit_logistic(
    features: torch.Tensor, labels: torch.Tensor, classes: int, l2: float, max_iter: int = 200
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, D), b (C,)) float64 of L2-regularized multinomial logistic regression on
    ``features`` (N, D) and int ``labels`` (N,)."""
    x = features.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight.T + bias, labels) + 0.5 * l2 * weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    folded = weight.detach() / std
    return folded, bias.detach() - folded @ mean


def fit_ridge(
    features: torch.Tensor, targets: torch.Tensor, l2: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (1, D), b (1,)) float64 of ridge regression of ``targets`` (N,) on ``features``."""
    x, y = features.double(), targets.double()
    mean, std = x.mean(0), x.std(0, unbiased=False).clamp_min(1e-8)
    z = (x - mean) / std
    gram = z.T @ z / len(z) + l2 * torch.eye(z.shape[1], dtype=torch.float64)
    w = torch.linalg.solve(gram, z.T @ (y - y.mean()) / len(z)) / std
    return w[None], (y.mean() - w @ mean)[None]


def fit_linear_head(
    model: SequenceModel,
    head: Head,
    tokenizer,
    examples: Sequence,
    *,
    l2: float,
    max_length: int,
    batch_size: int,
    device,
    features: torch.Tensor | None = None,
) -> dict[str, float]:
    """Fits ``model``'s ``head`` on the frozen encoder's pooled outputs of ``examples``
    (labels or scores); the encoder is not touched. ``features``: those outputs (N, D), when
    the caller already has them. Returns the fit's training metric."""
    if l2 < 0:
        raise ConfigError(f"linear_head_l2 must be >= 0, got {l2}")
    if features is not None and features.shape[0] != len(examples):
        raise ValueError(f"features has {features.shape[0]} rows for {len(examples)} examples")
    x = features
    if x is None:
        x = pooled_features(
            model, tokenizer, examples, max_length=max_length, batch_size=batch_size, device=device
        )
    if head.kind == "regression":
        y = torch.tensor([e.score for e in examples], dtype=torch.float64)
        weight, bias = fit_ridge(x, y, l2)
        fitted = x.double() @ weight[0] + bias
        metric = {"train_mse": float((fitted - y).square().mean())}
    else:
        y = torch.tensor([e.label for e in examples])
        weight, bias = fit_logistic(x, y, head.num_outputs, l2)
        metric = {
            "train_accuracy": float(
                ((x.double() @ weight.T + bias).argmax(-1) == y).double().mean()
            )
        }
    linear = model.head(head.name)
    with torch.no_grad():
        linear.weight.copy_(weight.to(linear.weight))
        linear.bias.copy_(bias.to(linear.bias))
    return metric
