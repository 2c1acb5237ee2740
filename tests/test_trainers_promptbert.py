"""kd-train promptbert: the template and [MASK] position logic (lengths, truncation of the
sentence only, denoising at the filled template's position ids), then a run end to end on a
tiny random encoder and 64 wiki sentences: the loss falls, the four representations are
scored before and after, fused vs reference InfoNCE, exact resume, one-line errors."""

import json

import pytest
import torch
from trainer_runs import TINY_PROMPTBERT, epoch_means, final_weights, metric_lines, run, summary

import kd_kernels
from kd_trainers.cli import main
from kd_trainers.errors import ConfigError
from kd_trainers.models import load_encoder, load_tokenizer
from kd_trainers.promptbert import (
    SECOND_TEMPLATE,
    TEMPLATE,
    Template,
    prompt_batch,
    prompt_vectors,
)
from kd_trainers.sentence import BiEncoder
from kd_trainers.trainer import STOP_AFTER_ENV

CPU = torch.device("cpu")
REPRESENTATIONS = ("cls", "mean", "prompt", "prompt_denoised")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer("minilm")


@pytest.fixture(scope="module")
def template(tokenizer):
    return Template.parse(TEMPLATE, tokenizer)


def tokens(tokenizer, ids):
    return tokenizer.convert_ids_to_tokens(list(ids))


def test_template_tokens(tokenizer, template):
    assert tokens(tokenizer, template.prefix) == ["this", "sentence", ":", '"']
    assert tokens(tokenizer, template.suffix) == ['"', "means", "[MASK]", "."]
    assert template.overhead == 10  # [CLS] + 4 + 4 + [SEP]


@pytest.mark.parametrize("length", [0, 1, 5, 20])
def test_mask_index_for_sentences_of_different_lengths(tokenizer, template, length):
    sentence = tokenizer("word " * length, add_special_tokens=False)["input_ids"]
    row = template.fill(sentence, max_length=64)
    assert len(row.input_ids) == length + 10
    assert row.mask_index == 1 + 4 + length + 2  # [CLS], prefix, sentence, '"', "means"
    assert row.input_ids[row.mask_index] == tokenizer.mask_token_id
    assert row.position_ids == tuple(range(len(row.input_ids)))


def test_truncation_cuts_the_sentence_never_the_template(tokenizer, template):
    sentence = tokenizer(
        "one two three four five six seven eight nine ten", add_special_tokens=False
    )
    row = template.fill(sentence["input_ids"], max_length=16)
    assert len(row.input_ids) == 16
    assert tokens(tokenizer, row.input_ids) == [
        "[CLS]", "this", "sentence", ":", '"', "one", "two", "three", "four", "five", "six",
        '"', "means", "[MASK]", ".", "[SEP]",
    ]  # fmt: skip
    assert row.mask_index == 13
    with pytest.raises(ConfigError, match="max_length 10 leaves no room for a sentence"):
        template.fill(sentence["input_ids"], max_length=10)


def test_mask_in_the_prefix_and_mask_text_in_the_sentence(tokenizer):
    template = Template.parse('[MASK] is what "[X]" means .', tokenizer)
    for text in ("short", "a longer sentence with [MASK] in it"):
        row = template.fill(tokenizer(text, add_special_tokens=False)["input_ids"], 32)
        assert row.mask_index == 1  # found from the template, not by searching the ids
    assert template.empty(7).mask_index == 1


@pytest.mark.parametrize("length", [0, 3, 9])
def test_empty_template_keeps_the_filled_templates_position_ids(tokenizer, template, length):
    """Denoising row: the template's tokens with the position ids they have around a
    sentence of ``length`` tokens; its [MASK] is the filled row's [MASK] position."""
    filled = template.fill(list(range(2000, 2000 + length)), max_length=64)
    empty = template.empty(length)
    keep = [i for i in range(len(filled.input_ids)) if not 5 <= i < 5 + length]
    assert empty.input_ids == tuple(filled.input_ids[i] for i in keep)
    assert empty.position_ids == tuple(filled.position_ids[i] for i in keep)
    assert empty.input_ids[empty.mask_index] == tokenizer.mask_token_id
    assert empty.position_ids[empty.mask_index] == filled.mask_index


def test_batched_denoised_vectors_match_separate_forwards(tokenizer):
    """One padded forward of filled rows and one empty row per distinct length gives
    h(x)[MASK] - h(empty at |x|)[MASK] of unpadded forwards, per text and template."""
    model = BiEncoder(load_encoder("tiny", vocab_size=len(tokenizer)), "mask").eval()
    templates = [Template.parse(TEMPLATE, tokenizer), Template.parse(SECOND_TEMPLATE, tokenizer)]
    texts = ["a cat", "the dog barked", "a cat", "one two three four five six seven"]
    inputs, layout = prompt_batch(
        tokenizer, texts, templates, max_length=14, denoise=True, device=CPU
    )
    # 4 texts x 2 templates, plus per template the distinct lengths 2, 3 and 4 (cut to 4).
    assert inputs["input_ids"].shape[0] == 8 + 6
    with torch.no_grad():
        batched = prompt_vectors(model, inputs, layout)

        def alone(row):
            one = {
                "input_ids": torch.tensor([row.input_ids]),
                "attention_mask": torch.ones(1, len(row.input_ids), dtype=torch.long),
                "position_ids": torch.tensor([row.position_ids]),
                "mask_positions": torch.tensor([row.mask_index]),
            }
            return model(one)[0]

        for t, template in enumerate(templates):
            for i, text in enumerate(texts):
                ids = tokenizer(text, add_special_tokens=False)["input_ids"]
                row = template.fill(ids, 14)
                expected = alone(row) - alone(template.empty(len(row.input_ids) - 10))
                torch.testing.assert_close(batched[t][i], expected, rtol=1e-4, atol=1e-5)
    plain, plain_layout = prompt_batch(
        tokenizer, texts, templates[:1], max_length=14, denoise=False, device=CPU
    )
    assert plain["input_ids"].shape[0] == 4 and plain_layout[0][1] is None


@pytest.fixture(scope="module")
def promptbert_run(tmp_path_factory, cache_dir):
    output = tmp_path_factory.mktemp("promptbert")
    assert run("promptbert", output, *TINY_PROMPTBERT) == 0
    return output


def test_loss_falls(promptbert_run):
    means = epoch_means(promptbert_run, "promptbert", 4)  # 64 sentences / 16, 6 epochs
    assert len(means) == 6
    assert sum(means[-2:]) / 2 < sum(means[:2]) / 2 - 0.2, means


def test_results_written(promptbert_run):
    result = summary(promptbert_run)
    assert result["method"] == "promptbert" and result["denoise"] is True
    assert result["templates"] == [TEMPLATE, SECOND_TEMPLATE]
    for phase in ("before", "after"):
        assert tuple(result[phase]) == REPRESENTATIONS
        for name in REPRESENTATIONS:
            assert -1.0 <= result[phase][name]["lee"]["spearman"] <= 1.0
    # Training changes the encoder, so every representation's score moves.
    assert result["before"]["prompt"] != result["after"]["prompt"]
    assert [line["step"] for line in metric_lines(promptbert_run, "promptbert")] == list(
        range(1, 25)
    )
    saved = json.loads((promptbert_run / "model" / "sentence.json").read_text())
    assert saved == {"template": TEMPLATE}


@pytest.mark.parametrize(
    "backend", [b for b in ("cpu", "triton") if b in kd_kernels.available_backends()]
)
def test_fused_backend_matches_torch_step_by_step(tmp_path, cache_dir, backend):
    common = [*TINY_PROMPTBERT, "--max-steps=4"]
    assert run("promptbert", tmp_path / "torch", *common, "--loss-backend=torch") == 0
    assert run("promptbert", tmp_path / backend, *common, f"--loss-backend={backend}") == 0
    for key in ("loss", "positive_cosine"):
        reference = [line[key] for line in metric_lines(tmp_path / "torch", "promptbert")]
        fused = [line[key] for line in metric_lines(tmp_path / backend, "promptbert")]
        assert len(reference) == 4
        torch.testing.assert_close(fused, reference, rtol=2e-4, atol=1e-6)


def test_resume_after_interrupt_reproduces_weights(promptbert_run, tmp_path, monkeypatch):
    monkeypatch.setenv(STOP_AFTER_ENV, "promptbert:3")
    assert run("promptbert", tmp_path, *TINY_PROMPTBERT) == 130
    monkeypatch.delenv(STOP_AFTER_ENV)
    assert run("promptbert", tmp_path, *TINY_PROMPTBERT, "--resume") == 0
    whole = final_weights(promptbert_run, "promptbert")
    resumed = final_weights(tmp_path, "promptbert")
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name
    assert summary(tmp_path)["after"] == summary(promptbert_run)["after"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--template=This sentence means [MASK] ."], "must hold [X] (the sentence) exactly once"),
        (['--template=This "[X]" means .'], "must hold [MASK] (the vector) exactly once"),
        (['--second-template="[X]" [MASK] [MASK]'], "second_template"),
        ([f"--second-template={TEMPLATE}"], "template and second_template must differ"),
        (["--max-length=10"], "max_length 10 leaves no room for a sentence"),
        (["--eval-max-length=8"], "eval_max_length 8 leaves no room"),
    ],
)
def test_bad_config_one_line_error(capsys, tmp_path, cache_dir, argv, fragment):
    assert main(["promptbert", f"--output-dir={tmp_path}", *TINY_PROMPTBERT, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("kd-train: error: ") and fragment in err[-1], err[-1]
    assert not (tmp_path / "stages").exists()
