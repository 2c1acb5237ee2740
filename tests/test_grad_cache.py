"""kd_kernels.grad_cache on a small torch encoder with dropout: the cached loss, parameter
gradients and input gradients equal one graph over the same pieces (RNG replay gives the same
dropout masks), backward scales by grad_output and leaves the RNG where the forward left it; and
FusedMultipleNegativesRankingLoss(gather_across_devices=True) on 2 gloo processes equals one
process on the concatenated batch. Nothing here imports sentence-transformers."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import kd_kernels as kdk
from kd_kernels.grad_cache import GradCache
from kd_kernels.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

VOCAB, WIDTH, DIM = 50, 16, 8


class ToyEncoder(nn.Module):
    """features {input_ids, attention_mask (B, L)} -> {"sentence_embedding": (B, DIM)}, the
    contract of a SentenceTransformer: embeddings, dropout, masked mean, a linear map."""

    def __init__(self, seed: int = 0):
        super().__init__()
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            self.embedding = nn.Embedding(VOCAB, WIDTH)
            self.dropout = nn.Dropout(0.2)
            self.linear = nn.Linear(WIDTH, DIM)

    def forward(self, features: dict) -> dict:
        mask = features["attention_mask"].unsqueeze(-1).float()
        tokens = self.dropout(self.embedding(features["input_ids"])) * mask
        pooled = tokens.sum(1) / mask.sum(1)
        return {**features, "sentence_embedding": self.linear(pooled)}


def make_features(rows: int, seed: int, length: int = 7) -> dict:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (rows, length), generator=generator)
    lengths = torch.randint(2, length + 1, (rows,), generator=generator)
    mask = (torch.arange(length)[None] < lengths[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask}


def split_rows(features: dict, size: int) -> list[dict]:
    rows = features["input_ids"].shape[0]
    return [{k: v[i : i + size] for k, v in features.items()} for i in range(0, rows, size)]


def info_nce_of(chunks):
    views = torch.cat(chunks)
    first, second = views.chunk(2)
    return kdk.info_nce_loss(first, second, temperature=0.1)


def parameter_grads(module):
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    module.zero_grad(set_to_none=True)
    return grads


@pytest.fixture
def encoder():
    return ToyEncoder().train()


def test_cached_equals_one_graph_with_dropout(encoder):
    pieces = split_rows(make_features(10, seed=1), 3)
    encode = lambda piece: encoder(piece)["sentence_embedding"]  # noqa: E731
    torch.manual_seed(7)
    expected_loss = info_nce_of([encode(p) for p in pieces])
    expected_loss.backward()
    expected = parameter_grads(encoder)

    torch.manual_seed(7)
    cache = GradCache(encode)
    loss = cache.loss(info_nce_of(cache.embed(pieces)))
    after_embed = torch.get_rng_state()
    loss.backward()
    torch.testing.assert_close(loss.detach(), expected_loss.detach(), rtol=1e-6, atol=1e-6)
    for name, grad in parameter_grads(encoder).items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-7)
    # The replay ran in a fork of the RNG: later draws are those after the cached forward.
    assert torch.equal(torch.get_rng_state(), after_embed)


def test_backward_scales_by_grad_output(encoder):
    pieces = split_rows(make_features(8, seed=2), 3)
    encode = lambda piece: encoder(piece)["sentence_embedding"]  # noqa: E731
    grads = []
    for factor in (1.0, 0.25):
        torch.manual_seed(3)
        cache = GradCache(encode)
        (factor * cache.loss(info_nce_of(cache.embed(pieces)))).backward()
        grads.append(parameter_grads(encoder))
    for name, grad in grads[1].items():
        torch.testing.assert_close(grad, 0.25 * grads[0][name], rtol=1e-5, atol=1e-8)


def test_input_gradients_equal_autograd(encoder):
    """The adversarial direction: d loss / d the pieces' input embeddings, no parameter grad."""
    features = make_features(8, seed=4)
    embeddings = encoder.embedding(features["input_ids"]).detach()
    masks = features["attention_mask"].split(3)

    def encode(piece):
        inputs, mask = piece
        pooled = (encoder.dropout(inputs) * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
        return encoder.linear(pooled)

    def views(chunks):
        return info_nce_of([torch.cat(chunks), torch.cat(chunks).flip(0)])

    leaves = [x.clone().requires_grad_() for x in embeddings.split(3)]
    torch.manual_seed(5)
    expected = torch.autograd.grad(
        views([encode(p) for p in zip(leaves, masks, strict=True)]), leaves
    )
    torch.manual_seed(5)
    cache = GradCache(encode)
    loss = views(cache.embed(list(zip(embeddings.split(3), masks, strict=True))))

    def leaf_of(piece):
        leaf = piece[0].clone().requires_grad_()
        return (leaf, piece[1]), leaf

    got = cache.input_gradients(loss, leaf_of)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in encoder.parameters())


def test_no_grad_returns_the_value(encoder):
    pieces = split_rows(make_features(6, seed=6), 4)
    with torch.no_grad():
        cache = GradCache(lambda p: encoder(p)["sentence_embedding"])
        chunks = cache.embed(pieces)
        loss = cache.loss(info_nce_of(chunks))
    assert not loss.requires_grad and not any(c.requires_grad for c in chunks)
    with pytest.raises(ValueError, match="at least one piece"):
        GradCache(lambda p: p).embed([])


# FusedMultipleNegativesRankingLoss(gather_across_devices=True): two ranks of 4 rows against
# one process on the concatenated batch. Each rank's loss is the mean over its own queries and
# the all-gather's backward sums every rank's gradient into the rows' owner, so the ranks' mean
# loss and mean parameter gradient (what DDP averages) are the one-process loss and gradient.
# Eval mode: each process would draw its own dropout masks.
LOCAL_ROWS = 4
GATHER_CASES = {
    "one_way": ({}, 0),
    "symmetric_negatives_cached": (
        {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
        1,
    ),
    "joint_cached": (
        {"directions": ("query_to_doc", "doc_to_query"), "mini_batch_size": 3},
        2,
    ),
}


def rank_columns(rank: int, negatives: int, ranks: tuple[int, ...]) -> list[dict]:
    """Columns (anchor, positive, negatives) of the given ranks' rows, concatenated."""
    return [
        {
            key: torch.cat([make_features(LOCAL_ROWS, seed=100 * r + c)[key] for r in ranks])
            for key in ("input_ids", "attention_mask")
        }
        for c in range(2 + negatives)
    ]


def loss_and_grads(module, options, columns):
    loss = FusedMultipleNegativesRankingLoss(module, **options)(columns, None)
    loss.backward()
    return loss.detach(), parameter_grads(module)


def _gather_worker(rank, world_size, store, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world_size)
    encoder = ToyEncoder().eval()
    results = {}
    for name, (options, negatives) in GATHER_CASES.items():
        columns = rank_columns(rank, negatives, (rank,))
        options = {**options, "gather_across_devices": True}
        results[name] = loss_and_grads(encoder, options, columns)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def gathered(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("grad_cache_gather")
    mp.spawn(_gather_worker, args=(2, str(out_dir / "store"), str(out_dir)), nprocs=2, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(2)]


@pytest.mark.parametrize("name", list(GATHER_CASES))
def test_gather_across_devices_equals_one_process(gathered, name):
    options, negatives = GATHER_CASES[name]
    expected_loss, expected = loss_and_grads(
        ToyEncoder().eval(), options, rank_columns(0, negatives, (0, 1))
    )
    torch.testing.assert_close(
        (gathered[0][name][0] + gathered[1][name][0]) / 2, expected_loss, rtol=1e-5, atol=1e-6
    )
    for key, grad in expected.items():
        mean = (gathered[0][name][1][key] + gathered[1][name][1][key]) / 2
        torch.testing.assert_close(mean, grad, rtol=1e-4, atol=1e-6)
