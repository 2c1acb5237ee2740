"""The training core every method shares: runtime (device, DDP, run folder, metrics), and
:func:`run_stage`, one optimization stage with AdamW, linear warmup/decay, clipping,
accumulation, bf16 autocast on CUDA, a progress bar, atomic checkpoints and exact resume.

A method is a sequence of named stages. Each stage is seeded from the run seed and its name,
so a stage's result does not depend on what ran before it in the same process: a run that
is killed and resumed (finished stages are loaded from ``stages/<name>/final.pt``, the
unfinished one from its checkpoint) ends with the same weights as one that never stopped.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from kd_trainers.config import TrainConfig, config_to_yaml
from kd_trainers.errors import ConfigError

# Test hook: "STAGE:STEP" raises KeyboardInterrupt after that optimizer step, exactly as a
# Ctrl-C there would, so tests can kill a run at a known point and resume it.
STOP_AFTER_ENV = "KD_TRAINERS_STOP_AFTER"


class StopRequest:
    """Ctrl-C / SIGTERM inside a stage's loop stops it at the next optimizer-step boundary,
    after that step is logged, so the checkpoint and metrics.jsonl agree; outside the loop,
    or on a second signal, the stop is immediate."""

    in_loop = False
    requested = False


def request_stop(signum: int, frame: object) -> None:
    """Signal handler for SIGINT and SIGTERM (installed by the CLI)."""
    if StopRequest.in_loop and not StopRequest.requested:
        StopRequest.requested = True
        return
    raise KeyboardInterrupt(f"signal {signum}")


LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclasses.dataclass
class Runtime:
    """Where and how a run executes; ``rank``/``world_size`` are 0/1 without torchrun."""

    config: TrainConfig
    method: str
    output_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def log(self, message: str) -> None:
        if self.is_main:
            tqdm.write(message, file=sys.stderr)

    def record(self, entry: dict) -> None:
        """Appends one JSON line to ``metrics.jsonl`` (rank 0 only)."""
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a") as metrics:
                metrics.write(json.dumps(entry) + "\n")

    def forget_metrics(self, stage: str, after_step: int) -> None:
        """Drops ``stage``'s metric lines past ``after_step``: a resumed stage logs them again."""
        path = self.output_dir / "metrics.jsonl"
        if not (self.is_main and path.is_file()):
            return
        kept = [
            line
            for line in path.read_text().splitlines()
            if not (
                (entry := json.loads(line)).get("stage") == stage
                and entry.get("step", 0) > after_step
            )
        ]
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def write_json(self, name: str, payload: dict) -> None:
        if self.is_main:
            atomic_write_text(self.output_dir / name, json.dumps(payload, indent=2) + "\n")

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def autocast(self):
        """bf16 autocast on CUDA when ``bf16`` is set; a no-op on CPU."""
        enabled = self.device.type == "cuda" and self.config.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=enabled)


def setup_runtime(config: TrainConfig, method: str) -> Runtime:
    """Threads, device, process group (under torchrun), run folder and the saved config."""
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    cuda = config.device.startswith("cuda") or (
        config.device == "auto" and torch.cuda.is_available()
    )
    if cuda:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        index = int(config.device.split(":")[1]) if ":" in config.device else local_rank
        device = torch.device("cuda", index)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    runtime = Runtime(config, method, Path(config.output_dir), device, rank, world_size)
    if runtime.is_main:
        runtime.output_dir.mkdir(parents=True, exist_ok=True)
        if not config.resume:
            # A fresh run must not pick up another run's stages or metrics.
            shutil.rmtree(runtime.output_dir / "stages", ignore_errors=True)
            (runtime.output_dir / "metrics.jsonl").unlink(missing_ok=True)
        text = config_to_yaml(config)
        atomic_write_text(runtime.output_dir / "config.yaml", text)
        runtime.log(f"kd-train {method} on {device} x{world_size}, config:\n{text.rstrip()}")
    runtime.barrier()
    return runtime


def teardown_runtime(runtime: Runtime, wait: bool = True) -> None:
    """Leaves the process group; ``wait=False`` after an error, when peers may be gone."""
    if runtime.distributed and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def atomic_write_text(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def atomic_save(payload: Any, path: Path) -> None:
    """torch.save to a temp file, then rename: a kill never leaves a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    torch.save(payload, temporary)
    os.replace(temporary, path)


def significant(value: float) -> float:
    """7 significant digits: enough to compare backends step by step, short in JSON."""
    return float(f"{value:.7g}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def stage_seed(seed: int, stage: str, rank: int) -> int:
    return seed * 1_000_003 + zlib.crc32(stage.encode()) + 7919 * rank


# Batches per length group: enough that a batch pads to near its own length, few enough that
# a group is a random slice of the data (the same idea as the HF Trainer's group_by_length).
LENGTH_GROUP_BATCHES = 32


def shuffled_batches(
    size: int, batch_size: int, seed: int, epoch: int, lengths: Sequence[int] | None = None
) -> list[list[int]]:
    """A seeded permutation of ``range(size)`` cut into batches (the last may be short).

    With ``lengths`` (one per example): the permutation is cut into groups of
    ``LENGTH_GROUP_BATCHES`` batches, each group is sorted by length (longest first) and cut
    into batches, and the batches are shuffled. A batch then pads to about its own texts'
    length; which examples meet in a group, and the batch order, stay seeded per epoch.
    """
    generator = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(size, generator=generator).tolist()
    if lengths is None:
        return [order[i : i + batch_size] for i in range(0, size, batch_size)]
    if len(lengths) != size:
        raise ValueError(f"lengths has {len(lengths)} entries for {size} examples")
    group, batches = batch_size * LENGTH_GROUP_BATCHES, []
    for start in range(0, size, group):
        chunk = sorted(order[start : start + group], key=lambda i: -lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]


def decay_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and LayerNorm weights (BERT's recipe)."""
    decay, no_decay = [], []
    for name, parameter in module.named_parameters():
        if parameter.requires_grad:
            no_decay_name = parameter.ndim < 2 or "LayerNorm" in name or name.endswith("bias")
            (no_decay if no_decay_name else decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


@dataclasses.dataclass
class Stage:
    """One optimization stage: its name (also its folder), epochs and peak learning rate."""

    name: str
    epochs: float
    lr: float


@dataclasses.dataclass
class StageResult:
    steps: int
    final_loss: float
    seconds_per_step: float
    resumed_from: int = 0


def stage_dir(runtime: Runtime, name: str) -> Path:
    return runtime.output_dir / "stages" / name


def load_finished_stage(runtime: Runtime, stage: Stage, module: nn.Module) -> StageResult | None:
    """With ``resume``, the result of a stage that already finished (weights loaded)."""
    final = stage_dir(runtime, stage.name) / "final.pt"
    if not (runtime.config.resume and final.is_file()):
        return None
    saved = torch.load(final, map_location=runtime.device, weights_only=False)
    module.load_state_dict(saved["model"])
    runtime.log(f"stage {stage.name}: finished earlier, weights loaded from {final}")
    return StageResult(**saved["result"])


def run_stage(
    runtime: Runtime,
    stage: Stage,
    module: nn.Module,
    loss_fn: LossFn,
    plan: Callable[[int], Sequence[Any]],
    examples_in: Callable[[Any], int] = len,
) -> StageResult:
    """Trains ``module``'s trainable parameters for one stage and saves its final weights.

    Args:
        module: holds every trainable parameter (a frozen teacher stays outside it).
        loss_fn: ``loss_fn(model, batch) -> (loss, logs)``; ``model`` is ``module`` or its
            DDP wrapper, so call it (not ``module``) for the forward pass.
        plan: ``plan(epoch)`` lists the epoch's micro-batches, identically on every rank
            (seeded); rank r takes every world_size-th one.
        examples_in: counts the examples of a batch, for the throughput figure.
    """
    config = runtime.config
    finished = load_finished_stage(runtime, stage, module)
    if finished is not None:
        return finished
    seed_everything(stage_seed(config.seed, stage.name, runtime.rank))
    module.to(runtime.device)
    model: nn.Module = module
    if runtime.distributed:
        # MT-DNN heads are used one task per batch, so some parameters see no gradient.
        device_ids = [runtime.device.index] if runtime.device.type == "cuda" else None
        model = DistributedDataParallel(module, device_ids, find_unused_parameters=True)

    def rank_batches(epoch: int) -> list:
        batches = list(plan(epoch))
        per_rank = len(batches) // runtime.world_size
        return batches[runtime.rank :: runtime.world_size][:per_rank]

    batches_per_epoch = len(rank_batches(0))
    if batches_per_epoch == 0:
        raise ConfigError(
            f"stage {stage.name}: fewer batches than processes ({runtime.world_size}); "
            "more data or a smaller batch_size"
        )
    steps_per_epoch = math.ceil(batches_per_epoch / config.grad_accum)
    total_steps = max(1, math.ceil(stage.epochs * steps_per_epoch))
    if config.max_steps > 0:
        total_steps = min(total_steps, config.max_steps)
    optimizer = torch.optim.AdamW(decay_groups(module, config.weight_decay), lr=stage.lr)
    warmup = int(config.warmup_ratio * total_steps)

    def linear_schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, linear_schedule)
    step, epoch, batch_index = 0, 0, 0
    checkpoint_path = stage_dir(runtime, stage.name) / "checkpoint.pt"
    if config.resume and checkpoint_path.is_file():
        saved = torch.load(checkpoint_path, map_location=runtime.device, weights_only=False)
        module.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        step, epoch, batch_index = saved["step"], saved["epoch"], saved["batch_index"]
        set_rng_state(saved["rng"][min(runtime.rank, len(saved["rng"]) - 1)])
        runtime.log(f"stage {stage.name}: resuming at step {step} from {checkpoint_path}")
    resumed_from = step
    if config.resume:
        runtime.forget_metrics(stage.name, step)
    boundary_rng = rng_state()

    def save_checkpoint(gather: bool) -> None:
        states = [boundary_rng]
        if gather and runtime.distributed:
            states = [None] * runtime.world_size
            dist.all_gather_object(states, boundary_rng)
        if runtime.is_main:
            payload = {
                "model": module.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "step": step,
                "epoch": epoch,
                "batch_index": batch_index,
                "rng": states,
            }
            atomic_save(payload, checkpoint_path)

    stop_after = os.environ.get(STOP_AFTER_ENV, "")
    progress = tqdm(
        total=total_steps,
        initial=step,
        desc=stage.name,
        disable=not (config.progress and runtime.is_main),
        dynamic_ncols=True,
        file=sys.stderr,
    )
    module.train()
    window_loss, window_logs, window_batches, window_examples = 0.0, {}, 0, 0
    log_counts: dict[str, int] = {}
    started, window_start, final_loss = time.perf_counter(), time.perf_counter(), float("nan")
    StopRequest.in_loop, StopRequest.requested = True, False
    try:
        while step < total_steps:
            batches = rank_batches(epoch)
            while batch_index < len(batches) and step < total_steps:
                group = batches[batch_index : batch_index + config.grad_accum]
                for position, batch in enumerate(group):
                    last = position == len(group) - 1
                    sync = model.no_sync() if runtime.distributed and not last else None
                    with sync or contextlib.nullcontext(), runtime.autocast():
                        loss, logs = loss_fn(model, batch)
                    (loss / len(group)).backward()
                    window_loss += loss.detach().float()
                    for key, value in logs.items():
                        # Averaged over the batches that logged the key (MT-DNN: per task).
                        window_logs[key] = window_logs.get(key, 0.0) + value.detach().float()
                        log_counts[key] = log_counts.get(key, 0) + 1
                    window_batches += 1
                    window_examples += examples_in(batch)
                if config.max_grad_norm > 0:
                    nn.utils.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                batch_index += len(group)
                if batch_index >= len(batches):
                    epoch, batch_index = epoch + 1, 0
                boundary_rng = rng_state()
                if step % config.log_every == 0 or step == total_steps:
                    final_loss = float(window_loss) / window_batches
                    rate = (
                        window_examples * runtime.world_size / (time.perf_counter() - window_start)
                    )
                    entry = {
                        "stage": stage.name,
                        "step": step,
                        "epoch": round(step / steps_per_epoch, 4),
                        "loss": significant(final_loss),
                        **{
                            k: significant(float(v) / log_counts[k]) for k, v in window_logs.items()
                        },
                        "lr": scheduler.get_last_lr()[0],
                        "examples_per_s": round(rate, 2),
                    }
                    runtime.record(entry)
                    progress.set_postfix(
                        loss=f"{final_loss:.4f}", lr=f"{entry['lr']:.2e}", ex_s=f"{rate:.1f}"
                    )
                    window_loss, window_logs, window_batches, window_examples = 0.0, {}, 0, 0
                    log_counts = {}
                    window_start = time.perf_counter()
                progress.update(1)
                if config.save_every > 0 and step % config.save_every == 0:
                    save_checkpoint(gather=True)
                if StopRequest.requested or stop_after == f"{stage.name}:{step}":
                    raise KeyboardInterrupt
                if batch_index == 0:
                    break  # a new epoch: its own batch order, from the outer loop
    except KeyboardInterrupt:
        progress.close()
        save_checkpoint(gather=False)
        runtime.log(f"interrupted: checkpoint of step {step} saved; continue with --resume")
        raise
    finally:
        StopRequest.in_loop = False
    progress.close()
    seconds = (time.perf_counter() - started) / max(1, step - resumed_from)
    result = StageResult(step, final_loss, seconds, resumed_from)
    if runtime.is_main:
        atomic_save(
            {"model": module.state_dict(), "result": dataclasses.asdict(result)},
            stage_dir(runtime, stage.name) / "final.pt",
        )
        checkpoint_path.unlink(missing_ok=True)
    runtime.barrier()
    return result
