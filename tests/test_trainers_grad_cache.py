"""kd-train's --grad-cache-chunk: at a small batch, a run whose batches are embedded 5 texts at a
time under GradCache logs the losses and ends with the weights of the one-pass run (simcse, scal
--mode unsupervised with its adversarial view, promptbert, trans-encoder's bi-encoder steps).
The encoder has no dropout, so both runs see the same function; with dropout the replay's masks
are those of the cached pass (tests/test_grad_cache.py). Plus the flags' one-line errors."""

import pytest
import torch
from trainer_runs import final_weights, metric_lines, run, save_tiny_bert

from kd_trainers.cli import main

COMMON = [
    "--max-train=24",
    "--batch-size=12",
    "--max-length=16",
    "--max-steps=2",
    "--log-every=1",
    "--progress=false",
    "--threads=1",
]
SENTENCE = ["--eval-data=lee", "--max-eval=8", "--eval-max-length=16"]
# method -> (extra arguments, stages compared)
METHODS = {
    "simcse": ([*SENTENCE, "--lr=1e-3"], ["simcse"]),
    "scal": (
        ["--mode=unsupervised", "--similarity-data=lee", "--max-eval=8", "--lr=1e-3"],
        ["uscal"],
    ),
    # Without denoising: h(x) - h(template) cancels the last LayerNorm's bias, whose gradient
    # is then float noise that Adam turns into +-lr steps of either sign.
    "promptbert": ([*SENTENCE, "--max-length=32", "--lr=1e-3", "--denoise=false"], ["promptbert"]),
    "trans-encoder": (
        [
            *SENTENCE,
            "--max-pairs=12",
            "--cycles=1",
            "--bi-epochs=2",
            "--cross-max-length=32",
            "--simcse-lr=1e-3",
        ],
        ["simcse", "bi_1"],
    ),
}


@pytest.fixture(scope="module")
def dropout_free_model(tmp_path_factory):
    """A 2-layer, 64-wide random BERT without dropout, with MiniLM's tokenizer, on disk."""
    return save_tiny_bert(tmp_path_factory.mktemp("no_dropout_bert"), hidden=64, dropout=0.0)


@pytest.mark.parametrize("method", list(METHODS))
def test_chunked_run_equals_one_pass(tmp_path, cache_dir, dropout_free_model, method):
    extra, stages = METHODS[method]
    args = [f"--model={dropout_free_model}", *COMMON, *extra]
    assert run(method, tmp_path / "one_pass", *args) == 0
    assert run(method, tmp_path / "chunked", *args, "--grad-cache-chunk=5") == 0
    for stage in stages:
        one_pass = [line["loss"] for line in metric_lines(tmp_path / "one_pass", stage)]
        chunked = [line["loss"] for line in metric_lines(tmp_path / "chunked", stage)]
        assert len(one_pass) == 2
        torch.testing.assert_close(chunked, one_pass, rtol=1e-5, atol=1e-6)
        expected = final_weights(tmp_path / "one_pass", stage)
        got = final_weights(tmp_path / "chunked", stage)
        # Adam divides by sqrt(v): an entry whose gradient is float noise in both runs moves by
        # a few 1e-6 differently; a real disagreement would show at the step size, 1e-3.
        for name, weight in expected.items():
            torch.testing.assert_close(got[name], weight, rtol=1e-4, atol=2e-5), name


@pytest.mark.parametrize(
    ("method", "argv", "fragment"),
    [
        ("simcse", ["--grad-cache-chunk=-1"], "grad_cache_chunk must be >= 0"),
        ("promptbert", ["--gather-negatives"], "gather_negatives needs several processes"),
        ("scal", ["--grad-cache-chunk=8"], "grad_cache_chunk is for mode=unsupervised"),
    ],
)
def test_flag_errors(capsys, tmp_path, method, argv, fragment):
    assert main([method, f"--output-dir={tmp_path}", *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kd-train: error: ") and fragment in err[-1], err[-1]
