"""TinyBERT-style task-data augmentation that works offline.

TinyBERT (Jiao et al. 2020) replaces each word of a sentence, with probability ``replace_prob``,
by a random one of ``K`` candidates: masked-LM predictions for single-wordpiece words and GloVe
nearest neighbours for the others. GloVe is not available offline and the default teacher (a
sentence-transformers MiniLM) has no MLM head, so here:

* candidates of a word are its ``K`` nearest neighbours by cosine in the teacher's input
  word-embedding matrix, among whole-word vocabulary tokens (alphabetic, not ``##`` pieces, not
  special or ``[unused]`` tokens, not the word itself); a multi-piece word is represented by the
  mean of its pieces' rows;
* when an MLM model is given, single-piece words use its top-``K`` whole-word predictions at the
  masked position instead (context-dependent, so not cached).

Words come from the tokenizer's own normalizer and pre-tokenizer, so the output (words joined by
single spaces) is lower-cased exactly when the tokenizer lower-cases. Only alphabetic words are
ever replaced: punctuation and numbers stay.
"""

from __future__ import annotations

import dataclasses
import random
import re
from typing import TYPE_CHECKING, Any

import torch

from kd_trainers.errors import ConfigError

if TYPE_CHECKING:
    from kd_trainers.data import TextDataset

__all__ = ["WordAugmenter", "augment_dataset"]

# Cap on the logits one MLM call produces (rows x sequence x vocabulary floats, 256 MiB): a
# BertForMaskedLM scores every position, so a long sentence with many masked words is split.
_MAX_LOGITS = 1 << 26
# BERT's basic tokenizer, for tokenizers without a Rust backend: runs of word characters, and
# every other non-space character on its own.
_FALLBACK_SPLIT = re.compile(r"\w+|[^\w\s]")


class WordAugmenter:
    """Replaces words by embedding neighbours (or MLM predictions) with a given probability."""

    def __init__(
        self,
        tokenizer: Any,
        word_embeddings: torch.Tensor,
        *,
        num_candidates: int = 15,
        replace_prob: float = 0.4,
        mlm_model: torch.nn.Module | None = None,
    ) -> None:
        """``word_embeddings`` is the teacher's ``get_input_embeddings().weight``, shape (V, D).

        V may exceed the tokenizer's vocabulary (models pad it to a multiple of 8 or so); the
        extra rows are never used. ``mlm_model`` must accept ``input_ids``/``attention_mask`` and
        return an object with ``.logits`` of shape (batch, sequence, vocabulary).
        """
        if not 0.0 <= replace_prob <= 1.0:
            raise ConfigError(f"replace_prob must be in [0, 1], got {replace_prob}")
        if num_candidates < 1:
            raise ConfigError(f"num_candidates must be >= 1, got {num_candidates}")
        vocab: dict[str, int] = tokenizer.get_vocab()
        needed = max(vocab.values()) + 1
        if word_embeddings.dim() != 2:
            raise ConfigError(
                f"word_embeddings must be 2-D (vocab, dim), got {tuple(word_embeddings.shape)}"
            )
        if word_embeddings.shape[0] < needed:
            raise ConfigError(
                f"word_embeddings has {word_embeddings.shape[0]} rows but the tokenizer's "
                f"vocabulary needs {needed}"
            )
        self.tokenizer = tokenizer
        self.num_candidates = num_candidates
        self.replace_prob = replace_prob
        self.mlm_model = mlm_model
        special = set(tokenizer.all_special_ids)
        # isalpha() rules out '##' pieces, '[unused7]', '[CLS]', numbers and punctuation at once.
        whole = sorted(i for tok, i in vocab.items() if tok.isalpha() and i not in special)
        self._tokens = tokenizer.convert_ids_to_tokens(whole)
        self._position = {token_id: pos for pos, token_id in enumerate(whole)}
        self._whole_ids = torch.tensor(whole, dtype=torch.long)
        self._is_whole = torch.zeros(needed, dtype=torch.bool)
        self._is_whole[self._whole_ids] = True
        # float32 copy once: fp16/bf16 matmuls on CPU are slow and less exact for ranking.
        self._embeddings = word_embeddings.detach().float()
        self._unit = torch.nn.functional.normalize(
            self._embeddings[self._whole_ids.to(self._embeddings.device)], dim=1
        )
        self._pieces_cache: dict[str, list[int]] = {}
        self._neighbours: dict[str, list[str]] = {}
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self._normalizer = getattr(backend, "normalizer", None)
        self._pre_tokenizer = getattr(backend, "pre_tokenizer", None)
        self._lower = backend is None and bool(getattr(tokenizer, "do_lower_case", False))

    def words(self, text: str) -> list[str]:
        """The words the tokenizer sees in ``text``, after its normalizer (lower-casing etc.)."""
        if self._normalizer is not None:
            text = self._normalizer.normalize_str(text)
        if self._pre_tokenizer is not None:
            return [w for w, _ in self._pre_tokenizer.pre_tokenize_str(text)]
        return _FALLBACK_SPLIT.findall(text.lower() if self._lower else text)

    def _pieces(self, word: str) -> list[int]:
        if word not in self._pieces_cache:
            ids = self.tokenizer(word, add_special_tokens=False)["input_ids"]
            self._pieces_cache[word] = list(ids)
        return self._pieces_cache[word]

    def _replaceable(self, word: str) -> bool:
        if not word.isalpha():  # punctuation and numbers are never replaced
            return False
        pieces = self._pieces(word)
        return bool(pieces) and self.tokenizer.unk_token_id not in pieces

    def neighbours(self, words: list[str]) -> dict[str, list[str]]:
        """Embedding-space candidates of each word (nearest first), computed in one matmul."""
        todo = [w for w in dict.fromkeys(words) if w not in self._neighbours]
        for w in todo:
            if not self._pieces(w):  # e.g. a control character the normalizer drops
                self._neighbours[w] = []
        todo = [w for w in todo if w not in self._neighbours]
        if todo:
            rows = [self._embeddings[self._pieces(w)].mean(dim=0) for w in todo]
            sims = torch.nn.functional.normalize(torch.stack(rows), dim=1) @ self._unit.T
            for r, w in enumerate(todo):
                own = self._position.get(self.tokenizer.convert_tokens_to_ids(w))
                if own is not None:
                    sims[r, own] = -float("inf")
            k = min(self.num_candidates, sims.shape[1])
            top = sims.topk(k, dim=1)
            for r, w in enumerate(todo):
                keep = top.values[r] > -float("inf")
                self._neighbours[w] = [self._tokens[j] for j in top.indices[r][keep].tolist()]
        return {w: self._neighbours[w] for w in words}

    @torch.no_grad()
    def _mlm_candidates(self, words: list[str], targets: list[int]) -> dict[int, list[str]]:
        """Top-K whole-word MLM predictions for each word index in ``targets``, masked one per row.

        Rows share one forward call (or a few, for very long sentences); a target beyond the
        model's maximum length is left out, so the caller falls back to embedding neighbours.
        """
        model, tok = self.mlm_model, self.tokenizer
        assert model is not None
        limit = getattr(getattr(model, "config", None), "max_position_embeddings", 512)
        ids, start = [tok.cls_token_id], {}
        for i, w in enumerate(words):
            start[i] = len(ids)
            ids += self._pieces(w)
        ids = [*ids[: limit - 1], tok.sep_token_id]
        targets = [i for i in targets if start[i] < limit - 1]
        if not targets:
            return {}
        device = next(model.parameters()).device
        base = torch.tensor(ids, device=device)
        per_call = max(1, _MAX_LOGITS // (len(ids) * len(self._is_whole)))
        was_training = model.training
        model.eval()  # dropout would make the candidates (and the output) non-deterministic
        found: dict[int, list[str]] = {}
        try:
            for lo in range(0, len(targets), per_call):
                chunk = targets[lo : lo + per_call]
                pos = torch.tensor([start[i] for i in chunk], device=device)
                batch = base.repeat(len(chunk), 1)
                batch[torch.arange(len(chunk), device=device), pos] = tok.mask_token_id
                out = model(input_ids=batch, attention_mask=torch.ones_like(batch))
                logits = out.logits[torch.arange(len(chunk), device=device), pos].float().cpu()
                # Only whole-word tokens may win; extra (padding) logit columns never do.
                allowed = torch.zeros(logits.shape[1], dtype=torch.bool)
                n = min(len(allowed), len(self._is_whole))
                allowed[:n] = self._is_whole[:n]
                logits[:, ~allowed] = -float("inf")
                for r, i in enumerate(chunk):
                    own = self._pieces(words[i])[0]
                    if own < logits.shape[1]:
                        logits[r, own] = -float("inf")  # not the word itself
                top = logits.topk(min(self.num_candidates, logits.shape[1]), dim=1)
                for r, i in enumerate(chunk):
                    keep = top.values[r] > -float("inf")
                    found[i] = tok.convert_ids_to_tokens(top.indices[r][keep].tolist())
        finally:
            model.train(was_training)
        return found

    def augment(self, text: str, rng: random.Random) -> str:
        """One augmented copy of ``text``: its words joined by spaces, some replaced.

        Each replaceable (alphabetic, known to the tokenizer) word is picked with probability
        ``replace_prob`` and replaced by a uniformly drawn candidate; all randomness comes from
        ``rng``, so equal seeds give equal output.
        """
        words = self.words(text)
        chosen = [
            i
            for i, w in enumerate(words)
            if self._replaceable(w) and rng.random() < self.replace_prob
        ]
        if not chosen:
            return " ".join(words)
        candidates: dict[int, list[str]] = {}
        if self.mlm_model is not None:
            single = [i for i in chosen if len(self._pieces(words[i])) == 1]
            candidates.update(self._mlm_candidates(words, single))
        rest = [i for i in chosen if i not in candidates]
        nearest = self.neighbours([words[i] for i in rest])
        candidates.update({i: nearest[words[i]] for i in rest})
        for i in chosen:
            if candidates[i]:
                words[i] = rng.choice(candidates[i])
        return " ".join(words)


def augment_dataset(
    dataset: TextDataset, augmenter: WordAugmenter, copies: int, seed: int
) -> TextDataset:
    """A new dataset with every example followed by ``copies`` augmented copies of it.

    ``text`` and ``text_pair`` are each augmented, ``label`` and ``score`` kept; the result is
    deterministic for a ``seed``. ``copies=0`` gives a dataset with the same examples.
    """
    if copies < 0:
        raise ConfigError(f"copies must be >= 0, got {copies}")
    rng = random.Random(seed)
    out = []
    for ex in dataset.examples:
        out.append(ex)
        for _ in range(copies):
            text = augmenter.augment(ex.text, rng)
            pair = None if ex.text_pair is None else augmenter.augment(ex.text_pair, rng)
            out.append(dataclasses.replace(ex, text=text, text_pair=pair))
    # replace() keeps name, label_names and any field data.py adds later.
    return dataclasses.replace(dataset, examples=out)
