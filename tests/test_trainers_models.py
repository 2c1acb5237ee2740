"""kd_trainers.models: the scores attention, layer-dropped students, heads, save/load."""

import pytest
import torch
from transformers import BertConfig, BertModel

from kd_trainers.errors import ConfigError
from kd_trainers.models import (
    SCORES_ATTENTION,
    Head,
    build_model,
    load_encoder,
    load_tokenizer,
    saved_heads,
    student_from_teacher,
)


def tiny_pair():
    config = dict(
        vocab_size=50,
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=64,
    )
    torch.manual_seed(0)
    scores = BertModel(BertConfig(**config, attn_implementation=SCORES_ATTENTION)).eval()
    eager = BertModel(BertConfig(**config, attn_implementation="eager")).eval()
    eager.load_state_dict(scores.state_dict())
    return scores, eager


def test_scores_attention_returns_masked_pre_softmax_scores():
    scores_model, eager_model = tiny_pair()
    ids = torch.randint(0, 50, (3, 7))
    mask = torch.ones(3, 7, dtype=torch.long)
    mask[1, 4:] = 0
    mask[2, 2:] = 0
    out = scores_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    reference = eager_model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(out.last_hidden_state, reference.last_hidden_state)
    for layer_scores, probabilities in zip(out.attentions, reference.attentions, strict=True):
        torch.testing.assert_close(layer_scores.softmax(-1), probabilities)
        # Padded keys carry the mask's huge negative value, far below TinyBERT's -100 threshold.
        assert (layer_scores[1, :, :, 4:] < -1e30).all()
        assert (layer_scores[0].abs() < 100).all()
    # The first layer's scores are q k^T / sqrt(d) of the embeddings.
    layer = scores_model.encoder.layer[0].attention.self
    hidden = scores_model.embeddings(input_ids=ids)
    q = layer.query(hidden).view(3, 7, 4, 8).transpose(1, 2)
    k = layer.key(hidden).view(3, 7, 4, 8).transpose(1, 2)
    expected = q @ k.transpose(-1, -2) / 8**0.5
    torch.testing.assert_close(out.attentions[0][0], expected[0])


def test_student_keeps_every_kth_layer():
    teacher, _ = tiny_pair()
    student = student_from_teacher(teacher, 2)
    assert student.config.num_hidden_layers == 2 and teacher.config.num_hidden_layers == 4
    for kept, source in zip(student.encoder.layer, (1, 3), strict=True):
        for a, b in zip(kept.parameters(), teacher.encoder.layer[source].parameters(), strict=True):
            assert torch.equal(a, b) and a.data_ptr() != b.data_ptr()
    with pytest.raises(ConfigError, match="does not divide the teacher's 4 layers"):
        student_from_teacher(teacher, 3)


def test_sequence_model_heads_pooling_and_save(tmp_path):
    tokenizer = load_tokenizer("tiny", "minilm")
    heads = [Head("sst", 2), Head("sts", 1, "regression")]
    model = build_model(
        "tiny:2x32", heads, vocab_size=len(tokenizer), pooling="mean", scores=False, seed=3
    ).eval()
    inputs = tokenizer(["a good film", "bad"], padding=True, return_tensors="pt")
    logits, _ = model(dict(inputs), task="sts")
    assert logits.shape == (2, 1) and logits.dtype == torch.float32
    # Mean pooling ignores padding: the short text alone gives the same output.
    alone, _ = model(dict(tokenizer(["bad"], return_tensors="pt")), task="sts")
    torch.testing.assert_close(alone[0], logits[1], rtol=1e-5, atol=1e-5)
    model.save(tmp_path / "saved", tokenizer)
    assert saved_heads(str(tmp_path / "saved")) == heads
    again = build_model(
        str(tmp_path / "saved"),
        heads,
        vocab_size=len(tokenizer),
        pooling="mean",
        scores=False,
        seed=9,
    ).eval()
    torch.testing.assert_close(again(dict(inputs), task="sts")[0], logits)


def test_same_seed_same_tiny_model():
    a = load_encoder("tiny:2x32", vocab_size=100, seed=1)
    b = load_encoder("tiny:2x32", vocab_size=100, seed=1)
    c = load_encoder("tiny:2x32", vocab_size=100, seed=2)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert not torch.equal(a.embeddings.word_embeddings.weight, c.embeddings.word_embeddings.weight)


def test_default_teacher_loads_minilm():
    model = load_encoder("minilm", vocab_size=0)
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (6, 384)
    tokenizer = load_tokenizer("minilm")
    assert len(tokenizer) == 30522


@pytest.mark.parametrize("name", ["tiny:", "tiny:2", "tiny:axb"])
def test_bad_tiny_names(name):
    with pytest.raises(ConfigError, match="tiny model names look like"):
        load_encoder(name, vocab_size=10)


@pytest.mark.parametrize("kind", ["classification", "regression"])
def test_inference_sorted_by_length_returns_example_order(kind):
    """predict and pooled_features run batches sorted by text length: their rows come back
    in example order and equal each example's own unpadded forward."""
    from kd_trainers.data import Example
    from kd_trainers.evaluation import predict
    from kd_trainers.linear_head import pooled_features
    from kd_trainers.models import by_length

    words = ["good", "bad", "film", "plot", "slow", "fun", "dull", "great", "awful", "story"]
    # Pairs for the regression case (a pair's length counts both texts), single texts else.
    examples = [
        Example(
            " ".join(words[(3 * i) % 10 :] * (1 + i % 4)),
            text_pair=" ".join(words[: 1 + (7 * i) % 9]) if kind == "regression" else None,
        )
        for i in range(23)
    ]
    batches = by_length(examples, 5)
    assert sorted(i for b in batches for i in b) == list(range(23))
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    sizes = [len(examples[i].text) + len(examples[i].text_pair or "") for b in batches for i in b]
    assert sizes == sorted(sizes)
    head = Head("task", 3 if kind == "classification" else 1, kind)
    tokenizer = load_tokenizer("minilm")
    model = build_model(
        "tiny:2x32", [head], vocab_size=len(tokenizer), pooling="mean", scores=False, seed=0
    ).eval()
    options = dict(max_length=32, device=torch.device("cpu"))
    batched = predict(model, tokenizer, examples, head, batch_size=5, **options)
    single = torch.cat(
        [predict(model, tokenizer, [e], head, batch_size=1, **options) for e in examples]
    )
    assert batched.shape == single.shape == ((23, 3) if kind == "classification" else (23,))
    assert (batched - single).norm() / single.norm() < 1e-5
    pooled = pooled_features(model, tokenizer, examples, batch_size=5, **options)
    alone = torch.cat(
        [pooled_features(model, tokenizer, [e], batch_size=1, **options) for e in examples]
    )
    assert (pooled - alone).norm() / alone.norm() < 1e-5
    assert not torch.allclose(pooled[0], pooled[1])  # distinct rows, so order is checked
