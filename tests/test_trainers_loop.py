"""kd_trainers.trainer.run_stage on a toy model: the batches it trains on (each epoch its own
order, accumulation, max_steps), the schedule, and resume at any step."""

import json

import pytest
import torch
from torch import nn

from kd_trainers import trainer
from kd_trainers.config import TrainConfig
from kd_trainers.trainer import (
    STOP_AFTER_ENV,
    Runtime,
    Stage,
    run_stage,
    shuffled_batches,
    stage_dir,
)


def toy_runtime(tmp_path, **overrides) -> Runtime:
    config = TrainConfig(output_dir=str(tmp_path), progress=False, log_every=1, **overrides)
    tmp_path.mkdir(parents=True, exist_ok=True)
    return Runtime(config, "toy", tmp_path, torch.device("cpu"))


def plan(epoch: int) -> list[list[int]]:
    return shuffled_batches(10, 3, seed=5, epoch=epoch)  # 4 batches: 3, 3, 3, 1


def train(runtime: Runtime, epochs: float, seen: list | None = None) -> nn.Linear:
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    inputs = torch.randn(10, 4)

    def loss_fn(wrapped, batch):
        if seen is not None:
            seen.append(list(batch))
        out = wrapped(inputs[batch]) + 0.01 * torch.randn(len(batch), 1)  # uses the RNG
        return out.pow(2).mean(), {"size": torch.tensor(float(len(batch)))}

    run_stage(runtime, Stage("toy", epochs, 0.1), model, loss_fn, plan)
    return model


def test_every_epoch_has_its_own_order(tmp_path):
    seen: list = []
    train(toy_runtime(tmp_path), 3, seen)
    assert seen == plan(0) + plan(1) + plan(2)
    assert plan(0) != plan(1) != plan(2)
    assert sorted(i for batch in plan(1) for i in batch) == list(range(10))


def test_length_grouped_batches_cover_once_and_pad_less():
    """group_by_length: every index once per epoch, one short batch at most, batches sorted
    within their group of LENGTH_GROUP_BATCHES, much less padding than random batches, and
    still a seeded order of its own per epoch."""
    size, batch = 1000, 8
    generator = torch.Generator().manual_seed(3)
    lengths = torch.randint(5, 300, (size,), generator=generator).tolist()
    epochs = [shuffled_batches(size, batch, 11, epoch, lengths) for epoch in range(3)]
    for batches in epochs:
        assert sorted(i for b in batches for i in b) == list(range(size))
        assert sum(len(b) < batch for b in batches) <= 1
        assert all(len(b) <= batch for b in batches)
    assert epochs[0] != epochs[1] != epochs[2]
    assert epochs[0] == shuffled_batches(size, batch, 11, 0, lengths)

    def padded(batches):  # tokens a batch pads to, summed over the epoch
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    plain = shuffled_batches(size, batch, 11, 0)
    # No padding at all would be sum(lengths) = 0.57 x plain; grouped is within 7% of it.
    assert sum(lengths) <= padded(epochs[0]) < 1.07 * sum(lengths) < 0.65 * padded(plain)
    # Which examples share a group is the epoch's permutation: the first group holds the
    # first LENGTH_GROUP_BATCHES * batch entries of the plain order.
    group = {i for b in plain[: trainer.LENGTH_GROUP_BATCHES] for i in b}
    grouped = [b for b in epochs[0] if set(b) <= group]
    assert sum(len(b) for b in grouped) == len(group)
    for b in grouped:
        assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    with pytest.raises(ValueError, match="lengths has 999 entries"):
        shuffled_batches(size, batch, 11, 0, lengths[:-1])


def test_accumulation_and_max_steps(tmp_path):
    seen: list = []
    train(toy_runtime(tmp_path, grad_accum=3, max_steps=3), 5, seen)
    # 4 batches per epoch, 3 per step: steps (b0 b1 b2), (b3), then epoch 1's (b0 b1 b2).
    assert seen == plan(0) + plan(1)[:3]
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3


@pytest.mark.parametrize("stop", [1, 3, 4, 6, 9])  # inside epoch 0, at and after boundaries
def test_resume_at_any_step_is_exact(tmp_path, monkeypatch, stop):
    whole = train(toy_runtime(tmp_path / "whole"), 3)
    monkeypatch.setenv(STOP_AFTER_ENV, f"toy:{stop}")
    with pytest.raises(KeyboardInterrupt):
        train(toy_runtime(tmp_path / "killed"), 3)
    saved = torch.load(
        stage_dir(toy_runtime(tmp_path / "killed"), "toy") / "checkpoint.pt", weights_only=False
    )
    assert saved["step"] == stop
    monkeypatch.delenv(STOP_AFTER_ENV)
    resumed = train(toy_runtime(tmp_path / "killed", resume=True), 3)
    assert torch.equal(whole.weight, resumed.weight) and torch.equal(whole.bias, resumed.bias)


def test_linear_warmup_then_decay(tmp_path):
    train(toy_runtime(tmp_path, warmup_ratio=0.25), 2)  # 8 steps, 2 of warmup
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    expected = [0.1 * f for f in (2 / 3, 1.0, 5 / 6, 4 / 6, 3 / 6, 2 / 6, 1 / 6, 0.0)]
    assert lrs == pytest.approx(expected)
