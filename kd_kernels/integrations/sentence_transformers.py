"""sentence-transformers drop-in: ``FusedMultipleNegativesRankingLoss``, the InfoNCE of
``MultipleNegativesRankingLoss`` (MNRL) and ``CachedMultipleNegativesRankingLoss`` on
``kd_kernels.info_nce_loss`` (no N x M similarity matrix) with optional GradCache.

    from kd_kernels.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss
    loss = FusedMultipleNegativesRankingLoss(model, mini_batch_size=64)
    trainer = SentenceTransformerTrainer(model=model, train_dataset=data, loss=loss)

Needs ``pip install kd_kernels[st]`` (sentence-transformers and accelerate, for its trainer).
The loss itself imports sentence-transformers only to embed columns as MNRL does, and only once
the caller has imported it: any module mapping a features dict to ``{"sentence_embedding": (B, D)}``
works as ``model``.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

import kd_kernels as kdk
from kd_kernels import distributed
from kd_kernels.grad_cache import GradCache

logger = logging.getLogger(__name__)

DIRECTIONS = ("query_to_doc", "doc_to_query")
PARTITION_MODES = ("joint", "per_direction")
# MNRL's other directions: same-type negatives. Their softmax leaves out each row's own
# similarity (the diagonal), which the fused loss has no mask for.
UNSUPPORTED_DIRECTIONS = ("query_to_query", "doc_to_doc")


# sentence_transformers.util's functions by name -> info_nce_loss's similarity (recognised
# without importing sentence-transformers).
SIMILARITIES = {"cos_sim": "cosine", "dot_score": "dot"}


def _similarity_name(similarity_fct: Callable | None) -> str:
    """``None`` or ``util.cos_sim`` -> "cosine", ``util.dot_score`` -> "dot"."""
    if similarity_fct is None:
        return "cosine"
    module = getattr(similarity_fct, "__module__", None) or ""
    name = getattr(similarity_fct, "__name__", None)
    if module.startswith("sentence_transformers") and name in SIMILARITIES:
        return SIMILARITIES[name]
    raise NotImplementedError(
        "similarity_fct must be sentence_transformers.util.cos_sim or util.dot_score, got "
        f"{getattr(similarity_fct, '__name__', similarity_fct)!r}"
    )


def _embed_columns(model: nn.Module, features: list[dict]) -> list[Tensor]:
    """Every column's ``sentence_embedding`` the way MNRL embeds them (its merged forward pass
    where this sentence-transformers has one), so dropout draws the same masks as MNRL's."""
    if "sentence_transformers" not in sys.modules:  # then the model is not a SentenceTransformer
        return [model(dict(f))["sentence_embedding"] for f in features]
    try:
        from sentence_transformers.base.losses.merged_forward import embed_columns
    except ImportError:  # sentence-transformers before the merged forward
        return [model(f)["sentence_embedding"] for f in features]
    return embed_columns(model, features)


def _rows(features: dict[str, Any]) -> int:
    for key in ("input_ids", "attention_mask"):
        value = features.get(key)
        if isinstance(value, Tensor) and value.dim() >= 1:
            return value.shape[0]
    return next(v.shape[0] for v in features.values() if isinstance(v, Tensor) and v.dim() >= 1)


def mini_batch(features: dict[str, Any], begin: int, end: int) -> dict[str, Any]:
    """Rows ``begin:end`` of a padded batch, cut to the widest real sequence among them.

    Tensors whose first dimension is the batch are sliced; (B, L) tensors lose the trailing
    columns where ``attention_mask`` is 0 on every kept row (leading padding stays, it may set
    positions). The same cut as CachedMultipleNegativesRankingLoss, so dropout draws masks of
    the same shapes and the two losses agree with dropout on.
    """
    if "cu_seq_lens_q" in features:
        raise NotImplementedError(
            "mini_batch_size with flattened (padding-free) inputs is not supported: use padded "
            "batches or mini_batch_size=None"
        )
    rows = _rows(features)
    mask = features.get("attention_mask")
    width = None
    if isinstance(mask, Tensor) and mask.dim() == 2:
        active = mask[begin:end].bool().any(dim=0).nonzero()
        if len(active) and int(active.max()) + 1 < mask.shape[1]:
            width = int(active.max()) + 1
    sliced = {}
    for key, value in features.items():
        if not (isinstance(value, Tensor) and value.dim() >= 1 and value.shape[0] == rows):
            sliced[key] = value
            continue
        value = value[begin:end]
        if width is not None and value.dim() >= 2 and value.shape[1] == mask.shape[1]:  # type: ignore[union-attr]
            value = value[:, :width]
        sliced[key] = value
    return sliced


def multiple_negatives_ranking_loss(
    queries: Tensor,
    docs: Sequence[Tensor],
    *,
    scale: float,
    similarity: str,
    directions: Sequence[str],
    partition_mode: str,
    gather: bool,
    backend: str = "auto",
) -> Tensor:
    """MNRL on embeddings, through ``kdk.info_nce_loss``.

    queries (B, D); docs: the positives (B, D) then any hard-negative columns (B, D) each; keys
    k = [positives; negatives] (M = B (1 + n)). z_ij = scale sim(q_i, k_j):
        query_to_doc  a_i = logsumexp_j z_ij - z_ii
        doc_to_query  b_i = logsumexp_j z_ji - z_ii, over the queries j (positives only)
    and the loss is mean_i a_i; with both directions mean_i (a_i + b_i) / 2 for
    ``per_direction`` (one softmax each; ``info_nce_loss(symmetric=True)``) and
    mean_i log(exp(a_i) + exp(b_i)) for ``joint`` (one softmax over both rows' scores:
    logsumexp of the union minus z_ii). With ``gather`` the keys (and, for doc_to_query, the
    queries) of every rank take part, gradients flowing back to their owners.
    """
    keys = torch.cat(list(docs)) if len(docs) > 1 else docs[0]
    options = {
        "temperature": 1.0 / scale,
        "similarity": similarity,
        "gather_distributed": gather,
        "backend": backend,
    }
    if tuple(directions) == ("query_to_doc",):
        return kdk.info_nce_loss(queries, keys, **options)
    if partition_mode == "per_direction":
        return kdk.info_nce_loss(queries, keys, symmetric=True, **options)
    forward = kdk.info_nce_loss(queries, keys, reduction="none", **options)
    backward = kdk.info_nce_loss(keys[: queries.shape[0]], queries, reduction="none", **options)
    return torch.logaddexp(forward, backward).mean()


class FusedMultipleNegativesRankingLoss(nn.Module):
    """MultipleNegativesRankingLoss / CachedMultipleNegativesRankingLoss on the fused InfoNCE.

    Called as they are: ``loss(sentence_features, labels)`` with an anchor column, a positive
    column and any number of hard-negative columns (labels unused); usable as
    ``SentenceTransformerTrainer(loss=...)``. The loss and the model's gradients equal MNRL's
    (``mini_batch_size=None``; the columns embedded as MNRL embeds them) and CachedMNRL's (the
    same ``mini_batch_size``; the same mini-batches, each re-embedded from its RNG state so
    dropout masks match).

    Args:
        model: the SentenceTransformer (or the trainer's wrapper of it).
        scale: 1 / temperature: z = scale * sim.
        similarity_fct: ``util.cos_sim`` (or None, the same) or ``util.dot_score``.
        mini_batch_size: None: one forward pass with gradient (MNRL). An int: GradCache; memory
            is then the (B (2 + n), D) embeddings and one mini-batch's activations.
        gather_across_devices: under torch.distributed, every rank's keys (and queries, for
            doc_to_query) are negatives for every local query (``kd_kernels.distributed``'s
            all-gather with gradient; ranks may hold different batch sizes). Without a process
            group it is ignored with a warning, as MNRL does.
        directions: ``("query_to_doc",)`` or ``("query_to_doc", "doc_to_query")``.
        partition_mode: ``"joint"`` or ``"per_direction"`` (the same loss for one direction).
        show_progress_bar: accepted for CachedMNRL's signature; no bar is drawn.
        hardness_mode, hardness_strength, mini_batch_num_tokens: only their defaults.
        backend: the ``info_nce_loss`` backend (``"auto"``: the fused kernel of the device).

    Raises:
        NotImplementedError naming the argument for a similarity function, direction, hardness
        mode or token-budget mini-batching that the fused loss does not compute; ValueError for
        values MNRL refuses too.
    """

    def __init__(
        self,
        model: nn.Module,
        scale: float = 20.0,
        similarity_fct: Callable[[Tensor, Tensor], Tensor] | None = None,
        mini_batch_size: int | None = None,
        gather_across_devices: bool = False,
        directions: tuple[str, ...] = ("query_to_doc",),
        partition_mode: str = "joint",
        show_progress_bar: bool = False,
        hardness_mode: str | None = None,
        hardness_strength: float = 0.0,
        mini_batch_num_tokens: int | None = None,
        backend: str = "auto",
    ):
        super().__init__()
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a finite number > 0, got {scale!r}")
        self._similarity = _similarity_name(similarity_fct)
        if isinstance(directions, str) or not directions:
            raise ValueError(f"directions must be a non-empty tuple, got {directions!r}")
        unsupported = [d for d in directions if d in UNSUPPORTED_DIRECTIONS]
        if unsupported:
            raise NotImplementedError(
                f"directions {unsupported} are not supported by the fused loss (their softmax "
                f"excludes each row's own similarity); supported: {DIRECTIONS}"
            )
        unknown = [d for d in directions if d not in DIRECTIONS]
        if unknown or "query_to_doc" not in directions:
            raise ValueError(
                f"directions must include 'query_to_doc' and come from {DIRECTIONS}, got "
                f"{tuple(directions)}"
            )
        if partition_mode not in PARTITION_MODES:
            raise ValueError(
                f"partition_mode must be 'joint' or 'per_direction', got {partition_mode!r}"
            )
        if hardness_mode is not None:
            raise NotImplementedError(
                f"hardness_mode={hardness_mode!r} is not supported by the fused loss (use None)"
            )
        if hardness_strength != 0.0:
            raise NotImplementedError(
                f"hardness_strength={hardness_strength!r} is not supported (hardness_mode=None)"
            )
        if mini_batch_num_tokens is not None:
            raise NotImplementedError(
                "mini_batch_num_tokens is not supported: give mini_batch_size (sequences)"
            )
        if mini_batch_size is not None and not (
            isinstance(mini_batch_size, int) and mini_batch_size >= 1
        ):
            raise ValueError(
                f"mini_batch_size must be None or an int >= 1, got {mini_batch_size!r}"
            )
        self.model = model
        self.scale = float(scale)
        self.similarity_fct = similarity_fct
        self.mini_batch_size = mini_batch_size
        self.gather_across_devices = gather_across_devices
        self.directions = tuple(dict.fromkeys(directions))
        self.partition_mode = partition_mode
        self.show_progress_bar = show_progress_bar
        self.backend = backend
        self._warned_no_group = False

    @property
    def uses_gradient_cache(self) -> bool:
        """sentence-transformers' flag for losses that re-embed in backward (MatryoshkaLoss
        and AdaptiveLayerLoss check it)."""
        return self.mini_batch_size is not None

    @property
    def temperature(self) -> float:
        return 1.0 / self.scale

    def _gather(self) -> bool:
        if not self.gather_across_devices:
            return False
        if distributed.distributed_ready():
            return True
        if not self._warned_no_group:
            logger.warning(
                "gather_across_devices=True without an initialised torch.distributed group: "
                "using the local batch only"
            )
            self._warned_no_group = True
        return False

    def compute_loss_from_embeddings(
        self, embeddings: list[Tensor], labels: Tensor | None = None
    ) -> Tensor:
        """The loss of per-column embeddings [anchors (B, D), positives (B, D), negatives...]."""
        if len(embeddings) < 2:
            raise ValueError(f"Expected at least 2 embeddings, got {len(embeddings)}")
        return multiple_negatives_ranking_loss(
            embeddings[0],
            embeddings[1:],
            scale=self.scale,
            similarity=self._similarity,
            directions=self.directions,
            partition_mode=self.partition_mode,
            gather=self._gather(),
            backend=self.backend,
        )

    def forward(
        self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor | None = None
    ) -> Tensor:
        features = list(sentence_features)
        if len(features) < 2:
            raise ValueError(f"Expected at least 2 inputs, got {len(features)}")
        if self.mini_batch_size is None:
            return self.compute_loss_from_embeddings(_embed_columns(self.model, features), labels)
        # GradCache over (column, mini-batch) pieces, column by column as CachedMNRL embeds
        # them (the RNG draws, and so the dropout masks, come in the same order).
        size = self.mini_batch_size
        spans = [
            (column, begin)
            for column, feature in enumerate(features)
            for begin in range(0, _rows(feature), size)
        ]
        pieces = [mini_batch(features[column], begin, begin + size) for column, begin in spans]

        def encode(piece: dict[str, Any]) -> Tensor:
            # A fresh dict each pass: the model adds its outputs to the one it is given.
            return self.model(dict(piece))["sentence_embedding"]

        cache = GradCache(encode, module=self.model)
        chunks = cache.embed(pieces)
        columns = [
            torch.cat([e for (column, _), e in zip(spans, chunks, strict=True) if column == c])
            for c in range(len(features))
        ]
        return cache.loss(self.compute_loss_from_embeddings(columns, labels))

    def get_config_dict(self) -> dict[str, Any]:
        return {
            "scale": self.scale,
            "similarity_fct": "dot_score" if self._similarity == "dot" else "cos_sim",
            "mini_batch_size": self.mini_batch_size,
            "gather_across_devices": self.gather_across_devices,
            "directions": self.directions,
            "partition_mode": self.partition_mode,
            "backend": self.backend,
        }

    @property
    def citation(self) -> str:
        return """
@misc{gao2021scaling,
    title={Scaling Deep Contrastive Learning Batch Size under Memory Limited Setup},
    author={Luyu Gao and Yunyi Zhang and Jiawei Han and Jamie Callan},
    year={2021},
    eprint={2101.06983},
    archivePrefix={arXiv},
    primaryClass={cs.LG}
}
"""
