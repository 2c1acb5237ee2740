"""PromptBERT (Jiang et al., 2022, "PromptBERT: Improving BERT Sentence Embeddings with
Prompts").

A sentence x is put into a template and represented by the last hidden state at [MASK]:
    h(x) = H_L[mask position] of "[CLS] This sentence : " x " means [MASK] . [SEP]".
Template denoising subtracts the same template filled with nothing, its tokens kept at the
positions they hold around x (the prefix at 0.., the suffix and [SEP] shifted by |x|), so
that only the sentence's contribution is left:
    h~(x) = h(x) - h(empty template at |x|).
Unsupervised training: the same sentence in two different templates is the positive pair,
every other sentence of the batch a negative (dropout on, as in SimCSE):
    loss = info_nce_loss(h~_1(x), h~_2(x), temperature=tau)      (h without ``denoise``).
In training the empty templates share the batch's forward pass, dropout and gradient
included, as in the authors' code; evaluation has neither. Truncation cuts the sentence,
never the template, so [MASK] is always there.

Stage ``promptbert`` (resumable). The report scores, before and after training, the prompt
vector with and without denoising against CLS and mean pooling of the same encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

import kd_kernels as kdk
from kd_trainers.errors import ConfigError
from kd_trainers.models import load_tokenizer
from kd_trainers.report import markdown_table
from kd_trainers.sentence import (
    SENTENCE_HELP,
    BiEncoder,
    Embed,
    SentenceConfig,
    build_encoder,
    contrastive_views,
    evaluate_bi_encoder,
    evaluate_embedder,
    evaluating,
    load_pair_sets,
    load_texts,
    results_table,
    save_encoder,
)
from kd_trainers.trainer import Runtime, Stage, run_stage, shuffled_batches

DESCRIPTION = "PromptBERT: [MASK]-of-a-template sentence vectors, template denoising"
SLOT, MASK = "[X]", "[MASK]"
# The paper's BERT templates (unsup-bert: the second view uses "of" instead of ":").
TEMPLATE = 'This sentence : "[X]" means [MASK] .'
SECOND_TEMPLATE = 'This sentence of "[X]" means [MASK] .'


@dataclass
class PromptBERTConfig(SentenceConfig):
    HELP: ClassVar[dict[str, str]] = {
        **SENTENCE_HELP,
        "template": "prompt with [X] (the sentence) and [MASK] (the vector); also the "
        "evaluation template",
        "second_template": "the positive view's template in training",
        "denoise": "train on denoised vectors (the template filled with nothing subtracted)",
        "epochs": "epochs of contrastive training",
        "lr": "peak learning rate (the paper: 1e-5 at batch 256)",
    }
    template: str = TEMPLATE
    second_template: str = SECOND_TEMPLATE
    denoise: bool = True
    epochs: float = 1.0
    lr: float = 1e-5

    def validate(self) -> None:
        super().validate()
        for name in ("template", "second_template"):
            check_template_text(name, getattr(self, name))
        if self.template == self.second_template:
            raise ConfigError("template and second_template must differ (they make the pair)")


CONFIG = PromptBERTConfig


def check_template_text(name: str, text: str) -> None:
    for marker, role in ((SLOT, "the sentence"), (MASK, "the vector")):
        if text.count(marker) != 1:
            raise ConfigError(f"{name} {text!r} must hold {marker} ({role}) exactly once")


@dataclass(frozen=True)
class PromptRow:
    """One encoder row: token ids, their position ids, and the index of [MASK] in it."""

    input_ids: tuple[int, ...]
    position_ids: tuple[int, ...]
    mask_index: int


@dataclass(frozen=True)
class Template:
    """A tokenized template: ``[CLS] prefix [X] suffix [SEP]``, [MASK] in prefix or suffix."""

    text: str
    prefix: tuple[int, ...]
    suffix: tuple[int, ...]
    cls_id: int
    sep_id: int
    mask_id: int

    @classmethod
    def parse(cls, text: str, tokenizer, name: str = "template") -> Template:
        check_template_text(name, text)
        before, after = text.split(SLOT)
        prefix = tuple(tokenizer(before, add_special_tokens=False)["input_ids"])
        suffix = tuple(tokenizer(after, add_special_tokens=False)["input_ids"])
        if (prefix + suffix).count(tokenizer.mask_token_id) != 1:
            raise ConfigError(f"{name} {text!r}: the tokenizer does not read {MASK} as one token")
        ids = (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.mask_token_id)
        return cls(text, prefix, suffix, *ids)

    @property
    def overhead(self) -> int:
        """Tokens besides the sentence: [CLS], prefix, suffix, [SEP]."""
        return len(self.prefix) + len(self.suffix) + 2

    def mask_index(self, length: int) -> int:
        """Where [MASK] sits with a sentence of ``length`` tokens in the slot (found from the
        template, not by searching the ids: a sentence may itself contain [MASK])."""
        if self.mask_id in self.prefix:
            return 1 + self.prefix.index(self.mask_id)
        return 1 + len(self.prefix) + length + self.suffix.index(self.mask_id)

    def budget(self, max_length: int, key: str = "max_length") -> int:
        """Sentence tokens that fit in ``max_length``; a ConfigError naming ``key`` if none."""
        room = max_length - self.overhead
        if room < 1:
            raise ConfigError(
                f"{key} {max_length} leaves no room for a sentence in {self.text!r} "
                f"({self.overhead} template tokens)"
            )
        return room

    def fill(self, sentence: Sequence[int], max_length: int) -> PromptRow:
        """``[CLS] prefix sentence suffix [SEP]``; the sentence is cut to fit ``max_length``."""
        kept = tuple(sentence[: self.budget(max_length)])
        ids = (self.cls_id, *self.prefix, *kept, *self.suffix, self.sep_id)
        return PromptRow(ids, tuple(range(len(ids))), self.mask_index(len(kept)))

    def empty(self, length: int) -> PromptRow:
        """The template filled with nothing, each token at the position it holds around a
        sentence of ``length`` tokens (PromptBERT's template denoising)."""
        head = 1 + len(self.prefix)
        ids = (self.cls_id, *self.prefix, *self.suffix, self.sep_id)
        positions = (*range(head), *range(head + length, head + length + len(self.suffix) + 1))
        return PromptRow(ids, positions, self.mask_index(0))


def collate(rows: Sequence[PromptRow], pad_id: int, device: torch.device) -> dict:
    """Pads rows to the longest: input_ids, attention_mask, token_type_ids (zeros),
    position_ids (B, L) and mask_positions (B,), all int64."""
    width = max(len(row.input_ids) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, : len(row.input_ids)] = torch.tensor(row.input_ids)
        positions[i, : len(row.position_ids)] = torch.tensor(row.position_ids)
        mask[i, : len(row.input_ids)] = 1
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "token_type_ids": torch.zeros_like(ids),
        "position_ids": positions,
        "mask_positions": torch.tensor([row.mask_index for row in rows]),
    }
    return {name: value.to(device) for name, value in inputs.items()}


Layout = list[tuple[torch.Tensor, torch.Tensor | None]]


def prompt_batch(
    tokenizer,
    texts: Sequence[str],
    templates: Sequence[Template],
    *,
    max_length: int,
    denoise: bool,
    device: torch.device,
) -> tuple[dict, Layout]:
    """One encoder batch for ``texts`` in every template: the filled rows and, with
    ``denoise``, one empty-template row per distinct sentence length (all in one forward, so
    DDP sees a single pass). The layout gives, per template, the (B,) rows of the filled
    texts and of each text's empty template (None without denoising)."""
    budget = max(1, max_length - min(t.overhead for t in templates))
    sentences = tokenizer(
        list(texts), add_special_tokens=False, truncation=True, max_length=budget
    )["input_ids"]
    rows: list[PromptRow] = []
    layout: Layout = []
    for template in templates:
        filled = [template.fill(ids, max_length) for ids in sentences]
        first = len(rows)
        rows += filled
        filled_rows = torch.arange(first, len(rows))
        noise_rows = None
        if denoise:
            lengths = [len(row.input_ids) - template.overhead for row in filled]
            distinct = sorted(set(lengths))
            first = len(rows)
            rows += [template.empty(n) for n in distinct]
            noise_rows = torch.tensor([first + distinct.index(n) for n in lengths])
        layout.append((filled_rows, noise_rows))
    return collate(rows, tokenizer.pad_token_id, device), layout


def prompt_vectors(model, inputs: dict, layout: Layout) -> list[torch.Tensor]:
    """Per template, the (B, D) [MASK] vectors, minus the empty template's when denoised."""
    vectors = model(inputs)
    return [
        vectors[filled] - vectors[noise] if noise is not None else vectors[filled]
        for filled, noise in layout
    ]


def prompt_embedder(
    model: BiEncoder, tokenizer, template: Template, max_length: int, denoise: bool, device
) -> Embed:
    def embed(texts: Sequence[str]) -> torch.Tensor:
        inputs, layout = prompt_batch(
            tokenizer, texts, [template], max_length=max_length, denoise=denoise, device=device
        )
        return prompt_vectors(model, inputs, layout)[0]

    return embed


def run(config: PromptBERTConfig, runtime: Runtime) -> tuple[dict, str]:
    tokenizer = load_tokenizer(config.model, config.tokenizer)
    templates = [
        Template.parse(config.template, tokenizer, "template"),
        Template.parse(config.second_template, tokenizer, "second_template"),
    ]
    for template in templates:  # fail now, not after the first batch
        template.budget(config.max_length)
        template.budget(config.eval_max_length, "eval_max_length")
    encoder = build_encoder(config.model, config.keep_every, len(tokenizer), config.seed)
    model = BiEncoder(encoder, pooling="mask").to(runtime.device)
    pair_sets = load_pair_sets(config)
    texts = load_texts(config, config.train_data, config.max_train)
    runtime.log(f"PromptBERT on {len(texts)} texts of {config.train_data}")

    def evaluate() -> dict[str, dict]:
        options = {
            "max_length": config.eval_max_length,
            "batch_size": config.eval_batch_size,
            "device": runtime.device,
        }
        results = {
            pooling: evaluate_bi_encoder(
                BiEncoder(encoder, pooling), tokenizer, pair_sets, **options
            )
            for pooling in ("cls", "mean")
        }
        for name, denoise in (("prompt", False), ("prompt_denoised", True)):
            embed = prompt_embedder(
                model, tokenizer, templates[0], config.eval_max_length, denoise, runtime.device
            )
            with evaluating(model):
                results[name] = evaluate_embedder(embed, pair_sets, config.eval_batch_size)
        return results

    before = evaluate()
    runtime.log(f"before: {before}")

    def prompt_rows(picked: Sequence[str]) -> tuple[dict, Layout]:
        return prompt_batch(
            tokenizer,
            picked,
            templates,
            max_length=config.max_length,
            denoise=config.denoise,
            device=runtime.device,
        )

    def loss_fn(wrapped, batch: list[int]):
        # Under GradCache each chunk carries its own empty templates (one per length in it).
        (first, second), finish = contrastive_views(
            wrapped,
            [texts[i] for i in batch],
            config.grad_cache_chunk,
            prompt_rows,
            lambda model, rows: prompt_vectors(model, *rows),
        )
        loss = kdk.info_nce_loss(
            first,
            second,
            temperature=config.temperature,
            backend=config.loss_backend,
            gather_distributed=config.gather_negatives,
        )
        agreement = torch.nn.functional.cosine_similarity(first.float(), second.float()).mean()
        return finish(loss), {"positive_cosine": agreement.detach()}

    result = run_stage(
        runtime,
        Stage("promptbert", config.epochs, config.lr),
        model,
        loss_fn,
        lambda epoch: shuffled_batches(len(texts), config.batch_size, config.seed, epoch),
    )
    after = evaluate()
    runtime.log(f"after: {after}")
    if runtime.is_main:
        save_encoder(encoder, tokenizer, runtime.output_dir / "model", template=config.template)
    rows = [
        (f"{name} ({phase})", results[name])
        for phase, results in (("before", before), ("after", after))
        for name in results
    ]
    header, table_rows = results_table(rows)
    summary = {
        "model": config.model,
        "layers": encoder.config.num_hidden_layers,
        "train_examples": len(texts),
        "templates": [config.template, config.second_template],
        "denoise": config.denoise,
        "pair_sets": {name: len(pairs) for name, pairs in pair_sets.items()},
        "loss_backend": config.loss_backend,
        "before": before,
        "after": after,
        "training": vars(result),
    }
    return summary, markdown_table(header, table_rows)
