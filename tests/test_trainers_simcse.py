"""kd-train simcse end to end on a tiny random encoder and 64 real wiki sentences: the
contrastive loss falls, before/after Lee scores and the model are written, the supervised
form with hard negatives (M = 2N keys), fused vs reference InfoNCE step by step, exact
resume, and one-line config errors."""

import json

import pytest
import torch
from torch.nn import functional as F
from trainer_runs import TINY_SIMCSE, epoch_means, final_weights, metric_lines, run, summary

import kd_kernels
from kd_trainers.cli import main
from kd_trainers.models import load_encoder, load_tokenizer
from kd_trainers.sentence import BiEncoder, text_inputs
from kd_trainers.simcse import dropout_views_loss, hard_negative_loss
from kd_trainers.trainer import STOP_AFTER_ENV

CPU = torch.device("cpu")
BACKENDS = [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]


@pytest.fixture(scope="module")
def simcse_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("simcse")
    assert run("simcse", output, *TINY_SIMCSE) == 0
    return output


def test_loss_falls(simcse_run):
    means = epoch_means(simcse_run, "simcse", 4)  # 64 sentences / 16 per batch
    assert len(means) == 2 and means[1] < means[0] - 0.2, means


def test_results_written(simcse_run):
    result = summary(simcse_run)
    assert result["method"] == "simcse" and result["kind"] == "unsupervised"
    assert (result["train_examples"], result["pair_sets"], result["layers"]) == (
        64,
        {"lee": 200},
        2,
    )
    for phase in ("before", "after"):
        assert -1.0 <= result[phase]["lee"]["spearman"] <= 1.0
        assert -1.0 <= result[phase]["lee"]["pearson"] <= 1.0
    assert result["training"]["steps"] == 8
    assert [line["step"] for line in metric_lines(simcse_run, "simcse")] == list(range(1, 9))
    saved = simcse_run / "model"
    assert (saved / "config.json").is_file() and (saved / "tokenizer.json").is_file()
    assert json.loads((saved / "sentence.json").read_text()) == {"pooling": "mean"}


def tiny_model(pooling="mean"):
    tokenizer = load_tokenizer("tiny", "minilm")
    return tokenizer, BiEncoder(load_encoder("tiny", vocab_size=len(tokenizer)), pooling)


def test_dropout_views_without_dropout_are_identical():
    """In eval mode both views are the same vector: cosine 1, and the loss is the reference
    cross-entropy over the in-batch cosine matrix / tau."""
    tokenizer, model = tiny_model()
    inputs = text_inputs(tokenizer, ["one text", "another text here", "a third"], 16, CPU)
    model.eval()
    loss, logs = dropout_views_loss(model, inputs, temperature=0.05, backend="torch")
    assert logs["positive_cosine"].item() == pytest.approx(1.0, abs=1e-5)
    vectors = F.normalize(model(inputs), dim=-1)
    expected = F.cross_entropy(vectors @ vectors.T / 0.05, torch.arange(3))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    model.train()
    _, logs = dropout_views_loss(model, inputs, temperature=0.05, backend="torch")
    assert logs["positive_cosine"].item() < 0.9999  # dropout makes the two views differ


@pytest.mark.parametrize("backend", ["torch", *BACKENDS])
def test_hard_negatives_are_extra_keys(backend):
    """Rows [anchors; positives; negatives]: query i's positive is key i of M = 2N keys."""
    tokenizer, model = tiny_model("cls")
    model.eval()
    texts = ["a1 x", "a2 y z", "p1", "p2 w", "n1 q", "n2"]
    inputs = text_inputs(tokenizer, texts, 16, CPU)
    loss, _ = hard_negative_loss(model, inputs, 2, temperature=0.1, backend=backend)
    vectors = F.normalize(model(inputs), dim=-1)
    logits = vectors[:2] @ vectors[2:].T / 0.1  # (2, 4)
    expected = F.cross_entropy(logits, torch.arange(2))
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_supervised_from_a_user_file(tmp_path, cache_dir):
    data = tmp_path / "nli.csv"
    rows = [f"sentence {i} about cats,cats {i} here,the weather {i} today" for i in range(32)]
    data.write_text("sent0,sent1,hard_neg\n" + "\n".join(rows) + "\n")
    args = [*TINY_SIMCSE, f"--train-data={data}", "--text-column=sent0", "--positive-column=sent1"]
    assert run("simcse", tmp_path / "run", *args, "--negative-column=hard_neg") == 0
    result = summary(tmp_path / "run")
    assert (result["kind"], result["train_examples"], result["training"]["steps"]) == (
        "supervised",
        32,
        4,
    )
    means = epoch_means(tmp_path / "run", "simcse", 2)
    assert means[-1] < means[0], means


def test_three_layer_student_of_a_deeper_model(tmp_path, cache_dir):
    args = [*TINY_SIMCSE, "--model=tiny:4x64", "--keep-every=2", "--max-steps=1"]
    assert run("simcse", tmp_path, *args) == 0
    assert summary(tmp_path)["layers"] == 2
    assert "encoder.encoder.layer.1.output.dense.weight" in final_weights(tmp_path, "simcse")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_backend_matches_torch_step_by_step(tmp_path, cache_dir, backend):
    common = [*TINY_SIMCSE, "--max-steps=4"]
    assert run("simcse", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("simcse", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    for key in ("loss", "positive_cosine"):
        reference = [line[key] for line in metric_lines(tmp_path / "torch", "simcse")]
        fused = [line[key] for line in metric_lines(tmp_path / backend, "simcse")]
        assert len(reference) == 4
        torch.testing.assert_close(fused, reference, rtol=2e-4, atol=1e-6)


def test_resume_after_interrupt_reproduces_weights(simcse_run, tmp_path, monkeypatch):
    monkeypatch.setenv(STOP_AFTER_ENV, "simcse:3")
    assert run("simcse", tmp_path, *TINY_SIMCSE) == 130
    assert (tmp_path / "stages" / "simcse" / "checkpoint.pt").is_file()
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("simcse", tmp_path, *TINY_SIMCSE, "--resume") == 0
    whole, resumed = final_weights(simcse_run, "simcse"), final_weights(tmp_path, "simcse")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert summary(tmp_path)["after"] == summary(simcse_run)["after"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--negative-column=neg"], "negative_column needs positive_column"),
        (["--pooling=max"], "pooling must be one of cls, mean, got 'max'"),
        (["--temperature=0"], "temperature must be > 0"),
        (["--keep-every=0"], "keep_every must be >= 1"),
        (["--eval-columns=a,b"], "eval_columns needs 3 names"),
        (["--eval-data="], "eval_data is empty"),
        (["--eval-data=nosuch"], "'nosuch' is neither a built-in name"),
        (
            ["--model=tiny:4x64", "--keep-every=3"],
            "keep_every=3 does not divide the 4 layers of tiny:4x64",
        ),
    ],
)
def test_bad_config_one_line_error(capsys, tmp_path, cache_dir, argv, fragment):
    assert main(["simcse", f"--output-dir={tmp_path}", *TINY_SIMCSE, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kd-train: error: ") and fragment in err[-1], err[-1]
    assert not (tmp_path / "stages").exists()
