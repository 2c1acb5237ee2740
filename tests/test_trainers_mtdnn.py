"""kd-train mtdnn-kd end to end on tiny random models and three real tasks (Rotten Tomatoes,
VADER movie scores as regression, BBC topics): teachers, cached ensemble soft targets,
student with and without KD."""

import pytest
import torch
from trainer_runs import TINY_MTDNN, losses, metric_lines, run, summary, task_losses

import kd_kernels

TASKS = ("rotten_tomatoes", "vader:movie", "bbc")


@pytest.fixture(scope="module")
def mtdnn_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("mtdnn")
    assert run("mtdnn-kd", output, *TINY_MTDNN) == 0
    return output


def test_per_task_metrics_of_every_model(mtdnn_run):
    result = summary(mtdnn_run)
    assert result["distilled_tasks"] == sorted(TASKS)
    for model in ("teacher_0", "teacher_1", "ensemble", "student_alone", "student_kd"):
        assert set(result[model]) == set(TASKS)
        assert 0.0 <= result[model]["bbc"]["accuracy"] <= 1.0
        assert -1.0 <= result[model]["vader:movie"]["spearman"] <= 1.0
    assert result["tasks"]["bbc"] == {"train": 32, "eval": 24}


def test_soft_targets_cached_per_task(mtdnn_run):
    cached = torch.load(mtdnn_run / "soft_targets.pt")
    assert cached["rotten_tomatoes"].shape == (2, 32, 2)
    assert cached["bbc"].shape == (2, 32, 5)
    assert cached["vader:movie"].shape == (2, 32)
    assert torch.isfinite(cached["bbc"]).all()


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("stage", ["teacher_0", "teacher_1", "student_alone", "student_kd"])
def test_each_task_loss_falls(mtdnn_run, stage, task):
    values = task_losses(mtdnn_run, stage, task)
    assert len(values) == 6  # 32 examples / 16 per batch x 3 epochs
    assert sum(values[-2:]) / 2 < sum(values[:2]) / 2, values


def test_batches_hold_one_task_and_cover_all(mtdnn_run):
    """6 single-task batches per epoch (2 per task): 18 steps in the 3 student epochs."""
    lines = metric_lines(mtdnn_run, "student_kd")
    assert [line["step"] for line in lines] == list(range(1, 19))
    assert all(sum(key.startswith("loss[") for key in line) == 1 for line in lines)


def test_task_without_teacher_and_cached_form(tmp_path, cache_dir):
    """teacher_tasks leaves bbc to hard labels; kd_form=cached gives the ensemble's losses."""
    common = [*TINY_MTDNN, "--teacher-tasks=rotten_tomatoes,vader:movie", "--baseline=false"]
    assert run("mtdnn-kd", tmp_path / "ensemble", *common) == 0
    assert run("mtdnn-kd", tmp_path / "cached", *common, "--kd-form=cached") == 0
    assert summary(tmp_path / "ensemble")["distilled_tasks"] == ["rotten_tomatoes", "vader:movie"]
    assert "bbc" not in torch.load(tmp_path / "cached" / "soft_targets.pt")
    torch.testing.assert_close(
        losses(tmp_path / "cached", "student_kd"),
        losses(tmp_path / "ensemble", "student_kd"),
        rtol=1e-4,
        atol=1e-6,
    )


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
)
def test_fused_backend_matches_torch(tmp_path, cache_dir, backend):
    common = [*TINY_MTDNN, "--baseline=false", "--num-teachers=1", "--max-steps=4"]
    assert run("mtdnn-kd", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("mtdnn-kd", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    reference = losses(tmp_path / "torch", "student_kd")
    assert len(reference) == 4
    torch.testing.assert_close(
        losses(tmp_path / backend, "student_kd"), reference, rtol=2e-4, atol=1e-6
    )
