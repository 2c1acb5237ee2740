"""The shared sentence-embedding core: pooling, batched embedding of distinct texts, cosine
evaluation on pair sets (built-in and user files), and the packaged MiniLM's Lee score."""

import dataclasses

import pytest
import torch

from kd_trainers import metrics
from kd_trainers.data import Example
from kd_trainers.errors import ConfigError
from kd_trainers.models import load_encoder, load_tokenizer
from kd_trainers.sentence import (
    BiEncoder,
    SentenceConfig,
    cosine_scores,
    embed_texts,
    evaluate_bi_encoder,
    evaluating,
    load_pair_sets,
    load_texts,
    pair_metrics,
    pool,
    text_inputs,
)

CPU = torch.device("cpu")


def config(**values) -> SentenceConfig:
    return dataclasses.replace(SentenceConfig(), **values)


def test_pool_cls_mean_mask():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    attention = torch.tensor([[1, 1, 0], [1, 1, 1]])
    torch.testing.assert_close(pool(hidden, attention, "cls"), hidden[:, 0])
    # Row 0 averages its first two tokens only: ([0, 1] + [2, 3]) / 2.
    expected_mean = torch.tensor([[1.0, 2.0], [8.0, 9.0]])
    torch.testing.assert_close(pool(hidden, attention, "mean"), expected_mean)
    masked = pool(hidden, attention, "mask", torch.tensor([1, 2]))
    torch.testing.assert_close(masked, torch.stack([hidden[0, 1], hidden[1, 2]]))
    with pytest.raises(ValueError, match="mask_positions"):
        pool(hidden, attention, "mask")


def test_padding_does_not_change_a_text_vector():
    tokenizer = load_tokenizer("tiny", "minilm")
    model = BiEncoder(load_encoder("tiny", vocab_size=len(tokenizer)), "mean").eval()
    texts = ["a short one", "a much longer sentence that forces padding on the first"]
    with torch.no_grad():
        together = model(text_inputs(tokenizer, texts, 32, CPU))
        alone = model(text_inputs(tokenizer, texts[:1], 32, CPU))
    assert together.shape == (2, 64)
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-5)


def test_embed_texts_embeds_each_distinct_text_once_longest_first():
    calls = []

    def embed(texts):
        calls.append(list(texts))
        return torch.tensor([[float(len(t)), 1.0] for t in texts])

    texts = ["bb", "a", "bb", "cccc", "a"]
    vectors = embed_texts(embed, texts, batch_size=2)
    assert calls == [["cccc", "bb"], ["a"]]
    torch.testing.assert_close(vectors[:, 0], torch.tensor([2.0, 1.0, 2.0, 4.0, 1.0]))


def test_cosine_scores_and_pair_metrics():
    table = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [1.0, 1.0]}

    def embed(texts):
        return torch.tensor([table[t] for t in texts])

    scores = cosine_scores(embed, ["x", "x", "z"], ["x", "y", "y"], batch_size=8)
    torch.testing.assert_close(scores, torch.tensor([1.0, 0.0, 2**-0.5]))
    pairs = [
        Example("x", "x", score=5.0),
        Example("x", "y", score=0.0),
        Example("z", "y", score=2.0),
    ]
    result = pair_metrics(scores, pairs)
    assert result == {"spearman": 1.0, "pearson": round(metrics.pearson(scores, [5, 0, 2]), 4)}


def test_evaluating_restores_training_mode_and_disables_grad():
    layer = torch.nn.Linear(2, 2).train()
    with evaluating(layer):
        assert not layer.training and not torch.is_grad_enabled()
    assert layer.training and torch.is_grad_enabled()


def test_builtin_pair_sets(cache_dir):
    sets = load_pair_sets(config(eval_data=["lee", "simlex999", "wordsim353"]))
    assert {name: len(pairs) for name, pairs in sets.items()} == {
        "lee": 1225,
        "simlex999": 999,
        "wordsim353": 353,
    }
    assert all(0.0 <= e.score <= 1.0 for e in sets["lee"])
    capped = load_pair_sets(config(eval_data=["lee"], max_eval=100, seed=3))
    again = load_pair_sets(config(eval_data=["lee"], max_eval=100, seed=3))
    assert len(capped["lee"]) == 100 and capped == again


def test_user_pair_file_in_sts_format(tmp_path):
    path = tmp_path / "sts-dev.csv"
    rows = ["sentence1,sentence2,score", "a cat,a kitten,4.5", "a car,the sea,0.2", "x,y,"]
    path.write_text("\n".join(rows) + "\n")
    sets = load_pair_sets(config(eval_data=[str(path)]))
    assert list(sets) == ["sts-dev"]
    assert sets["sts-dev"] == [
        Example("a cat", "a kitten", score=4.5),
        Example("a car", "the sea", score=0.2),
    ]
    other = tmp_path / "pairs.jsonl"
    other.write_text('{"q": "a", "d": "b", "sim": 1}\n{"q": "c", "d": "d", "sim": 0}\n')
    named = load_pair_sets(config(eval_data=[str(other)], eval_columns=["q", "d", "sim"]))
    assert [e.score for e in named["pairs"]] == [1.0, 0.0]


def test_user_pair_file_missing_column(tmp_path):
    path = tmp_path / "pairs.csv"
    path.write_text("text,other,score\na,b,1\n")
    with pytest.raises(ConfigError, match=r"column 'sentence1' is not in .*text, other, score"):
        load_pair_sets(config(eval_data=[str(path)]))


def test_load_texts_is_a_seeded_sample(cache_dir):
    first = load_texts(config(seed=1), "wiki_sentences", 50)
    assert len(first) == 50 and first == load_texts(config(seed=1), "wiki_sentences", 50)
    assert first != load_texts(config(seed=2), "wiki_sentences", 50)
    assert all(len(t.split()) >= 5 for t in first)


@pytest.mark.parametrize(("pooling", "expected"), [("mean", 0.5083), ("cls", 0.4744)])
def test_packaged_minilm_lee_spearman(cache_dir, pooling, expected):
    """The frozen all-MiniLM-L6-v2 on the 1,225 Lee pairs (DATA.md: 0.51 mean-pooled)."""
    tokenizer = load_tokenizer("minilm")
    model = BiEncoder(load_encoder("minilm", vocab_size=len(tokenizer)), pooling)
    sets = load_pair_sets(config(eval_data=["lee"]))
    result = evaluate_bi_encoder(model, tokenizer, sets, max_length=256, batch_size=64, device=CPU)
    assert result["lee"]["spearman"] == pytest.approx(expected, abs=2e-3)
    assert model.training  # evaluation left the mode as it was
