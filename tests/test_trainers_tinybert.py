"""kd-train tinybert end to end on tiny random models and 64 real Rotten Tomatoes examples:
every stage's loss falls, results are written, fused and reference losses agree step by
step, and a killed run resumes to the same weights as one that never stopped."""

import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from trainer_runs import TINY_TINYBERT, final_weights, losses, metric_lines, run, summary

import kd_kernels
from kd_trainers.trainer import STOP_AFTER_ENV

FAST = [
    *TINY_TINYBERT,
    "--teacher-lr=1e-3",
    "--student-lr=1e-3",
    "--teacher-epochs=2",
    "--student-epochs=2",
]
STAGES = ("teacher", "student_alone", "intermediate", "prediction")


@pytest.fixture(scope="module")
def tinybert_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("tinybert")
    assert run("tinybert", output, *FAST) == 0
    return output


@pytest.mark.parametrize("stage", STAGES)
def test_stage_loss_falls(tinybert_run, stage):
    values = losses(tinybert_run, stage)
    assert len(values) >= 6
    assert sum(values[-3:]) / 3 < sum(values[:3]) / 3, values


def test_layer_losses_logged_and_falling(tinybert_run):
    for key in ("attention_mse", "hidden_mse"):
        values = losses(tinybert_run, "intermediate", key)
        assert all(v > 0 for v in values)
        assert values[-1] < values[0]


def test_results_written(tinybert_run):
    result = summary(tinybert_run)
    assert result["method"] == "tinybert"
    assert (result["train_examples"], result["augmented_examples"]) == (64, 128)
    assert result["eval_examples"] == 32
    for model in ("teacher", "student_alone", "student_distilled"):
        assert 0.0 <= result[model]["accuracy"] <= 1.0
        assert 0.0 <= result[model]["macro_f1"] <= 1.0
    steps = result["distill_training"]["intermediate"]["steps"]
    assert steps == 16  # 128 augmented examples / 16 per batch x 2 epochs
    saved = yaml.safe_load((tinybert_run / "config.yaml").read_text())
    assert saved["max_train"] == 64 and saved["teacher"] == "tiny:4x64"
    for folder in ("teacher", "student"):
        assert (tinybert_run / folder / "config.json").is_file()
        assert (tinybert_run / folder / "heads.pt").is_file()


def test_one_metric_line_per_step(tinybert_run):
    lines = metric_lines(tinybert_run, "intermediate")
    assert [line["step"] for line in lines] == list(range(1, 17))
    assert all(line["examples_per_s"] > 0 and line["lr"] >= 0 for line in lines)


def test_saved_teacher_is_reused(tinybert_run, tmp_path):
    """A teacher folder written by a run (with its head) is taken as already fine-tuned."""
    output = tmp_path / "again"
    args = [*FAST, f"--teacher={tinybert_run / 'teacher'}", "--baseline=false", "--max-steps=1"]
    assert run("tinybert", output, *args) == 0
    assert not (output / "stages" / "teacher").exists()
    assert summary(output)["teacher"] == summary(tinybert_run)["teacher"]


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
)
def test_fused_backend_matches_torch_step_by_step(tmp_path, cache_dir, backend):
    common = [*FAST, "--baseline=false", "--teacher-epochs=1", "--max-steps=4"]
    assert run("tinybert", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("tinybert", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    for stage, keys in (
        ("intermediate", ("loss", "attention_mse", "hidden_mse")),
        ("prediction", ("loss",)),
    ):
        for key in keys:
            reference = losses(tmp_path / "torch", stage, key)
            fused = losses(tmp_path / backend, stage, key)
            assert len(reference) == 4
            torch.testing.assert_close(fused, reference, rtol=2e-4, atol=1e-6)


def test_resume_after_interrupt_reproduces_weights(tmp_path, cache_dir, monkeypatch):
    common = [*FAST, "--teacher-epochs=1", "--intermediate-epochs=1", "--prediction-epochs=1"]
    assert run("tinybert", tmp_path / "whole", *common) == 0
    killed = tmp_path / "killed"
    monkeypatch.setenv(STOP_AFTER_ENV, "intermediate:3")
    assert run("tinybert", killed, *common) == 130  # Ctrl-C: checkpoint, exit code 130
    assert (killed / "stages" / "intermediate" / "checkpoint.pt").is_file()
    assert not (killed / "stages" / "intermediate" / "final.pt").exists()
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("tinybert", killed, *common, "--resume") == 0
    assert not (killed / "stages" / "intermediate" / "checkpoint.pt").exists()
    for stage in ("intermediate", "prediction"):
        whole, resumed = final_weights(tmp_path / "whole", stage), final_weights(killed, stage)
        assert whole.keys() == resumed.keys()
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (stage, name)
    assert summary(killed)["student_distilled"] == summary(tmp_path / "whole")["student_distilled"]


def test_fresh_run_without_resume_starts_over(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv(STOP_AFTER_ENV, "teacher:2")
    assert run("tinybert", tmp_path, *FAST) == 130
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("tinybert", tmp_path, *FAST, "--max-steps=2") == 0
    assert [line["step"] for line in metric_lines(tmp_path, "teacher")] == [1, 2]


def test_general_distillation_on_wiki_sentences(tmp_path, cache_dir):
    args = [*FAST, "--mode=general", "--general-data=wiki_sentences", "--general-max=96"]
    assert run("tinybert", tmp_path, *args) == 0
    values = losses(tmp_path, "general")
    assert len(values) == 6 and values[-1] < values[0]
    assert (tmp_path / "general_student" / "config.json").is_file()
    assert "task" not in summary(tmp_path)


def test_sigterm_saves_a_checkpoint_and_resume_finishes(tmp_path, cache_dir):
    """A real signal to a real process (started in the background, where a shell would ignore
    SIGINT): the run stops with code 130 and a checkpoint, and --resume completes it."""
    args = [*FAST, "--intermediate-epochs=40", "--baseline=false", "--save-every=0"]
    command = [sys.executable, "-m", "kd_trainers", "tinybert", f"--output-dir={tmp_path}", *args]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while not (metrics.is_file() and '"intermediate"' in metrics.read_text()):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr[-2000:]
    assert b"interrupted: checkpoint of step" in stderr
    saved = torch.load(tmp_path / "stages" / "intermediate" / "checkpoint.pt", weights_only=False)
    assert saved["step"] >= 1
    resumed = [*args, "--intermediate-epochs=40", f"--max-steps={saved['step'] + 2}", "--resume"]
    assert run("tinybert", tmp_path, *resumed) == 0
    steps = [line["step"] for line in metric_lines(tmp_path, "intermediate")]
    assert steps == list(range(1, saved["step"] + 3))  # lines past the checkpoint replaced
