"""kd-train scal end to end on tiny random models: supervised SCAL on 64 real Rotten Tomatoes
snippets (plain / adversarial / SCAL, scored clean and under FGM and PGD attacks) and
unsupervised USCAL on Wikipedia sentences (scored by Spearman on the Lee pairs)."""

import pytest
import torch
from trainer_runs import TINY_SCAL, final_weights, losses, metric_lines, run, summary

import kd_kernels
from kd_trainers.trainer import STOP_AFTER_ENV


@pytest.fixture(scope="module")
def scal_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("scal")
    assert run("scal", output, *TINY_SCAL) == 0
    return output


def test_supervised_results(scal_run):
    result = summary(scal_run)
    assert result["mode"] == "supervised" and result["train_examples"] == 64
    for model in ("plain", "adversarial", "scal"):
        scores = result[model]
        assert set(scores) == {"clean", "fgm", "pgd"}
        assert all(0.0 <= value <= 1.0 for value in scores.values())
        # The attacks push every example towards a wrong label: they cost accuracy.
        assert scores["fgm"] <= scores["clean"] and scores["pgd"] <= scores["clean"]


def test_terms_logged_per_variant(scal_run):
    assert set(metric_lines(scal_run, "plain")[0]) >= {"ce"}
    assert "ce_adversarial" in metric_lines(scal_run, "adversarial")[0]
    assert "info_nce" not in metric_lines(scal_run, "adversarial")[0]
    assert {"ce", "ce_adversarial", "info_nce"} <= set(metric_lines(scal_run, "scal")[0])


@pytest.mark.parametrize("stage", ["plain", "adversarial", "scal"])
def test_losses_fall(scal_run, stage):
    values = losses(scal_run, stage)
    assert len(values) == 8 and sum(values[-3:]) < sum(values[:3]), values


def test_unsupervised_uscal(tmp_path, cache_dir):
    args = [*TINY_SCAL, "--mode=unsupervised", "--unlabeled-data=wiki_sentences", "--max-train=96"]
    assert run("scal", tmp_path, *args) == 0
    result = summary(tmp_path)
    for model in ("start", "simcse", "uscal"):
        assert -1.0 <= result[model]["lee_spearman"] <= 1.0
    assert "info_nce_adversarial" in metric_lines(tmp_path, "uscal")[0]
    assert "info_nce_adversarial" not in metric_lines(tmp_path, "simcse")[0]
    values = losses(tmp_path, "uscal")
    assert sum(values[-3:]) < sum(values[:3]), values


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
)
def test_fused_info_nce_matches_torch(tmp_path, cache_dir, backend):
    common = [*TINY_SCAL, "--max-steps=3"]
    assert run("scal", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("scal", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    for key in ("loss", "info_nce"):
        reference = losses(tmp_path / "torch", "scal", key)
        assert len(reference) == 3
        torch.testing.assert_close(
            losses(tmp_path / backend, "scal", key), reference, rtol=2e-4, atol=1e-6
        )


def test_resume_mid_scal(tmp_path, cache_dir, monkeypatch):
    assert run("scal", tmp_path / "whole", *TINY_SCAL) == 0
    monkeypatch.setenv(STOP_AFTER_ENV, "scal:3")
    assert run("scal", tmp_path / "killed", *TINY_SCAL) == 130
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("scal", tmp_path / "killed", *TINY_SCAL, "--resume") == 0
    whole, resumed = (
        final_weights(tmp_path / "whole", "scal"),
        final_weights(tmp_path / "killed", "scal"),
    )
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--mode=semi"], "mode must be supervised or unsupervised"),
        (["--epsilon=0"], "epsilon and attack_epsilon must be > 0"),
        (["--mode=unsupervised", "--alpha=1.5"], "USCAL needs 0 <= alpha < 1"),
        (["--pgd-steps=0"], "pgd_steps and attack_steps must be >= 1"),
    ],
)
def test_bad_configs(capsys, tmp_path, argv, fragment):
    assert run("scal", tmp_path, *TINY_SCAL, *argv) == 2
    assert fragment in capsys.readouterr().err
