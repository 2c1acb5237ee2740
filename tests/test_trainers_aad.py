"""kd-train aad end to end on tiny random models and 64 real VADER sentences per domain
(movie -> amazon): alternating discriminator / encoder steps, the KD term only where it
belongs, results for every model, resume, backends, errors."""

import pytest
import torch
from trainer_runs import TINY_AAD, final_weights, losses, metric_lines, run, summary

import kd_kernels
from kd_trainers.aad import AADConfig, Adaptation
from kd_trainers.data import Example
from kd_trainers.models import Head, build_model, encode, load_tokenizer
from kd_trainers.trainer import STOP_AFTER_ENV


@pytest.fixture(scope="module")
def aad_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("aad")
    assert run("aad", output, *TINY_AAD) == 0
    return output


def test_results_for_every_model(aad_run):
    result = summary(aad_run)
    for model in (
        "source_in_domain",
        "source_only",
        "aad",
        "adversarial_only",
        "target_supervised",
    ):
        assert 0.0 <= result[model]["accuracy"] <= 1.0
    assert result["examples"] == {"source_train": 64, "target_train": 64, "target_eval": 32}
    assert (aad_run / "target_model" / "heads.pt").is_file()


def test_source_and_ceiling_losses_fall(aad_run):
    for stage in ("source", "target_supervised"):
        values = losses(aad_run, stage)
        assert len(values) == 8 and sum(values[-3:]) < sum(values[:3]), values


def test_steps_alternate_discriminator_then_encoder(aad_run):
    """4 target batches per epoch, each a D step then an E_t step: 16 steps in 2 epochs."""
    lines = metric_lines(aad_run, "adapt")
    assert [line["step"] for line in lines] == list(range(1, 17))
    assert all("discriminator" in line for line in lines[0::2])
    assert all("adversarial" in line and "kd" in line for line in lines[1::2])
    assert all(line["kd"] >= 0 for line in lines[1::2])
    ablation = metric_lines(aad_run, "adapt_no_kd")
    assert not any("kd" in line for line in ablation) and len(ablation) == 16


def tiny_source():
    tokenizer = load_tokenizer("tiny")
    model = build_model(
        "tiny:2x64",
        [Head("sentiment", 2)],
        vocab_size=len(tokenizer),
        pooling="mean",
        scores=False,
        seed=0,
    )
    return tokenizer, model


def test_each_step_moves_only_its_player():
    tokenizer, source = tiny_source()
    adaptation = Adaptation(
        source, AADConfig(temperature=20.0, loss_backend="torch"), kd_weight=1.0
    )
    texts = [Example("good film"), Example("awful, slow and long")]
    inputs = encode(tokenizer, texts, 16, torch.device("cpu"))
    for kind, moving in (("discriminator", "discriminator."), ("encoder", "target.encoder.")):
        adaptation.zero_grad(set_to_none=True)
        loss, _ = adaptation(kind, inputs, inputs)
        loss.backward()
        with_grad = {n for n, p in adaptation.named_parameters() if p.grad is not None}
        assert with_grad and all(name.startswith(moving) for name in with_grad), (kind, with_grad)
    assert not any(p.requires_grad for p in adaptation.target.heads.parameters())
    assert all(p.grad is None for p in source.parameters())


def test_kd_term_is_t_squared_kl_of_source_to_target():
    tokenizer, source = tiny_source()
    adaptation = Adaptation(
        source, AADConfig(temperature=20.0, loss_backend="torch"), kd_weight=1.0
    ).eval()
    with torch.no_grad():
        for p in adaptation.target.encoder.parameters():
            p.add_(0.05 * torch.randn_like(p))
    inputs = encode(tokenizer, [Example("good"), Example("bad and slow")], 16, torch.device("cpu"))
    _, logs = adaptation("encoder", inputs, inputs)
    teacher = source.head()(source.embed(inputs)) / 20
    student = adaptation.target.head()(adaptation.target.embed(inputs)) / 20
    # In float64: at t = 20 the two distributions are close, and eager fp32 kl_div loses ~0.4%
    # to cancellation where kd_loss's log-ratio form does not.
    student, teacher = student.double(), teacher.double()
    expected = 400 * torch.nn.functional.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(logs["kd"].double(), expected.detach(), rtol=1e-4, atol=1e-7)
    assert logs["kd"] > 0


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
)
def test_fused_kd_matches_torch(tmp_path, cache_dir, backend):
    common = [*TINY_AAD, "--ablation=false", "--ceiling=false", "--max-steps=4"]
    assert run("aad", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("aad", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    for key in ("loss", "kd"):
        reference = [line[key] for line in metric_lines(tmp_path / "torch", "adapt") if key in line]
        fused = [line[key] for line in metric_lines(tmp_path / backend, "adapt") if key in line]
        assert len(reference) >= 2
        # At t = 20 the KL of two near-equal distributions is a difference of nearly equal
        # fp32 logs, scaled by t^2 = 400: the two summation orders differ by ~400 x fp32 eps.
        torch.testing.assert_close(fused, reference, rtol=2e-4, atol=400 * 1.2e-7)


def test_resume_mid_adaptation(tmp_path, cache_dir, monkeypatch):
    common = [*TINY_AAD, "--ablation=false", "--ceiling=false"]
    assert run("aad", tmp_path / "whole", *common) == 0
    monkeypatch.setenv(STOP_AFTER_ENV, "adapt:5")  # after a discriminator step
    assert run("aad", tmp_path / "killed", *common) == 130
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("aad", tmp_path / "killed", *common, "--resume") == 0
    whole, resumed = (
        final_weights(tmp_path / "whole", "adapt"),
        final_weights(tmp_path / "killed", "adapt"),
    )
    assert all(torch.equal(whole[name], resumed[name]) for name in whole)
    assert summary(tmp_path / "killed")["aad"] == summary(tmp_path / "whole")["aad"]


def test_unlabelled_target_file(tmp_path, cache_dir):
    target = tmp_path / "target.jsonl"
    target.write_text(
        "".join(f'{{"text": "an unlabelled product review number {i}"}}\n' for i in range(32))
    )
    args = [*TINY_AAD, f"--target={target}", "--target-labels=false", "--max-steps=2"]
    assert run("aad", tmp_path / "run", *args) == 0
    result = summary(tmp_path / "run")
    assert "source_in_domain" in result and "aad" not in result
    assert result["examples"]["target_train"] == 32


def test_same_source_and_target_is_an_error(capsys, tmp_path):
    assert run("aad", tmp_path, *TINY_AAD, "--target=vader:movie") == 2
    assert "source and target are the same data" in capsys.readouterr().err
