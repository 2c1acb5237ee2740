"""The fused KD loss under FSDP2 (``fully_shard``) on 2 gloo processes: computed inside the
model's forward (``fuse_kd_forward``), every parameter's gradient equals the data-parallel
truth of the unfused loss; the sharded head weight passed from outside is refused, naming
FSDP2. One spawn runs every check (starting a process costs seconds)."""

import copy
import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hf_tiny import counted_tokens, examples, tiny_llama, token_batch, training_args
from ranks import run_ranks

import kd_kernels as kdk
from kd_kernels.integrations.transformers import causal_kd_rows, fuse_kd_forward

WORLD = 2
OPTIONS = dict(temperature=2.0, kind="kl", hard_weight=0.5)
# (name, teacher form, whether the summed loss is divided by the step's num_items_in_batch)
TRAINER_ARGS = dict(per_device_train_batch_size=2, max_steps=2, learning_rate=1e-2)
CASES = [("teacher-logits-num-items", "logits", True), ("teacher-head-batchmean", "head", False)]


def _batches():
    return [token_batch(seed=10 + rank, lengths=(7, 4 + rank)) for rank in range(WORLD)]


def _teacher():
    return tiny_llama(hidden=24, seed=1)


def _teacher_kwargs(form, teacher, batch):
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    if form == "logits":
        with torch.no_grad():
            return {"teacher_logits": teacher(**inputs).logits}
    from kd_kernels.integrations.transformers import teacher_head_inputs

    return teacher_head_inputs(teacher, **inputs)


def _worker(rank, store_path, out_dir):
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank, world_size=WORLD)
    batches, teacher = _batches(), _teacher()
    results = {}
    for name, form, use_num_items in CASES:
        student = tiny_llama(hidden=16, seed=0)
        for layer in student.model.layers:
            fully_shard(layer)
        fully_shard(student)  # the root: embeddings, final norm and lm_head
        fuse_kd_forward(student, **OPTIONS)
        batch = batches[rank]
        num_items = counted_tokens(*batches) if use_num_items else None
        out = student(
            **batch, **_teacher_kwargs(form, teacher, batch), num_items_in_batch=num_items
        )
        # FSDP2 averages gradients over ranks; a loss divided by every rank's token count is
        # scaled back by the world size (what the Trainer does).
        (out.loss * (WORLD if use_num_items else 1)).backward()
        results[name] = {
            key: param.grad.full_tensor().numpy().copy()
            for key, param in student.named_parameters()
        }
    # Outside the forward the head weight is a DTensor shard: the fused loss refuses it.
    hidden = torch.randn(3, 16)
    try:
        kdk.fused_linear_kd_loss(hidden, student.lm_head.weight, torch.randn(3, 64))
        results["dtensor_error"] = ""
    except TypeError as error:
        results["dtensor_error"] = str(error)
    results["trainer"] = _trainer_run(rank, out_dir)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def _trainer_run(rank, out_dir):
    """DistillationTrainer under DDP (accelerate's MULTI_CPU on the open gloo group):
    2 ranks x 2 sequences per step; returns the final student parameters."""
    from kd_kernels.integrations.transformers import DistillationTrainer

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        OMP_NUM_THREADS="1",
    )
    student = tiny_llama(hidden=16, seed=0)
    trainer = DistillationTrainer(
        model=student,
        teacher_model=_teacher(),
        args=training_args(os.path.join(out_dir, f"trainer{rank}"), **TRAINER_ARGS),
        train_dataset=examples(),
        **OPTIONS,
    )
    trainer.train()
    return {k: v.detach().numpy().copy() for k, v in student.named_parameters()}


@pytest.fixture(scope="module")
def per_rank(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("hf_distributed")
    run_ranks(
        _worker,
        WORLD,
        (str(out_dir / "store"), str(out_dir)),
        preload=("transformers", "hf_tiny", "test_integration_transformers_distributed"),
    )
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _data_parallel_truth(form, use_num_items):
    """Mean over ranks of the gradient of each rank's unfused loss (logits materialised)."""
    batches, teacher = _batches(), _teacher()
    student = tiny_llama(hidden=16, seed=0)
    total = counted_tokens(*batches)
    grads = None
    for batch in batches:
        model = copy.deepcopy(student)
        logits = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits
        teacher_logits = _teacher_kwargs(form, teacher, batch)
        if form == "head":
            teacher_logits = F.linear(
                teacher_logits["teacher_hidden"], teacher_logits["teacher_weight"]
            )
        else:
            teacher_logits = teacher_logits["teacher_logits"]
        labels, _ = causal_kd_rows(batch["attention_mask"], batch["labels"])
        loss = kdk.kd_loss(
            logits[:, :-1],
            teacher_logits[:, :-1],
            labels=labels,
            reduction="sum" if use_num_items else "batchmean",
            backend="torch",
            **OPTIONS,
        )
        if use_num_items:
            loss = loss / total * WORLD
        loss.backward()
        found = {k: p.grad / WORLD for k, p in model.named_parameters()}
        grads = found if grads is None else {k: grads[k] + found[k] for k in grads}
    return grads


@pytest.mark.parametrize(("name", "form", "use_num_items"), CASES, ids=[c[0] for c in CASES])
def test_fsdp2_gradients_equal_data_parallel(per_rank, name, form, use_num_items):
    truth = _data_parallel_truth(form, use_num_items)
    for got in per_rank:
        assert set(got[name]) == set(truth)
        for key, want in truth.items():
            torch.testing.assert_close(
                torch.from_numpy(got[name][key]), want, rtol=1e-4, atol=1e-6, msg=key
            )


def test_two_process_trainer_equals_one_process_big_batch(per_rank, tmp_path):
    from kd_kernels.integrations.transformers import DistillationTrainer

    student = tiny_llama(hidden=16, seed=0)
    args = {**TRAINER_ARGS, "per_device_train_batch_size": 2 * WORLD}
    DistillationTrainer(
        model=student,
        teacher_model=_teacher(),
        args=training_args(tmp_path, **args),
        train_dataset=examples(),
        **OPTIONS,
    ).train()
    for got in per_rank:
        for key, want in student.named_parameters():
            torch.testing.assert_close(
                torch.from_numpy(got["trainer"][key]), want.detach(), rtol=1e-4, atol=1e-6
            )


def test_sharded_weight_from_outside_names_fsdp2(per_rank):
    for got in per_rank:
        assert "FSDP2" in got["dtensor_error"]
        assert "fuse_kd_forward" in got["dtensor_error"]
