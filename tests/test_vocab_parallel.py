"""Vocabulary-parallel kd_loss and fused_linear_kd_loss (``process_group=``): 2 and 3 gloo
processes, each holding a slice of the classes, give on every rank the single-process loss,
their slices of the logit, weight and bias gradients, and the full hidden-state gradient.

One spawn per process count runs the whole table of cases (spawning costs seconds, a case
milliseconds); the single-process expectations are computed here, in the test process.
"""

import functools
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ranks import run_ranks

import kd_kernels as kdk
from kd_kernels import reference

ROWS, VOCAB, HIDDEN, TEACHER_HIDDEN = (2, 4), 36, 8, 6  # 36 classes split 2 and 3 ways
WORLD_SIZES = (2, 3)


def _inputs() -> dict:
    """Every full-vocabulary tensor a case may use (the same in every process: seeded)."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    teacher = randn(*ROWS, VOCAB, scale=3.0)
    labels = torch.randint(0, VOCAB, ROWS, generator=g)
    labels[0, ::3] = -100
    labels[1, 1] = VOCAB - 1  # the last rank's last class
    mask = torch.tensor([[True, False, True, True], [False, True, True, True]])
    top = teacher.topk(5, dim=-1).indices
    return {
        "student": randn(*ROWS, VOCAB, scale=3.0),
        "teacher": teacher,
        "ensemble": randn(3, *ROWS, VOCAB, scale=3.0),
        # Late distillation: the student within 1e-3 of the teacher (checked against float64).
        "near_student": teacher + randn(*ROWS, VOCAB, scale=1e-3),
        "hidden": randn(*ROWS, HIDDEN),
        "weight": randn(VOCAB, HIDDEN, scale=HIDDEN**-0.5 * 3),
        "bias": randn(VOCAB),
        "teacher_hidden": randn(*ROWS, TEACHER_HIDDEN),
        "teacher_weight": randn(VOCAB, TEACHER_HIDDEN, scale=0.8),
        "teacher_bias": randn(VOCAB),
        "labels": labels,
        "mask": mask,
        "topk": (top, teacher.log_softmax(-1).gather(-1, top)),
        "grad_weights": torch.rand(ROWS, generator=g),  # d loss for reduction="none"
    }


def _cases() -> list:
    """(name, api, teacher form, options); options may name inputs ("labels", "mask")."""
    cases = []
    for kind in reference.KD_KINDS:
        for reduction in reference.KD_REDUCTIONS:
            labelled = dict(labels="labels", hard_weight=0.4, beta=0.3)
            cases.append((f"kd-{kind}-{reduction}", "kd", "logits", dict(kind=kind, **labelled)))
            masked = dict(mask="mask", labels="labels", hard_weight=0.7, temperature=1.0)
            cases.append(
                (f"fused-{kind}-{reduction}", "fused", "logits", dict(kind=kind, **masked))
            )
            for case in cases[-2:]:
                case[3]["reduction"] = reduction
        cases.append((f"fused-head-{kind}", "fused", "head", dict(kind=kind, labels="labels")))
        cases.append((f"kd-ensemble-{kind}", "kd", "ensemble", dict(kind=kind, mask="mask")))
        cases.append((f"kd-near-{kind}", "kd", "near", dict(kind=kind, temperature=4.0)))
        cases.append(
            (
                f"kd-normalizer-{kind}",
                "kd",
                "logits",
                dict(kind=kind, labels="labels", hard_weight=0.2, normalizer=11.0),
            )
        )
    cases += [
        ("fused-normalizer-tensor", "fused", "head", dict(normalizer=torch.tensor(13.0))),
        ("kd-topk-spread", "kd", "topk-spread", dict(kind="reverse_kl")),
        ("fused-topk-renormalize", "fused", "topk-renormalize", dict(kind="jsd")),
        ("fused-options", "fused", "logits", dict(soft_weight=0.5, scale_t2=False, beta=0.9)),
        ("kd-all-rows-masked", "kd", "logits", dict(mask="no_rows")),
        ("fused-chunked-rows", "fused", "head", dict(kind="jsd", chunk_size=(3, 5))),
    ]
    for _, _, _, options in cases:
        options.setdefault("temperature", 2.0)
    return cases


CASES = _cases()


def _resolve(options: dict, inputs: dict) -> dict:
    names = {"labels": inputs["labels"], "mask": inputs["mask"]}
    names["no_rows"] = torch.zeros(ROWS, dtype=torch.bool)
    return {k: names[v] if isinstance(v, str) and v in names else v for k, v in options.items()}


def _teacher_kwargs(form: str, inputs: dict, columns: slice) -> dict:
    """The teacher as a rank holding ``columns`` passes it (the whole tensor: columns=all)."""
    if form in ("logits", "near"):
        return {"teacher_logits": inputs["teacher"][..., columns]}
    if form == "ensemble":
        return {"teacher_logits": inputs["ensemble"][..., columns]}
    if form == "head":
        return {
            "teacher_hidden": inputs["teacher_hidden"],
            "teacher_weight": inputs["teacher_weight"][columns],
            "teacher_bias": inputs["teacher_bias"][columns],
        }
    return {"teacher_topk": inputs["topk"], "topk_remainder": form.split("-")[1]}


def _run(api: str, form: str, options: dict, inputs: dict, columns: slice, **extra):
    """The loss and the gradients of (loss * grad_weights).sum() (or loss) for one case, with
    the student's classes ``columns``; extra: process_group or backend."""
    options = _resolve(options, inputs)
    teacher = _teacher_kwargs(form, inputs, columns)
    if api == "kd":
        student = inputs["near_student" if form == "near" else "student"]
        leaves = [student[..., columns].clone().requires_grad_()]
        loss = kdk.kd_loss(leaves[0], **teacher, **options, **extra)
    else:
        leaves = [
            inputs["hidden"].clone().requires_grad_(),
            inputs["weight"][columns].clone().requires_grad_(),
            inputs["bias"][columns].clone().requires_grad_(),
        ]
        h, w, b = leaves
        loss = kdk.fused_linear_kd_loss(h, w, student_bias=b, **teacher, **options, **extra)
    weights = inputs["grad_weights"] if loss.dim() else torch.ones(())
    (loss * weights).sum().backward()
    return loss.detach(), [x.grad for x in leaves]


def _worker(rank, store_path, out_dir):
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=3)
    # The 2-way split runs on ranks 1 and 2: a subgroup whose ranks are not the global ones.
    groups = {3: dist.group.WORLD, 2: dist.new_group([1, 2])}
    inputs = _inputs()
    results = {}
    for size, group in groups.items():
        if rank not in dist.get_process_group_ranks(group):
            continue
        group_rank, width = dist.get_rank(group), VOCAB // size
        columns = slice(group_rank * width, (group_rank + 1) * width)
        found = results[size] = {"group_rank": group_rank}
        for name, api, form, options in CASES:
            loss, grads = _run(api, form, options, inputs, columns, process_group=group)
            found[name] = [loss.numpy().copy()] + [g.numpy().copy() for g in grads]
        # Unequal slices: every rank finds out (from one all-reduce) and raises.
        uneven = inputs["student"][..., : width + (group_rank == 0)]
        try:
            kdk.kd_loss(uneven, uneven, process_group=group)
            found["uneven"] = ""
        except ValueError as error:
            found["uneven"] = str(error)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # leave together: a rank tearing gloo down under its peer can abort
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def spawned(tmp_path_factory):
    """One spawn of 3 processes for both splits (starting a process costs seconds)."""
    out_dir = tmp_path_factory.mktemp("vocab_parallel")
    run_ranks(_worker, 3, (str(out_dir / "store"), str(out_dir)), preload=("test_vocab_parallel",))
    by_rank = [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(3)]
    return {
        size: sorted(
            (found[size] for found in by_rank if size in found), key=lambda f: f["group_rank"]
        )
        for size in WORLD_SIZES
    }


@pytest.fixture(params=WORLD_SIZES, ids=lambda p: f"{p}ranks")
def per_rank(request, spawned):
    """Results of one split, in group-rank order."""
    return spawned[request.param]


@functools.cache
def _expected(name: str):
    """The single-process loss and gradients of a case: the unfused reference (float64 for
    the near-equal one); the same for every split."""
    _, api, form, options = next(case for case in CASES if case[0] == name)
    inputs = _inputs()
    options = dict(options)
    normalizer = options.pop("normalizer", None)
    options.pop("chunk_size", None)
    if normalizer is not None:
        options["reduction"] = "sum"
    if form == "near":
        inputs = {k: v.double() if torch.is_tensor(v) else v for k, v in inputs.items()}
    if api == "fused":  # the spec: the logits materialised, then kd_loss
        if form == "head":
            teacher = F.linear(
                inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"]
            )
            inputs = {**inputs, "teacher": teacher}
        leaves = [inputs[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")]
        h, w, b = leaves

        def student_logits():
            return F.linear(h, w, b)

    else:
        leaves = [inputs["near_student" if form == "near" else "student"].clone()]
        leaves[0].requires_grad_()

        def student_logits():
            return leaves[0]

    if form.startswith("topk"):
        indices, logprobs = inputs["topk"]
        teacher = {
            "teacher_logits": reference.topk_teacher_logits(
                indices, logprobs, VOCAB, form.split("-")[1]
            )
        }
    else:
        teacher = _teacher_kwargs(form if form != "head" else "logits", inputs, slice(None))
    loss = kdk.kd_loss(student_logits(), **teacher, **_resolve(options, inputs), backend="torch")
    if normalizer is not None:
        loss = loss / normalizer
    weights = inputs["grad_weights"] if loss.dim() else torch.ones((), dtype=loss.dtype)
    (loss * weights).sum().backward()
    return loss.detach(), [x.grad for x in leaves]


@pytest.mark.parametrize(("name", "api", "form", "options"), CASES, ids=[c[0] for c in CASES])
def test_ranks_equal_one_process(per_rank, name, api, form, options):
    world_size = len(per_rank)
    loss, grads = _expected(name)
    width = VOCAB // world_size
    # The near-equal case against float64 (where a log-probability difference in fp32 is ~1e0
    # off): within issue 17's targets, loss 1e-3 and gradients 1e-4 (relative), with margin.
    tolerance = dict(rtol=1e-4, atol=0.0) if form == "near" else dict(rtol=1e-5, atol=1e-6)
    for rank, got in enumerate(per_rank):
        columns = slice(rank * width, (rank + 1) * width)
        got_loss, *got_grads = (torch.from_numpy(x) for x in got[name])
        torch.testing.assert_close(got_loss.double(), loss.double(), **tolerance)
        # Gradients: the hidden states' whole; the logits', weight's and bias's classes.
        expected_grads = (
            [grads[0], grads[1][columns], grads[2][columns]]
            if api == "fused"
            else [grads[0][..., columns]]
        )
        for got_grad, want in zip(got_grads, expected_grads, strict=True):
            scale = want.abs().max().item()
            torch.testing.assert_close(
                got_grad.double(), want.double(), rtol=1e-4, atol=1e-6 * max(scale, 1e-30)
            )


def test_unequal_slices_are_refused_on_every_rank(per_rank):
    for got in per_rank:
        assert "equal slices" in got["uneven"]
