"""Large-batch contrastive training: the largest batch of (anchor, positive) pairs one training
step fits in a memory budget, and its time per 1,000 pairs, for a MiniLM-size encoder.

    python -m benchmarks.large_batch --threads 1                  # CPU: 2 GiB, N = 64 .. 512
    python -m benchmarks.large_batch --device cuda --dtype bfloat16 --budget-gib 16 \\
        --sizes 1024 4096 16384 65536 262144 --mini-batch 256

Implementations, at the same mini-batch size: ours, ``FusedMultipleNegativesRankingLoss``
(fused InfoNCE + GradCache, kd_kernels.integrations.sentence_transformers); sentence-
transformers' ``MultipleNegativesRankingLoss`` (one pass: every activation of the batch at
once, and the N x N similarity matrix); and ``CachedMultipleNegativesRankingLoss`` (GradCache
with the loss computed mini-batch rows at a time). A step is ``loss(features).backward()``
on a random-weight BERT of MiniLM-L6's shape (6 x 384, 12 heads, vocabulary 30,522; weights
do not change time or memory), fixed-length random token ids, mean pooling, cosine, scale 20.

Each implementation runs the sizes in order until its peak extra memory passes the budget (or,
on a GPU, it runs out of memory); its largest batch within the budget is the largest measured
one, and the per-pair slope of its last two points extrapolates where the budget would end
(reported separately, labelled as such). One table, one plot (batch size against peak memory
and time per 1,000 pairs, one line each) and the JSON go to benchmarks/results/<device>/.
"""

from __future__ import annotations

import argparse
import os

import torch
from torch import nn

from benchmarks._harness import add_common_arguments, measure, plot_lines, report
from benchmarks.training import tiny_bert

OURS = "kd_kernels fused + GradCache"
MNRL = "sentence-transformers MNRL"
CACHED = "sentence-transformers CachedMNRL"


class TokenEmbeddings(nn.Module):
    """features -> features + ``token_embeddings`` (B, L, D), as sentence-transformers'
    Transformer module does."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, features: dict) -> dict:
        inputs = {k: v for k, v in features.items() if k in ("input_ids", "attention_mask")}
        return {**features, "token_embeddings": self.bert(**inputs).last_hidden_state}


class MeanPooling(nn.Module):
    def forward(self, features: dict) -> dict:
        hidden = features["token_embeddings"]
        weights = features["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        return {**features, "sentence_embedding": (hidden * weights).sum(1) / weights.sum(1)}


def sentence_encoder(bert: nn.Module) -> nn.Sequential:
    """A SentenceTransformer's shape without its tokenizer: modules in sequence, features
    dict in, ``sentence_embedding`` (B, D) out."""
    return nn.Sequential(TokenEmbeddings(bert), MeanPooling())


def losses(model: nn.Module, mini_batch: int) -> dict:
    try:
        from sentence_transformers.sentence_transformer.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )
    except ImportError:  # sentence-transformers 6.0 (the GPU image): the old module
        from sentence_transformers.losses import (
            CachedMultipleNegativesRankingLoss,
            MultipleNegativesRankingLoss,
        )

    from kd_kernels.integrations.sentence_transformers import FusedMultipleNegativesRankingLoss

    return {
        OURS: FusedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch),
        MNRL: MultipleNegativesRankingLoss(model),
        CACHED: CachedMultipleNegativesRankingLoss(model, mini_batch_size=mini_batch),
    }


def pair_features(size: int, length: int, device: str, seed: int) -> list[dict]:
    """Anchor and positive columns: (size, length) random token ids, no padding."""
    generator = torch.Generator().manual_seed(seed)
    return [
        {
            "input_ids": torch.randint(1000, 30000, (size, length), generator=generator).to(device),
            "attention_mask": torch.ones(size, length, dtype=torch.long, device=device),
        }
        for _ in range(2)
    ]


def extrapolated_largest(points: list[dict], budget_mib: float) -> int | None:
    """Where the line through the last two measured (N, peak MiB) points meets the budget."""
    if len(points) < 2:
        return None
    (n0, m0), (n1, m1) = ((p["n"], p["peak_extra_mib"]) for p in points[-2:])
    slope = (m1 - m0) / (n1 - n0)
    if slope <= 0:
        return None
    return int(n1 + (budget_mib - m1) / slope)


def plot(rows: list[dict], budget_mib: float, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (memory_axis, time_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, list[tuple]] = {}
    for row in rows:
        if "peak_extra_mib" in row:
            point = (row["n"], row["seconds_per_1000"] * 1e3, row["peak_extra_mib"])
            lines.setdefault(row["name"], []).append(point)
    plot_lines(time_axis, memory_axis, lines)
    # Ours and CachedMNRL hold the same memory here: draw ours dashed over it, so both show.
    for axis in (memory_axis, time_axis):
        for line in axis.get_lines():
            if line.get_label() == OURS:
                line.set(linestyle="--", marker="s", zorder=3)
    memory_axis.axhline(budget_mib, color="grey", linestyle="--", label="budget")
    for axis, label in (
        (memory_axis, "peak extra memory (MiB)"),
        (time_axis, "ms per 1,000 pairs"),
    ):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("batch size (pairs)")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    memory_axis.legend(fontsize=8)
    figure.suptitle("One training step of a MiniLM-size encoder, by batch size")
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128, 256, 512])
    parser.add_argument("--budget-gib", type=float, default=2.0)
    parser.add_argument("--mini-batch", type=int, default=32, help="GradCache mini-batch")
    parser.add_argument("--length", type=int, default=16, help="tokens per text")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--hidden", type=int, default=384)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (0: default; 1 on a shared CPU)"
    )
    add_common_arguments(parser, repeats=1, warmup=0)
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    budget_mib = args.budget_gib * 1024
    bert = tiny_bert(
        args.layers, args.hidden, args.device, dtype, heads=args.heads, vocab_size=30522
    )
    model = sentence_encoder(bert).train()
    rows, results = [], []
    impls = losses(model, args.mini_batch)

    def step(features, loss_fn):
        loss_fn(features, None).backward()
        model.zero_grad(set_to_none=True)

    for loss_fn in impls.values():  # warm-up
        step(pair_features(args.mini_batch, args.length, args.device, seed=0), loss_fn)
    stopped: set[str] = set()
    # Sizes outside, implementations inside: on a shared machine the load drifts over a run,
    # and neighbours in time see the same load.
    for size in sorted(args.sizes):
        features = pair_features(size, args.length, args.device, seed=size)
        for name, loss_fn in impls.items():
            if name in stopped:
                continue
            try:
                result = measure(
                    f"{name} N={size}",
                    lambda f=features, fn=loss_fn: step(f, fn),
                    args.device,
                    args.warmup,
                    args.repeats,
                )
            except torch.OutOfMemoryError:
                rows.append({"name": name, "n": size, "out_of_memory": True})
                print(f"{name} N={size}: out of memory")
                stopped.add(name)
                continue
            seconds = result.median_ms / 1e3 / size * 1000
            rows.append({**vars(result), "name": name, "n": size, "seconds_per_1000": seconds})
            results.append(result)
            print(
                f"{name} N={size}: {seconds:.2f} s / 1,000 pairs, {result.peak_extra_mib:.0f} MiB"
            )
            if result.peak_extra_mib > budget_mib:
                stopped.add(name)
    summary = []
    for name in (OURS, MNRL, CACHED):
        within = [
            r
            for r in rows
            if r["name"] == name and r.get("peak_extra_mib", budget_mib + 1) <= budget_mib
        ]
        if not within:
            summary.append({"name": name, "largest_measured": None})
            continue
        best = within[-1]
        summary.append(
            {
                "name": name,
                "largest_measured": best["n"],
                "peak_extra_mib": best["peak_extra_mib"],
                "seconds_per_1000": best["seconds_per_1000"],
                "extrapolated_largest": extrapolated_largest(within, budget_mib),
                "stopped_by_budget": any(
                    r["name"] == name and r.get("peak_extra_mib", budget_mib + 1) > budget_mib
                    for r in rows
                ),
            }
        )
    table = summary_table(summary, rows, args, budget_mib)
    folder = os.path.join(os.path.dirname(__file__), "results", args.device)
    if not args.no_save:
        os.makedirs(folder, exist_ok=True)
        plot(rows, budget_mib, os.path.join(folder, "large_batch.png"))
    return report(
        "large-batch contrastive training step",
        "large_batch",
        args,
        results,
        table,
        rows=rows,
        summary=summary,
    )


def summary_table(summary: list[dict], rows: list[dict], args, budget_mib: float) -> str:
    """The per-implementation table (largest batch, its memory and time, ratios against ours at
    the largest batch both ran) and the per-size measurements."""
    ours = {r["n"]: r for r in rows if r["name"] == OURS and "seconds_per_1000" in r}
    lines = [
        f"Budget {args.budget_gib:g} GiB, mini-batch {args.mini_batch}, {args.length} tokens, "
        f"{args.layers} x {args.hidden} encoder, {args.dtype}, {args.device}",
        "",
        "| implementation | largest batch measured within budget | peak extra MiB there "
        "| s per 1,000 pairs there | time / ours (same N) | budget reached at (extrapolated) |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for entry in summary:
        if entry["largest_measured"] is None:
            lines.append(f"| {entry['name']} | none | - | - | - | - |")
            continue
        n = entry["largest_measured"]
        ratio = (
            f"{entry['seconds_per_1000'] / ours[n]['seconds_per_1000']:.2f}x" if n in ours else "-"
        )
        reached = entry["extrapolated_largest"]
        if entry["stopped_by_budget"]:
            reached_text = f"~{reached:,} (next size over)" if reached else "next size over"
        else:
            reached_text = f"~{reached:,}" if reached else "-"
        lines.append(
            f"| {entry['name']} | {n:,} | {entry['peak_extra_mib']:.0f} "
            f"| {entry['seconds_per_1000']:.2f} | {ratio} | {reached_text} |"
        )
    lines += [
        "",
        "| implementation | N | s per 1,000 pairs | peak extra MiB |",
        "| --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        if "seconds_per_1000" in r:
            seconds, mib = r["seconds_per_1000"], r["peak_extra_mib"]
            lines.append(f"| {r['name']} | {r['n']:,} | {seconds:.2f} | {mib:.0f} |")
        else:
            lines.append(f"| {r['name']} | {r['n']:,} | out of memory | - |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
