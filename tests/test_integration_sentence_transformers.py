"""FusedMultipleNegativesRankingLoss against sentence-transformers' own losses on a real
SentenceTransformer (a tiny random BERT with the MiniLM tokenizer, mean pooling): the loss and
every parameter gradient equal MultipleNegativesRankingLoss (mini_batch_size=None) and
CachedMultipleNegativesRankingLoss (the same mini_batch_size), in eval mode and with dropout,
for cosine and dot, one or both directions, joint and per-direction partitions, with and
without hard negatives. Then a SentenceTransformerTrainer run and the
errors for what the fused loss does not compute. (The 2-process gather is in
test_grad_cache.py, on a plain torch encoder: its workers need no sentence-transformers.)"""

import pytest
import torch
from trainer_runs import save_tiny_bert

st = pytest.importorskip("sentence_transformers")
from sentence_transformers import util  # noqa: E402
from sentence_transformers.sentence_transformer import losses  # noqa: E402

from kd_kernels.integrations.sentence_transformers import (  # noqa: E402
    FusedMultipleNegativesRankingLoss,
    mini_batch,
)

TEXTS = [f"sentence number {i} says " + "more words " * (i % 5) for i in range(30)]
BATCH = 6
MINI_BATCH = 4  # does not divide BATCH: the last mini-batch is short
SIMILARITIES = {"cos": (util.cos_sim, 20.0), "dot": (util.dot_score, 1.0)}
LOSS_FORMS = {
    "one_way": {"directions": ("query_to_doc",)},
    "symmetric": {
        "directions": ("query_to_doc", "doc_to_query"),
        "partition_mode": "per_direction",
    },
    "joint": {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "joint"},
}


def build_model(directory):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    return SentenceTransformer(
        modules=[Transformer(str(directory), max_seq_length=24), Pooling(32, "mean")],
        device="cpu",
    )


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A 2-layer, 32-wide random BERT (dropout 0.1) with MiniLM's tokenizer, saved offline."""
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_st"), hidden=32)


@pytest.fixture(scope="module")
def model(model_dir):
    return build_model(model_dir)


def columns(model, count, offset=0, rows=BATCH):
    """``count`` tokenized columns (anchor, positive, negatives...) of ``rows`` texts each."""
    start = offset
    out = []
    for _ in range(count):
        out.append(model.preprocess(TEXTS[start : start + rows]))
        start += rows
    return out


def loss_and_grads(model, loss_fn, features, train):
    """The loss and every parameter's gradient of one call, from a fixed RNG state."""
    model.train(train)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    loss = loss_fn(features, None)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def assert_same(got, expected):
    (loss, grads), (expected_loss, expected_grads) = got, expected
    torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == expected_grads.keys()
    # One scale for every parameter: attention's key bias has a gradient of exactly 0 in
    # exact arithmetic (softmax is shift-invariant), so only float noise is there to compare.
    scale = max(g.abs().max() for g in expected_grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=0, atol=2e-5 * scale)


@pytest.mark.parametrize("train", [False, True], ids=["eval", "dropout"])
@pytest.mark.parametrize("form", list(LOSS_FORMS))
# cosine with two hard-negative columns, dot with none (each form and mode sees both)
@pytest.mark.parametrize(("similarity", "negatives"), [("cos", 2), ("dot", 0)])
@pytest.mark.parametrize("mini_batch_size", [None, MINI_BATCH], ids=["mnrl", "cached"])
def test_equals_sentence_transformers(model, train, similarity, form, negatives, mini_batch_size):
    fct, scale = SIMILARITIES[similarity]
    options = {"scale": scale, "similarity_fct": fct, **LOSS_FORMS[form]}
    if mini_batch_size is None:
        reference = losses.MultipleNegativesRankingLoss(model, **options)
    else:
        options["mini_batch_size"] = mini_batch_size
        reference = losses.CachedMultipleNegativesRankingLoss(model, **options)
    fused = FusedMultipleNegativesRankingLoss(model, **options)
    features = columns(model, 2 + negatives)
    expected = loss_and_grads(model, reference, features, train)
    assert_same(loss_and_grads(model, fused, features, train), expected)


def test_grad_cache_equals_mnrl_without_dropout(model):
    """In eval mode the mini-batch size changes nothing: cached == one pass."""
    features = columns(model, 3)
    one_pass = loss_and_grads(model, FusedMultipleNegativesRankingLoss(model), features, False)
    for size in (1, 4, BATCH):
        cached = FusedMultipleNegativesRankingLoss(model, mini_batch_size=size)
        assert_same(loss_and_grads(model, cached, features, False), one_pass)


def test_scaled_backward_and_no_grad(model):
    """The replay takes grad_output (loss scaling, accumulation); without grad mode the loss is
    just the value."""
    features = columns(model, 2)
    cached = FusedMultipleNegativesRankingLoss(model, mini_batch_size=MINI_BATCH)
    loss, grads = loss_and_grads(model, cached, features, False)
    tripled = loss_and_grads(model, lambda f, y: 3 * cached(f, y), features, False)
    assert_same(tripled, (3 * loss, {n: 3 * g for n, g in grads.items()}))
    with torch.no_grad():
        torch.testing.assert_close(cached(features, None), loss, rtol=1e-5, atol=1e-6)


def test_mini_batch_cuts_trailing_padding(model):
    features = model.preprocess(["a", "b c", "a much longer sentence with many tokens", "d"])
    first = mini_batch(features, 0, 2)
    assert first["input_ids"].shape == (2, int(features["attention_mask"][:2].sum(1).max()))
    assert mini_batch(features, 2, 4)["input_ids"].shape == (2, features["input_ids"].shape[1])


def test_sentence_transformer_trainer_runs(model_dir, tmp_path):
    from datasets import Dataset
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )

    model = build_model(model_dir)
    data = Dataset.from_dict(
        {"anchor": TEXTS[:16], "positive": TEXTS[14:30], "negative": TEXTS[7:23]}
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=8,
        learning_rate=1e-3,
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
    )
    loss = FusedMultipleNegativesRankingLoss(model, mini_batch_size=3)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=data, loss=loss)
    result = trainer.train()
    assert result.global_step == 2 and torch.isfinite(torch.tensor(result.training_loss))
    moved = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert len(moved) > len(before) // 2, moved


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"similarity_fct": util.manhattan_sim}, "similarity_fct"),
        ({"directions": ("query_to_doc", "query_to_query")}, "directions"),
        ({"directions": ("query_to_doc", "doc_to_doc")}, "directions"),
        ({"hardness_mode": "hard_negatives", "hardness_strength": 5.0}, "hardness_mode"),
        ({"mini_batch_num_tokens": 512}, "mini_batch_num_tokens"),
    ],
)
def test_unsupported_options_name_the_argument(model, options, fragment):
    with pytest.raises(NotImplementedError, match=fragment):
        FusedMultipleNegativesRankingLoss(model, **options)


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"scale": 0.0}, "scale"),
        ({"directions": ("doc_to_query",)}, "query_to_doc"),
        ({"directions": ("sideways",)}, "directions"),
        ({"partition_mode": "both"}, "partition_mode"),
        ({"mini_batch_size": 0}, "mini_batch_size"),
    ],
)
def test_bad_values_are_value_errors(model, options, fragment):
    with pytest.raises(ValueError, match=fragment):
        FusedMultipleNegativesRankingLoss(model, **options)


def test_one_column_is_an_error(model):
    with pytest.raises(ValueError, match="at least 2"):
        FusedMultipleNegativesRankingLoss(model)(columns(model, 1), None)
