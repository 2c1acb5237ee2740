"""kd_trainers.adversarial: FGM/PGD perturbations in the word-embedding space have norm eps per
example, leave padding alone, and raise the loss they were computed from."""

import pytest
import torch
from torch.nn import functional as F

from kd_trainers.adversarial import embedding_perturbation, per_example_norm
from kd_trainers.data import Example
from kd_trainers.models import Head, build_model, encode, load_tokenizer
from kd_trainers.scal import split_inputs

TEXTS = ["a quiet , moving film", "dull", "the plot never lands but the cast is great fun", "ok"]


@pytest.fixture(scope="module")
def batch():
    tokenizer = load_tokenizer("tiny")
    model = build_model(
        "tiny:2x64",
        [Head("task", 2)],
        vocab_size=len(tokenizer),
        pooling="mean",
        scores=False,
        seed=0,
    ).eval()
    inputs = encode(tokenizer, [Example(t) for t in TEXTS], 32, torch.device("cpu"))
    embeddings, rest = split_inputs(model, inputs)
    labels = torch.tensor([0, 1, 0, 1])

    def per_example_loss(perturbed):
        logits = model.head()(model.embed({**rest, "inputs_embeds": perturbed}))
        return F.cross_entropy(logits, labels, reduction="none")

    return embeddings.detach(), inputs["attention_mask"], per_example_loss


@pytest.mark.parametrize("epsilon", [0.01, 0.1, 0.5])
def test_fgm_has_norm_epsilon_per_example_and_raises_each_loss(batch, epsilon):
    embeddings, mask, per_example_loss = batch
    delta = embedding_perturbation(lambda e: per_example_loss(e).sum(), embeddings, mask, epsilon)
    norms = per_example_norm(delta).flatten()
    torch.testing.assert_close(norms, torch.full((4,), epsilon), rtol=1e-5, atol=1e-7)
    assert (delta[mask == 0] == 0).all()  # padding is never perturbed
    before, after = per_example_loss(embeddings), per_example_loss(embeddings + delta)
    assert (after > before).all(), (before, after)


def test_pgd_stays_in_ball_and_beats_clean(batch):
    embeddings, mask, per_example_loss = batch
    total = lambda e: per_example_loss(e).sum()  # noqa: E731
    fgm = embedding_perturbation(total, embeddings, mask, 0.2)
    pgd = embedding_perturbation(total, embeddings, mask, 0.2, steps=5)
    assert (per_example_norm(pgd).flatten() <= 0.2 * (1 + 1e-5)).all()
    assert (per_example_loss(embeddings + pgd) > per_example_loss(embeddings)).all()
    # Five projected steps find at least as much loss as one step, summed over the batch.
    assert total(embeddings + pgd) >= total(embeddings + fgm) - 1e-5


def test_no_parameter_gets_a_gradient(batch):
    embeddings, mask, per_example_loss = batch
    weights = torch.nn.Parameter(torch.ones(()))
    delta = embedding_perturbation(
        lambda e: (per_example_loss(e) * weights).sum(), embeddings, mask, 0.1
    )
    assert weights.grad is None and not delta.requires_grad


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"epsilon": 0.0}, "epsilon must be > 0"),
        ({"epsilon": 0.1, "steps": 0}, "steps must be >= 1"),
    ],
)
def test_bad_arguments(batch, kwargs, message):
    embeddings, mask, per_example_loss = batch
    with pytest.raises(ValueError, match=message):
        embedding_perturbation(lambda e: per_example_loss(e).sum(), embeddings, mask, **kwargs)
