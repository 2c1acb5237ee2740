"""kd-train trans-encoder end to end on tiny random encoders: step 1 (SimCSE), one cycle of
bi -> cross and cross -> bi on 64 unlabeled pairs, per-cycle Spearman of both forms, the
cross-encoder's pair input, the loss choices, mutual distillation, fused vs reference
InfoNCE, exact resume from inside either step, and one-line config errors."""

import csv

import pytest
import torch
from torch.nn import functional as F
from trainer_runs import (
    TINY_TRANS_ENCODER,
    epoch_means,
    final_weights,
    losses,
    metric_lines,
    run,
    summary,
)

import kd_kernels
from kd_trainers.cli import main
from kd_trainers.data import load_dataset
from kd_trainers.models import load_tokenizer
from kd_trainers.trainer import STOP_AFTER_ENV
from kd_trainers.trans_encoder import bi_loss, cross_loss, pair_inputs

CPU = torch.device("cpu")
STAGES = ("simcse", "cross_1", "bi_1")


@pytest.fixture(scope="module")
def pair_file(tmp_path_factory, cache_dir):
    """64 unlabeled wiki pairs: odd rows a sentence and itself cut short, even rows two
    unrelated sentences, so the pseudo-scores have something to tell apart."""
    wiki = [e.text for e in load_dataset("wiki_sentences").examples[:200]]
    path = tmp_path_factory.mktemp("pairs") / "pairs.csv"
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "text_pair"])
        for i in range(64):
            cut = " ".join(wiki[i].split()[:-2])
            writer.writerow([wiki[i], cut if i % 2 else wiki[100 + i]])
    return path


@pytest.fixture(scope="module")
def args(pair_file):
    return [*TINY_TRANS_ENCODER, f"--pairs={pair_file}"]


@pytest.fixture(scope="module")
def te_run(tmp_path_factory, args):
    output = tmp_path_factory.mktemp("trans_encoder")
    assert run("trans-encoder", output, *args) == 0
    return output


def test_pair_input_segments_and_separators():
    tokenizer = load_tokenizer("minilm")
    pairs = [("a cat sat on the mat", "the dog barked at it all night long"), ("hi", "yo")]
    inputs = pair_inputs(tokenizer, pairs, 12, CPU)
    sep, cls = tokenizer.sep_token_id, tokenizer.cls_token_id
    ids, types, mask = inputs["input_ids"], inputs["token_type_ids"], inputs["attention_mask"]
    assert ids.shape == (2, 12)  # the long pair is cut to max_length, the short one padded
    # Row 0: longest_first truncation trims the longer second text; both [SEP]s stay.
    assert tokenizer.convert_ids_to_tokens(ids[0]) == [
        "[CLS]", "a", "cat", "sat", "on", "[SEP]", "the", "dog", "barked", "at", "it", "[SEP]"
    ]  # fmt: skip
    assert types[0].tolist() == [0] * 6 + [1] * 6
    # Row 1: "[CLS] hi [SEP] yo [SEP]" then padding (segment 0, attention 0).
    assert tokenizer.convert_ids_to_tokens(ids[1, :5]) == ["[CLS]", "hi", "[SEP]", "yo", "[SEP]"]
    assert ids[1, 0] == cls
    assert types[1].tolist() == [0, 0, 0, 1, 1] + [0] * 7
    assert mask[1].tolist() == [1] * 5 + [0] * 7
    assert all((row == sep).sum() == 2 for row in ids)


def test_direction_losses():
    logits = torch.tensor([2.0, -1.0, 0.5])
    cosines = torch.tensor([0.9, -0.2, 0.4])
    targets = torch.tensor([0.8, -0.1, 0.3])  # a cosine target can be negative
    clamped = targets.clamp(0, 1)
    torch.testing.assert_close(
        cross_loss(logits, targets, "bce"), F.binary_cross_entropy_with_logits(logits, clamped)
    )
    torch.testing.assert_close(
        cross_loss(logits, targets, "mse"), F.mse_loss(torch.sigmoid(logits), targets)
    )
    torch.testing.assert_close(bi_loss(cosines, targets, "mse"), F.mse_loss(cosines, targets))
    probabilities = torch.tensor([0.7, 0.2, 0.95])
    torch.testing.assert_close(
        bi_loss(cosines, probabilities, "bce"),
        F.binary_cross_entropy(cosines.clamp(1e-6, 1 - 1e-6), probabilities),
    )


@pytest.mark.parametrize(("stage", "steps_per_epoch"), [("simcse", 4), ("cross_1", 8), ("bi_1", 4)])
def test_each_step_loss_falls(te_run, stage, steps_per_epoch):
    """simcse: 64 sentences / 16; cross_1: 64 pairs both ways / 16; bi_1: 64 pairs / 16."""
    means = epoch_means(te_run, stage, steps_per_epoch)
    assert len(means) >= 2 and means[-1] < means[0], means


def test_per_cycle_spearman_of_both_forms(te_run):
    result = summary(te_run)
    assert result["method"] == "trans-encoder" and result["pairs"] == 64
    for phase in (result["start"], result["step1"]):
        assert -1.0 <= phase["model"]["lee"]["spearman"] <= 1.0
    (cycle,) = result["cycles"]
    assert cycle["cycle"] == 1
    for form in ("cross", "bi"):
        assert -1.0 <= cycle[form]["model"]["lee"]["spearman"] <= 1.0
        assert -1.0 <= cycle[form]["model"]["lee"]["pearson"] <= 1.0
    assert -1.0 <= cycle["bi_targets_mean"] <= 1.0 and 0.0 < cycle["cross_targets_mean"] < 1.0
    assert [t["steps"] for t in cycle["training"]["cross"]] == [16]
    assert [t["steps"] for t in cycle["training"]["bi"]] == [12]
    assert (te_run / "bi_encoder" / "sentence.json").is_file()
    assert (te_run / "cross_encoder" / "heads.json").is_file()


def test_bi_encoder_starts_from_the_cross_encoder(te_run):
    """Step 3 starts from the step-2 encoder: the bi-encoder's final weights differ from the
    cross-encoder's, and the cross-encoder's head is a 1-output layer."""
    cross, bi = final_weights(te_run, "cross_1"), final_weights(te_run, "bi_1")
    assert cross["heads.pair.weight"].shape == (1, 64)
    name = "encoder.layer.0.attention.self.query.weight"
    assert not torch.equal(cross[f"encoder.{name}"], bi[f"encoder.{name}"])


def test_default_pairs_are_lee_without_scores(tmp_path, cache_dir):
    args = [*TINY_TRANS_ENCODER, "--simcse-epochs=0", "--max-steps=1"]
    assert run("trans-encoder", tmp_path, *args) == 0
    result = summary(tmp_path)
    assert result["pairs"] == 64 and "step1" not in result and "simcse_training" not in result
    assert [line["stage"] for line in metric_lines(tmp_path)] == ["cross_1", "bi_1"]


def test_mutual_distillation_with_swapped_losses(tmp_path, args):
    """Two PLMs (a 2-layer and a 4-layer random encoder), MSE for bi -> cross and BCE for
    cross -> bi (the paper's ablation), every stage once per model."""
    extra = ["--model2=tiny:4x64", "--bi-to-cross-loss=mse", "--cross-to-bi-loss=bce"]
    assert run("trans-encoder", tmp_path, *args, *extra, "--max-steps=2") == 0
    result = summary(tmp_path)
    assert result["models"] == ["tiny:2x64", "tiny:4x64"]
    assert set(result["cycles"][0]["cross"]) == set(result["cycles"][0]["bi"]) == {"a", "b"}
    stages = [line["stage"] for line in metric_lines(tmp_path)]
    expected = ["simcse_a", "simcse_b", "cross_1_a", "cross_1_b", "bi_1_a", "bi_1_b"]
    assert stages == [s for s in expected for _ in range(2)]
    assert all(v > 0 for v in losses(tmp_path, "bi_1_a"))
    for folder in ("bi_encoder_a", "bi_encoder_b", "cross_encoder_a", "cross_encoder_b"):
        assert (tmp_path / folder / "config.json").is_file()


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
)
def test_fused_backend_matches_torch_step_by_step(tmp_path, args, backend):
    common = [*args, "--max-steps=3"]
    assert run("trans-encoder", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("trans-encoder", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    for stage in STAGES:
        reference = losses(tmp_path / "torch", stage)
        assert len(reference) == 3
        torch.testing.assert_close(
            losses(tmp_path / backend, stage), reference, rtol=2e-4, atol=1e-6
        )


@pytest.mark.parametrize("stop", ["cross_1:5", "bi_1:2"])
def test_resume_after_interrupt_reproduces_weights(te_run, tmp_path, args, monkeypatch, stop):
    monkeypatch.setenv(STOP_AFTER_ENV, stop)
    assert run("trans-encoder", tmp_path, *args) == 130
    stage = stop.split(":")[0]
    assert (tmp_path / "stages" / stage / "checkpoint.pt").is_file()
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("trans-encoder", tmp_path, *args, "--resume") == 0
    for stage in STAGES:
        whole, resumed = final_weights(te_run, stage), final_weights(tmp_path, stage)
        assert whole.keys() == resumed.keys()
        for name in whole:
            assert torch.equal(whole[name], resumed[name]), (stage, name)
    assert summary(tmp_path)["cycles"][0]["bi"] == summary(te_run)["cycles"][0]["bi"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--cycles=0"], "cycles must be >= 1, got 0"),
        (["--bi-to-cross-loss=kl"], "bi_to_cross_loss must be bce or mse, got 'kl'"),
        (["--cross-to-bi-loss=l1"], "cross_to_bi_loss must be bce or mse"),
        (["--cross-max-length=2"], "cross_max_length must be >= 3"),
        (["--cross-batch-size=0"], "cross_batch_size must be >= 1"),
        (["--simcse-epochs=-1"], "simcse_epochs must be >= 0"),
        (["--model2=tiny:4x64", "--keep-every2=3"], "keep_every2=3 does not divide"),
    ],
)
def test_bad_config_one_line_error(capsys, tmp_path, cache_dir, argv, fragment):
    assert main(["trans-encoder", f"--output-dir={tmp_path}", *TINY_TRANS_ENCODER, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kd-train: error: ") and fragment in err[-1], err[-1]
    assert not (tmp_path / "stages").exists()


def test_pair_file_without_second_column(capsys, tmp_path, cache_dir):
    path = tmp_path / "pairs.csv"
    path.write_text("sentence1,sentence2\n" + "".join(f"a {i},b {i}\n" for i in range(8)))
    argv = ["trans-encoder", f"--output-dir={tmp_path}", *TINY_TRANS_ENCODER, f"--pairs={path}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "column 'text' is not in" in err and "sentence1, sentence2" in err
