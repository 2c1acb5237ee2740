"""In-batch InfoNCE, forward + backward: peak extra memory and time against the batch size N.

    python -m benchmarks.info_nce                          # CPU: N = 1k .. 32k, D = 768, fp32
    python -m benchmarks.info_nce --device cuda --dtype bfloat16 --sizes 4096 16384 65536 262144

Implementations: the eager formulation (``cross_entropy(normalize(q) @ normalize(k).T / t)``,
an N x N matrix, run while N x N fits the --eager-limit), sentence-transformers'
MultipleNegativesRankingLoss on the embeddings where it installs, Inf-CL on a GPU where it
installs, and the fused backends. Each N is a fresh measurement of every implementation; an
implementation that runs out of memory is recorded as such and not run at larger N.
On a GPU, ``--memory-budget-gib`` (default 16) reports the largest N each one fits in.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import kd_kernels as kdk
from benchmarks._harness import (
    add_common_arguments,
    fused_backends,
    markdown_table,
    measure,
    report,
)


def eager_info_nce(query: torch.Tensor, key: torch.Tensor, temperature: float) -> torch.Tensor:
    logits = F.normalize(query, dim=-1) @ F.normalize(key, dim=-1).T / temperature
    labels = torch.arange(query.shape[0], device=query.device)
    return F.cross_entropy(logits.float(), labels)


def peer_implementations(device: str) -> dict:
    peers = {}
    try:
        from sentence_transformers.sentence_transformer.losses import (
            MultipleNegativesRankingLoss,
        )

        def ranking_loss(query, key, temperature):
            loss = MultipleNegativesRankingLoss(torch.nn.Identity(), scale=1 / temperature)
            return loss.compute_loss_from_embeddings([query, key], None)

        peers["sentence-transformers MNRL"] = ranking_loss
    except ImportError as error:
        print(f"skip sentence-transformers: {error}")
    if device == "cuda":
        try:
            from inf_cl import cal_inf_loss

            def inf_cl(query, key, temperature):
                return cal_inf_loss(
                    F.normalize(query, dim=-1), F.normalize(key, dim=-1), scale=1 / temperature
                ).mean()

            peers["Inf-CL"] = inf_cl
        except ImportError as error:
            print(f"skip Inf-CL: {error}")
    return peers


def implementations(device: str) -> dict:
    impls = {"eager": eager_info_nce, **peer_implementations(device)}
    for backend in fused_backends(device):
        impls[f"kd_kernels[{backend}]"] = lambda q, k, t, backend=backend: kdk.info_nce_loss(
            q, k, temperature=t, backend=backend
        )
    return impls


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--temperature", type=float, default=0.05)
    parser.add_argument(
        "--eager-limit", type=int, default=16384, help="largest N for the N x N implementations"
    )
    parser.add_argument("--memory-budget-gib", type=float, default=16.0)
    add_common_arguments(parser, repeats=3, warmup=1)
    args = parser.parse_args(argv)

    dtype = getattr(torch, args.dtype)
    generator = torch.Generator().manual_seed(0)
    impls = implementations(args.device)
    quadratic = {"eager", "sentence-transformers MNRL"}
    failed: set[str] = set()
    rows, tables = [], []
    for size in args.sizes:
        query = torch.randn(size, args.dim, generator=generator).to(args.device, dtype)
        key = torch.randn(size, args.dim, generator=generator).to(args.device, dtype)
        query.requires_grad_(True)
        key.requires_grad_(True)
        results = []
        for name, loss_fn in impls.items():
            if name in failed or (name in quadratic and size > args.eager_limit):
                continue

            def step(loss_fn=loss_fn, query=query, key=key):
                loss = loss_fn(query, key, args.temperature)
                return torch.autograd.grad(loss, (query, key))

            try:
                result = measure(name, step, args.device, args.warmup, args.repeats)
            except torch.OutOfMemoryError:
                failed.add(name)
                print(f"N={size} {name}: out of memory")
                rows.append({"n": size, "name": name, "out_of_memory": True})
                continue
            results.append(result)
            rows.append({"n": size, **vars(result)})
            print(f"N={size} {name}: {result.median_ms:.1f} ms, {result.peak_extra_mib:.0f} MiB")
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


if __name__ == "__main__":
    main()
