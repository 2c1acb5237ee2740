"""In-batch InfoNCE, forward + backward: peak extra memory and time against the batch size N.

    python -m benchmarks.info_nce                          # CPU: N = 1k .. 32k, D = 768, fp32
    python -m benchmarks.info_nce --device cuda --dtype bfloat16 --sizes 4096 16384 65536 262144

Implementations (one-way, t = 0.05): the eager formulation
(``cross_entropy(normalize(q) @ normalize(k).T / t)``, an N x N matrix, run while N x N fits
the --eager-limit), sentence-transformers' MultipleNegativesRankingLoss on the embeddings where
it installs, Inf-CL on a GPU where it installs, and the fused backends (torch.compile: in the
suite, ``python -m benchmarks``). Each N is a fresh measurement of every implementation; an
implementation that runs out of memory is recorded as such and not run at larger N.
On a GPU, ``--memory-budget-gib`` (default 16) reports the largest N each one fits in.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kd_kernels as kdk
from benchmarks._harness import (
    OpSuite,
    SkipPeer,
    add_common_arguments,
    competitors,
    loss_step,
    markdown_table,
    measure_at_size,
    report,
    suite_implementations,
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument(
        "--eager-limit", type=int, default=16384, help="largest N for the N x N implementations"
    )
    parser.add_argument("--memory-budget-gib", type=float, default=16.0)
    add_common_arguments(parser, repeats=3, warmup=1)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    impls = competitors(SUITE, args.device, with_compile=False)
    failed: set[str] = set()
    rows, tables = [], []
    for size in args.sizes:
        query = torch.randn(size, args.dim, generator=generator).to(args.device, dtype)
        key = torch.randn(size, args.dim, generator=generator).to(args.device, dtype)
        query.requires_grad_(True)
        key.requires_grad_(True)
        results = []
        for name, loss_fn in impls.items():
            quadratic = hasattr(loss_fn, "max_x")
            if name in failed or (quadratic and size > args.eager_limit):
                continue

            step = loss_step(loss_fn, (query, key, False), [query, key])
            result = measure_at_size(name, step, size, args, rows, failed)
            if result is not None:
                results.append(result)
        baseline = "eager" if any(r.name == "eager" for r in results) else results[0].name
        tables.append(f"N = {size}, D = {args.dim}\n\n" + markdown_table(results, baseline))
        del query, key
    budget_mib = args.memory_budget_gib * 1024
    largest = {}
    for row in rows:
        if not row.get("out_of_memory") and row["peak_extra_mib"] <= budget_mib:
            largest[row["name"]] = max(largest.get(row["name"], 0), row["n"])
    table = "\n\n".join(tables)
    table += f"\n\nLargest N measured within {args.memory_budget_gib:g} GiB of extra memory: "
    table += ", ".join(f"{name} {n}" for name, n in largest.items())
    name = f"info_nce_D{args.dim}_{args.dtype}"
    return report("info_nce fwd+bwd", name, args, rows, table, largest_n_within_budget=largest)


# The suite (python -m benchmarks): N up to 32k on the CPU, 1M on a GPU; one-way and symmetric.
SUITE_TEMPERATURE = 0.05
# The N x N implementations (eager, MNRL) hold several N x N fp32 matrices: cap their N.
QUADRATIC_MAX_N = {"cpu": 16384, "cuda": 65536}


def _suite_cases(device: str, quick: bool) -> list:
    if quick:
        cases = [(64, 32, False), (256, 32, False), (256, 32, True)]
    elif device == "cpu":
        cases = [(1024, 768, False), (4096, 768, False), (4096, 768, True), (16384, 768, False)]
        cases.append((32768, 768, False))
    else:
        # The GPU suite measures the first cases of each op: one-way and symmetric come first.
        cases = [(4096, 768, False), (4096, 768, True), (16384, 768, False)]
        cases += [(65536, 768, False), (65536, 768, True), (262144, 768, False)]
        cases.append((1048576, 768, False))

    def make(rows, dim, symmetric):
        def inputs(dtype, device):
            generator = torch.Generator().manual_seed(0)
            query = torch.randn(rows, dim, generator=generator).to(device, dtype)
            key = torch.randn(rows, dim, generator=generator).to(device, dtype)
            return query.requires_grad_(), key.requires_grad_(), symmetric

        return inputs

    return [
        (f"N={n} D={d}{' symmetric' if sym else ''}", n, make(n, d, sym)) for n, d, sym in cases
    ]


def _eager_pair(query, key, symmetric):
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / SUITE_TEMPERATURE
    labels = torch.arange(query.shape[0], device=query.device)
    loss = F.cross_entropy(logits.float(), labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.float().T, labels)) / 2
    return loss


def _suite_implementations(device: str, quick: bool) -> tuple[dict, dict]:
    def ranking_loss():
        one_way, both_ways = _ranking_losses()

        def ranking(query, key, symmetric):
            loss = both_ways if symmetric else one_way
            return loss.compute_loss_from_embeddings([query, key], None)

        return ranking

    def cached_ranking_loss():
        raise SkipPeer(
            "re-encodes mini-batches with its SentenceTransformer model: it is not a loss on "
            "given embeddings, so it belongs in a training benchmark"
        )

    impls, skipped = suite_implementations(
        device,
        quick,
        "eager",
        _eager_pair,
        {
            "sentence-transformers MNRL": ranking_loss,
            "sentence-transformers CachedMNRL": cached_ranking_loss,
            "Inf-CL": lambda: _inf_cl(device),
        },
        lambda backend: (
            lambda q, k, sym: kdk.info_nce_loss(
                q, k, temperature=SUITE_TEMPERATURE, symmetric=sym, backend=backend
            )
        ),
    )
    if "kd_kernels[triton]" in impls:
        # Triton's mean / sum loss forms its gradient in forward; reduction="none" then mean()
        # is the same loss through the forward + recomputing backward kernels (what mean ran
        # before): the pair measures the fused walk against it.
        impls["kd_kernels[triton] none+mean"] = lambda q, k, sym: kdk.info_nce_loss(
            q, k, temperature=SUITE_TEMPERATURE, symmetric=sym, reduction="none", backend="triton"
        ).mean()
    for name in ("eager", "torch.compile(eager)", "sentence-transformers MNRL"):
        if name in impls:
            impls[name] = _capped(impls[name], QUADRATIC_MAX_N[device])
    return impls, skipped


def _inf_cl(device: str):
    if device != "cuda":
        raise SkipPeer("CUDA only")
    from inf_cl import cal_inf_loss

    scale = 1 / SUITE_TEMPERATURE

    def inf_cl(query, key, symmetric):
        q, k = F.normalize(query, dim=-1), F.normalize(key, dim=-1)
        loss = cal_inf_loss(q, k, scale=scale).mean()
        if symmetric:
            loss = (loss + cal_inf_loss(k, q, scale=scale).mean()) / 2
        return loss

    return inf_cl


def _ranking_losses():
    """sentence-transformers' MNRL, one-way and symmetric, in the API of 6.2 or of 6.0."""
    scale = 1 / SUITE_TEMPERATURE
    try:
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )

        both_ways = MultipleNegativesRankingLoss(
            torch.nn.Identity(),
            scale=scale,
            directions=("query_to_doc", "doc_to_query"),
            partition_mode="per_direction",
        )
    except (ImportError, TypeError):  # 6.0: the old module and the symmetric class
        from sentence_transformers.losses import (
            MultipleNegativesRankingLoss,
            MultipleNegativesSymmetricRankingLoss,
        )

        both_ways = MultipleNegativesSymmetricRankingLoss(torch.nn.Identity(), scale=scale)
    return MultipleNegativesRankingLoss(torch.nn.Identity(), scale=scale), both_ways


def _capped(fn, max_rows: int):
    """Marks an N x N implementation: the suite skips it for N above ``max_rows``."""

    def capped(query, key, symmetric):
        return fn(query, key, symmetric)

    capped.max_x = max_rows
    return capped


SUITE = OpSuite(
    op="info_nce",
    cases=_suite_cases,
    implementations=_suite_implementations,
    differentiable=lambda inputs: [inputs[0], inputs[1]],
    # fwd+bwd: the similarity matmul and the two gradient matmuls, 2 N M D flops each.
    flops=lambda inputs: 6 * inputs[0].shape[0] * inputs[1].shape[0] * inputs[0].shape[1],
)


if __name__ == "__main__":
    main()
