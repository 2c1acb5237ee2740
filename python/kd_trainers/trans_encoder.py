"""Trans-Encoder (Liu et al., ICLR 2022, "Trans-Encoder: Unsupervised sentence-pair modelling
through self- and mutual-distillations").

One PLM alternates between its two forms on unlabeled sentence pairs (a_i, b_i):
    step 1  bi-encoder by contrastive tuning: SimCSE on ``train_data`` (stage ``simcse``;
            ``simcse_epochs=0`` skips it for an encoder that is already contrastive);
    step 2  bi -> cross: pseudo-scores s_i = cos(e(a_i), e(b_i)) of the bi-encoder; a
            cross-encoder (the bi-encoder's weights, a new 1-output head on the [CLS] state of
            "[CLS] a [SEP] b [SEP]") is trained on (a_i, b_i) and (b_i, a_i) with
            BCE-with-logits(logit, clamp(s_i, 0, 1)) (stage ``cross_C``);
    step 3  cross -> bi: pseudo-scores t_i = sigmoid(cross(a_i, b_i)); the bi-encoder (the
            cross-encoder's encoder weights) is trained with MSE(cos(e(a_i), e(b_i)), t_i)
            (stage ``bi_C``).
Both bi-encoder steps take ``grad_cache_chunk`` (GradCache: a batch embedded a chunk at a time,
same loss and gradient) and step 1 ``gather_negatives`` (under torchrun).
Steps 2-3 repeat for ``cycles`` cycles. With ``model2`` (mutual distillation) both PLMs run
every step, and each learns from the two models' averaged pseudo-scores (stages get ``_a`` /
``_b``). ``bi_to_cross_loss`` / ``cross_to_bi_loss`` swap BCE and MSE for the paper's
ablation: cross "mse" is MSE(sigmoid(logit), s); bi "bce" is BCE(clamp(cos, eps, 1 - eps), t).
Pseudo-scores are computed without dropout at the lengths the next stage trains on.

The default pairs are the Lee document pairs without their scores: like the paper, which
trains on the unlabeled STS pairs it is then evaluated on (transductive).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch.nn import functional as F

from kd_trainers.data import ColumnSpec, Example, TextDataset, load_dataset
from kd_trainers.errors import ConfigError
from kd_trainers.models import Head, SequenceModel, encode, load_tokenizer, tiny_shape
from kd_trainers.report import markdown_table
from kd_trainers.sentence import (
    SENTENCE_HELP,
    BiEncoder,
    SentenceConfig,
    build_encoder,
    check_pooling,
    contrastive_views,
    cosine_scores,
    evaluate_bi_encoder,
    evaluating,
    load_pair_sets,
    load_texts,
    pair_metrics,
    results_table,
    save_encoder,
    text_embedder,
    text_inputs,
)
from kd_trainers.simcse import contrastive_stage
from kd_trainers.tasks import cache_of, first_split
from kd_trainers.trainer import Runtime, Stage, run_stage, shuffled_batches

DESCRIPTION = "Trans-Encoder: bi- and cross-encoder distilled into each other on unlabeled pairs"
LOSSES = ("bce", "mse")
# Keeps log(p) and log(1 - p) finite when a cosine is used as a probability.
PROBABILITY_EPS = 1e-6


@dataclass
class TransEncoderConfig(SentenceConfig):
    HELP: ClassVar[dict[str, str]] = {
        **SENTENCE_HELP,
        "pooling": "bi-encoder sentence vector: mean (of tokens) or cls",
        "model2": "second PLM for mutual distillation (none: self-distillation)",
        "keep_every2": "keep every k-th layer of model2",
        "pairs": "unlabeled pairs: lee (scores unused) or a file (text_column, "
        "text_pair_column, default text_pair)",
        "max_pairs": "cap on training pairs (0: all)",
        "simcse_epochs": "step 1: SimCSE epochs on train_data (0: skip)",
        "simcse_lr": "step 1: learning rate",
        "cycles": "repetitions of steps 2 (bi -> cross) and 3 (cross -> bi)",
        "cross_epochs": "step 2: cross-encoder epochs per cycle",
        "cross_lr": "step 2: cross-encoder learning rate",
        "cross_batch_size": "step 2: pairs per micro-batch",
        "cross_max_length": "step 2: tokens of a concatenated pair",
        "bi_epochs": "step 3: bi-encoder epochs per cycle (the paper: 10)",
        "bi_lr": "step 3: bi-encoder learning rate",
        "bi_to_cross_loss": "step 2 loss: bce (the paper) or mse",
        "cross_to_bi_loss": "step 3 loss: mse (the paper) or bce",
        "both_orders": "step 2 trains on (a, b) and (b, a)",
        "restart": "every step starts from the step-1 encoder, not from the other form",
    }
    pooling: str = "mean"
    model2: str | None = None
    keep_every2: int = 1
    pairs: str = "lee"
    max_pairs: int = 0
    simcse_epochs: float = 1.0
    simcse_lr: float = 3e-5
    cycles: int = 3
    cross_epochs: float = 1.0
    cross_lr: float = 2e-5
    cross_batch_size: int = 32
    cross_max_length: int = 64
    bi_epochs: float = 1.0
    bi_lr: float = 5e-5
    bi_to_cross_loss: str = "bce"
    cross_to_bi_loss: str = "mse"
    both_orders: bool = True
    restart: bool = False

    def validate(self) -> None:
        super().validate()
        check_pooling(self.pooling)
        if self.cycles < 1:
            raise ConfigError(f"cycles must be >= 1, got {self.cycles}")
        for name in ("bi_to_cross_loss", "cross_to_bi_loss"):
            if getattr(self, name) not in LOSSES:
                raise ConfigError(f"{name} must be bce or mse, got {getattr(self, name)!r}")
        for name in ("cross_batch_size", "keep_every2"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.cross_max_length < 3:
            raise ConfigError(f"cross_max_length must be >= 3, got {self.cross_max_length}")
        if self.simcse_epochs < 0:
            raise ConfigError(f"simcse_epochs must be >= 0, got {self.simcse_epochs}")


CONFIG = TransEncoderConfig
CROSS_HEAD = Head("pair", 1, "regression")


def pair_inputs(tokenizer, pairs: Sequence[tuple[str, str]], max_length: int, device) -> dict:
    """Cross-encoder input "[CLS] a [SEP] b [SEP]": token_type_ids 0 through the first [SEP],
    1 after; ``longest_first`` truncation trims the longer text, both [SEP] stay. (B, L)."""
    return encode(tokenizer, [Example(a, b) for a, b in pairs], max_length, device)


def cross_encoder(encoder, seed: int) -> SequenceModel:
    """A copy of ``encoder`` with a new (seeded) 1-output head on the [CLS] state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return SequenceModel(copy.deepcopy(encoder), [CROSS_HEAD], pooling="cls")


def cross_loss(logits: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Step 2: ``bce`` = BCE-with-logits against targets clamped into [0, 1] (a cosine can be
    negative); ``mse`` = MSE(sigmoid(logit), target). (B,) fp32 inputs."""
    if kind == "bce":
        return F.binary_cross_entropy_with_logits(logits, targets.clamp(0.0, 1.0))
    return F.mse_loss(torch.sigmoid(logits), targets)


def bi_loss(cosines: torch.Tensor, targets: torch.Tensor, kind: str) -> torch.Tensor:
    """Step 3: ``mse`` = MSE(cos, target) (sentence-transformers' CosineSimilarityLoss);
    ``bce`` = -[t log p + (1 - t) log(1 - p)], p = clamp(cos, eps, 1 - eps). Written out
    because F.binary_cross_entropy refuses to run under autocast."""
    if kind == "mse":
        return F.mse_loss(cosines, targets)
    p = cosines.clamp(PROBABILITY_EPS, 1.0 - PROBABILITY_EPS)
    return -(targets * p.log() + (1.0 - targets) * (1.0 - p).log()).mean()


class TransEncoder:
    """The run's tokenizer, pairs and evaluation sets; each method below is one step."""

    def __init__(self, config: TransEncoderConfig, runtime: Runtime):
        self.config, self.runtime = config, runtime
        self.tokenizer = load_tokenizer(config.model, config.tokenizer)
        if config.model2 and tiny_shape(config.model2) is None:
            other = load_tokenizer(config.model2, config.tokenizer)
            if other.get_vocab() != self.tokenizer.get_vocab():
                raise ConfigError("model2 must share model's tokenizer (the vocabularies differ)")
        self.pair_sets = load_pair_sets(config)
        self.pairs = load_pairs(config)

    def bi_scores(self, model: BiEncoder, pairs, max_length: int) -> torch.Tensor:
        """cos(e(a_i), e(b_i)) without dropout: (N,) fp32."""
        config, device = self.config, self.runtime.device
        with evaluating(model):
            embed = text_embedder(model, self.tokenizer, max_length, device)
            firsts, seconds = [a for a, _ in pairs], [b for _, b in pairs]
            return cosine_scores(embed, firsts, seconds, config.eval_batch_size)

    def cross_scores(self, model: SequenceModel, pairs, max_length: int) -> torch.Tensor:
        """sigmoid(cross(a_i, b_i)) without dropout: (N,) fp32."""
        outputs, size = [], self.config.eval_batch_size
        with evaluating(model):
            for start in range(0, len(pairs), size):
                inputs = pair_inputs(
                    self.tokenizer, pairs[start : start + size], max_length, self.runtime.device
                )
                outputs.append(torch.sigmoid(model(inputs)[0].squeeze(-1)).float().cpu())
        return torch.cat(outputs)

    def evaluate_bi(self, model: BiEncoder) -> dict:
        return evaluate_bi_encoder(
            model,
            self.tokenizer,
            self.pair_sets,
            max_length=self.config.eval_max_length,
            batch_size=self.config.eval_batch_size,
            device=self.runtime.device,
        )

    def evaluate_cross(self, model: SequenceModel) -> dict:
        results = {}
        for name, examples in self.pair_sets.items():
            pairs = [(e.text, e.text_pair) for e in examples]
            scores = self.cross_scores(model, pairs, self.config.eval_max_length)
            results[name] = pair_metrics(scores, examples)
        return results

    def train_cross(self, name: str, model: SequenceModel, targets: torch.Tensor):
        """Step 2 on every pair (and its reverse with ``both_orders``)."""
        config, device = self.config, self.runtime.device
        items = [(a, b, float(s)) for (a, b), s in zip(self.pairs, targets, strict=True)]
        if config.both_orders:
            items += [(b, a, s) for a, b, s in items]

        def loss_fn(wrapped, batch: list[int]):
            picked = [items[i] for i in batch]
            inputs = pair_inputs(
                self.tokenizer, [(a, b) for a, b, _ in picked], config.cross_max_length, device
            )
            logits = wrapped(inputs)[0].squeeze(-1).float()
            gold = torch.tensor([s for _, _, s in picked], device=device)
            return cross_loss(logits, gold, config.bi_to_cross_loss), {}

        return run_stage(
            self.runtime,
            Stage(name, config.cross_epochs, config.cross_lr),
            model,
            loss_fn,
            self.plan(len(items), config.cross_batch_size),
        )

    def train_bi(self, name: str, model: BiEncoder, targets: torch.Tensor):
        """Step 3: both texts of a batch's pairs in one forward, cosine against the target."""
        config, device = self.config, self.runtime.device

        def pair_rows(pairs: Sequence[tuple[str, str]]) -> dict:
            texts = [a for a, _ in pairs] + [b for _, b in pairs]
            return text_inputs(self.tokenizer, texts, config.max_length, device)

        def loss_fn(wrapped, batch: list[int]):
            # Both texts of a chunk's pairs in one forward; GradCache with grad_cache_chunk.
            (first, second), finish = contrastive_views(
                wrapped,
                [self.pairs[i] for i in batch],
                config.grad_cache_chunk,
                pair_rows,
                lambda model, inputs: model(inputs).chunk(2),
            )
            cosines = F.cosine_similarity(first.float(), second.float(), dim=-1)
            gold = targets[batch].to(device)
            return finish(bi_loss(cosines, gold, config.cross_to_bi_loss)), {}

        return run_stage(
            self.runtime,
            Stage(name, config.bi_epochs, config.bi_lr),
            model,
            loss_fn,
            self.plan(len(self.pairs), config.batch_size),
        )

    def plan(self, size: int, batch_size: int):
        seed = self.config.seed
        return lambda epoch: shuffled_batches(size, batch_size, seed, epoch)


def load_pairs(config: TransEncoderConfig) -> list[tuple[str, str]]:
    """The unlabeled training pairs (any scores are ignored), capped at ``max_pairs``."""
    columns = ColumnSpec(
        text=config.text_column,
        text_pair=config.text_pair_column or "text_pair",
        label=None,
        score=None,
    )
    loaded = load_dataset(config.pairs, columns=columns, cache_dir=cache_of(config))
    dataset = first_split(loaded, ("train",))
    kept = [
        Example(e.text, e.text_pair)
        for e in dataset.examples
        if e.text.strip() and e.text_pair is not None and e.text_pair.strip()
    ]
    if not kept:
        raise ConfigError(f"pairs {config.pairs!r} has no (text, text pair) rows")
    capped = TextDataset(dataset.name, kept).subset(config.max_pairs or None, config.seed)
    return [(e.text, e.text_pair or "") for e in capped.examples]


def run(config: TransEncoderConfig, runtime: Runtime) -> tuple[dict, str]:
    method = TransEncoder(config, runtime)
    vocab = len(method.tokenizer)
    specs = [(config.model, config.keep_every)]
    if config.model2:
        specs.append((config.model2, config.keep_every2))
    tags = ["_a", "_b"] if config.model2 else [""]
    keys = ("keep_every", "keep_every2")
    bis = [
        BiEncoder(build_encoder(name, keep, vocab, config.seed + 17 * k, keys[k]), config.pooling)
        for k, (name, keep) in enumerate(specs)
    ]
    for bi in bis:
        bi.to(runtime.device)
    runtime.log(f"{len(method.pairs)} unlabeled pairs from {config.pairs}")
    rows: list[tuple[str, dict]] = []
    summary: dict = {"pairs": len(method.pairs), "models": [s[0] for s in specs]}

    def record(label: str, results: list[dict]) -> dict:
        """Table rows and log lines of one evaluation; {model key: results} for the summary."""
        for tag, result in zip(tags, results, strict=True):
            rows.append((label + tag.replace("_", " "), result))
            runtime.log(f"{label}{tag}: {result}")
        return {tag.strip("_") or "model": r for tag, r in zip(tags, results, strict=True)}

    summary["start"] = record("start", [method.evaluate_bi(bi) for bi in bis])
    if config.simcse_epochs > 0:
        texts = load_texts(config, config.train_data, config.max_train)
        steps = [
            contrastive_stage(
                runtime,
                Stage(f"simcse{tag}", config.simcse_epochs, config.simcse_lr),
                bi,
                method.tokenizer,
                texts,
            )
            for tag, bi in zip(tags, bis, strict=True)
        ]
        summary["simcse_training"] = [vars(s) for s in steps]
        summary["step1"] = record("step 1 (SimCSE)", [method.evaluate_bi(bi) for bi in bis])
    starts = [copy.deepcopy(bi.encoder.state_dict()) for bi in bis]
    summary["cycles"] = []
    for cycle in range(1, config.cycles + 1):
        # Step 2: the bi-encoders' averaged cosines train every cross-encoder.
        targets = torch.stack(
            [method.bi_scores(bi, method.pairs, config.max_length) for bi in bis]
        ).mean(0)
        entry: dict = {"cycle": cycle, "bi_targets_mean": round(float(targets.mean()), 4)}
        crosses, cross_steps = [], []
        for k, (tag, bi) in enumerate(zip(tags, bis, strict=True)):
            cross = cross_encoder(bi.encoder, config.seed + 1000 * cycle + k)
            if config.restart:
                cross.encoder.load_state_dict(starts[k])
            cross_steps.append(method.train_cross(f"cross_{cycle}{tag}", cross, targets))
            crosses.append(cross)
        entry["cross"] = record(f"cycle {cycle} cross", [method.evaluate_cross(c) for c in crosses])
        # Step 3: the cross-encoders' averaged probabilities train every bi-encoder.
        targets = torch.stack(
            [method.cross_scores(c, method.pairs, config.cross_max_length) for c in crosses]
        ).mean(0)
        entry["cross_targets_mean"] = round(float(targets.mean()), 4)
        bi_steps = []
        for k, (tag, bi) in enumerate(zip(tags, bis, strict=True)):
            start = starts[k] if config.restart else crosses[k].encoder.state_dict()
            bi.encoder.load_state_dict(start)
            bi_steps.append(method.train_bi(f"bi_{cycle}{tag}", bi, targets))
        entry["bi"] = record(f"cycle {cycle} bi", [method.evaluate_bi(bi) for bi in bis])
        entry["training"] = {
            "cross": [vars(s) for s in cross_steps],
            "bi": [vars(s) for s in bi_steps],
        }
        summary["cycles"].append(entry)
    summary["loss_backend"] = config.loss_backend
    if runtime.is_main:
        for tag, bi, cross in zip(tags, bis, crosses, strict=True):
            directory = runtime.output_dir / f"bi_encoder{tag}"
            save_encoder(bi.encoder, method.tokenizer, directory, pooling=config.pooling)
            cross.save(runtime.output_dir / f"cross_encoder{tag}", method.tokenizer)
    header, table_rows = results_table(rows)
    table = markdown_table(header, table_rows)
    return summary, table
