"""Training-step benchmarks: the fused losses inside real training steps, against the
reference losses (``backend="torch"``), on CPU here and on a GPU when there is one.

    python -m benchmarks.training simcse --sizes 1024 4096 16384 --memory-budget-mib 2048
    python -m benchmarks.training tinybert
    python -m benchmarks.training simcse --device cuda --dtype bfloat16 --sizes 65536 262144

simcse: a SimCSE bi-encoder step with gradient caching (GradCache: the batch is encoded in
chunks without grad, the loss's gradient with respect to the embeddings is computed once, then
each chunk is re-encoded with grad and back-propagated), so that the encoder's activations do
not cap the batch and the loss's memory does. Reported: steps per second, peak extra memory,
and the largest batch within --memory-budget-mib for the fused and the reference InfoNCE.

tinybert: one TinyBERT step (attention-map MSE over mapped layers, hidden-state MSE through
fit_dense, soft-CE prediction loss), fused against reference: step time and peak memory.

Encoders are BERT models built from a config (random weights, no download): the loss, not the
encoder's quality, is what is measured.
"""

from __future__ import annotations

import argparse

import torch

import kd_kernels as kdk
from benchmarks._harness import (
    add_common_arguments,
    fused_backends,
    markdown_table,
    measure,
    report,
)
from kd_kernels.grad_cache import GradCache


def tiny_bert(
    layers: int,
    hidden: int,
    device: str,
    dtype: torch.dtype,
    seed: int = 0,
    *,
    heads: int = 4,
    vocab_size: int = 1000,
):
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=4 * hidden,
        attn_implementation="eager",
    )
    return BertModel(config).to(device=device, dtype=dtype)


def simcse_step(encoder, input_ids, chunk: int, backend: str, temperature: float = 0.05):
    """One GradCache SimCSE step (``kd_kernels.grad_cache``): two dropout views of every
    sentence embedded ``chunk`` sentences at a time without gradient, InfoNCE between them, then
    each chunk re-embedded (same dropout) and back-propagated with its cached gradient."""
    pieces = list(input_ids.split(chunk))
    cache = GradCache(lambda ids: encoder(input_ids=ids).last_hidden_state[:, 0])  # [CLS]
    views = cache.embed(pieces + pieces)
    view1, view2 = torch.cat(views[: len(pieces)]), torch.cat(views[len(pieces) :])
    loss = cache.loss(kdk.info_nce_loss(view1, view2, temperature=temperature, backend=backend))
    loss.backward()
    return loss.detach()


def tinybert_step(student, teacher, fit_dense, input_ids, mask, backend: str):
    """One TinyBERT step: attention MSE + hidden MSE (fit_dense) + soft-CE prediction loss."""
    outputs = dict(output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        teacher_out = teacher(input_ids=input_ids, attention_mask=mask, **outputs)
    student_out = student(input_ids=input_ids, attention_mask=mask, **outputs)
    mapping = kdk.layer_map(len(student_out.attentions), len(teacher_out.attentions))
    attention = kdk.attention_mse_loss(
        student_out.attentions,
        [teacher_out.attentions[i] for i in mapping.attention],
        attention_mask=mask,
        backend=backend,
    )
    hidden = kdk.hidden_mse_loss(
        [fit_dense(h) for h in student_out.hidden_states],
        [teacher_out.hidden_states[i] for i in mapping.hidden],
        attention_mask=mask,
        backend=backend,
    )
    # A vocabulary-sized prediction head on the last layer stands in for the task head.
    student_logits = student_out.last_hidden_state @ student.embeddings.word_embeddings.weight.T
    teacher_logits = teacher_out.last_hidden_state @ teacher.embeddings.word_embeddings.weight.T
    prediction = kdk.kd_loss(
        student_logits, teacher_logits, kind="soft_ce", mask=mask.bool(), backend=backend
    )
    loss = attention + hidden + prediction
    loss.backward()
    return loss.detach()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=["simcse", "tinybert"])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1024, 4096, 16384])
    parser.add_argument("--chunk", type=int, default=256, help="GradCache chunk (simcse)")
    parser.add_argument("--length", type=int, default=32, help="tokens per sentence")
    parser.add_argument("--memory-budget-mib", type=float, default=2048.0)
    add_common_arguments(parser, repeats=2, warmup=1)
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    backends = ["torch", *fused_backends(args.device)]
    results, rows = [], []
    if args.method == "simcse":
        encoder = tiny_bert(2, 128, args.device, dtype).train()
        for size in args.sizes:
            input_ids = torch.randint(0, 1000, (size, args.length), device=args.device)
            for backend in backends:
                name = f"{'reference' if backend == 'torch' else f'fused[{backend}]'} N={size}"
                try:
                    result = measure(
                        name,
                        lambda b=backend, ids=input_ids: simcse_step(encoder, ids, args.chunk, b),
                        args.device,
                        args.warmup,
                        args.repeats,
                    )
                except torch.OutOfMemoryError:
                    rows.append({"n": size, "backend": backend, "out_of_memory": True})
                    continue
                encoder.zero_grad(set_to_none=True)
                results.append(result)
                steps = 1e3 / result.median_ms
                rows.append({"n": size, "backend": backend, "steps_per_s": steps, **vars(result)})
                print(f"{name}: {steps:.3f} steps/s, {result.peak_extra_mib:.0f} MiB")
        largest = {}
        for row in rows:
            if not row.get("out_of_memory") and row["peak_extra_mib"] <= args.memory_budget_mib:
                largest[row["backend"]] = max(largest.get(row["backend"], 0), row["n"])
        table = markdown_table(results, baseline=results[0].name)
        table += f"\n\nLargest batch within {args.memory_budget_mib:g} MiB: " + ", ".join(
            f"{backend} {n}" for backend, n in largest.items()
        )
        extra = {"largest_batch_within_budget": largest, "rows": rows}
    else:
        teacher = tiny_bert(4, 128, args.device, dtype, seed=1).eval()
        student = tiny_bert(2, 64, args.device, dtype, seed=2).train()
        fit_dense = torch.nn.Linear(64, 128).to(args.device, dtype)
        size = args.sizes[0]
        input_ids = torch.randint(0, 1000, (size, args.length), device=args.device)
        mask = torch.ones_like(input_ids)
        mask[:, args.length * 3 // 4 :] = 0  # a quarter of every sequence is padding
        for backend in backends:
            name = "reference" if backend == "torch" else f"fused[{backend}]"
            step = lambda b=backend: tinybert_step(  # noqa: E731
                student, teacher, fit_dense, input_ids, mask, b
            )
            results.append(measure(name, step, args.device, args.warmup, args.repeats))
            print(f"{name}: {results[-1].median_ms:.1f} ms, {results[-1].peak_extra_mib:.0f} MiB")
        table = markdown_table(results, baseline="reference")
        extra = {}
    name = f"training_{args.method}_{args.dtype}"
    return report(f"{args.method} training step", name, args, results, table, **extra)


if __name__ == "__main__":
    main()
