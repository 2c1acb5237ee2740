"""Teacher outputs computed once per example and kept on disk, so that a distillation stage
reads them instead of running the teacher every step.

A cache file ``<dir>/<key>.pt`` holds one set of outputs for one dataset. Its key is a
sha256 of everything the outputs depend on: the teacher's weights (every parameter and buffer,
heads included, hashed byte for byte), its tokenizer (the serialized tokenizer or its vocab),
``max_length``, the examples' texts in order, and what is stored (logits of which head, or
which layers). A changed teacher, tokenizer or dataset gives another key; stale files are
never read. A file that does not load or does not match its key (truncated, corrupt) is
logged and recomputed.

Stored outputs, all float32 on the CPU:
    logits   (N, C) head outputs (C = 1 for a regression head), teacher in eval mode;
    layers   per example i of length l_i (its unpadded tokens), for each requested hidden
             layer (sum_i l_i, D) and each attention layer (sum_i H l_i^2,) packed row after row,
             plus ``lengths`` (N,). Stored only when their size fits ``budget_mb``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from kd_trainers.config import DistillConfig
from kd_trainers.data import default_cache_dir
from kd_trainers.trainer import atomic_save

FORMAT = 1


def weights_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary and pipeline (its serialized Rust tokenizer minus
    the truncation / padding state that each call sets)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    text = json.dumps(state, sort_keys=True)
    return hashlib.sha256(f"{type(tokenizer).__name__}|{text}".encode()).hexdigest()


def examples_fingerprint(examples: Sequence) -> str:
    digest = hashlib.sha256()
    for example in examples:
        digest.update(json.dumps([example.text, example.text_pair]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def cache_key(
    teacher: nn.Module, tokenizer, max_length: int, examples: Sequence, what: dict
) -> str:
    parts = [
        f"format={FORMAT}",
        weights_fingerprint(teacher),
        tokenizer_fingerprint(tokenizer),
        f"max_length={max_length}",
        examples_fingerprint(examples),
        json.dumps(what, sort_keys=True),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:32]


class TeacherCache:
    """Files of teacher outputs under ``directory``; ``log`` reports reads, writes, skips."""

    def __init__(
        self, directory: Path, budget_mb: float = 1024.0, log: Callable[[str], None] = print
    ):
        self.directory, self.budget_bytes, self.log = Path(directory), budget_mb * 2**20, log

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.pt"

    def read(self, key: str) -> dict[str, torch.Tensor] | None:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            if not isinstance(payload, dict) or payload.get("key") != key:
                raise ValueError("its key does not match its name")
            tensors = payload["tensors"]
            if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
                raise ValueError("it holds something other than tensors")
        except Exception as error:  # any unreadable file is recomputed, never trusted
            self.log(
                f"teacher cache {path} is unreadable ({type(error).__name__}: {error}); recomputing"
            )
            return None
        self.log(f"teacher outputs read from {path}")
        return tensors

    def write(self, key: str, tensors: dict[str, torch.Tensor]) -> bool:
        size = sum(t.numel() * t.element_size() for t in tensors.values())
        if size > self.budget_bytes:
            self.log(
                f"teacher outputs of {size / 2**20:.0f} MB exceed teacher_cache_mb: not cached"
            )
            return False
        atomic_save({"key": key, "tensors": tensors}, self.path(key))
        self.log(f"teacher outputs ({size / 2**20:.1f} MB) written to {self.path(key)}")
        return True

    def get(
        self, key: str, compute: Callable[[], dict[str, torch.Tensor]]
    ) -> dict[str, torch.Tensor]:
        """The stored outputs of ``key``, else ``compute()`` (then stored if within budget)."""
        found = self.read(key)
        if found is not None:
            return found
        tensors = compute()
        self.write(key, tensors)
        return tensors


def layer_bytes(
    lengths: Sequence[int], hidden_layers: int, attention_layers: int, width: int, heads: int
) -> int:
    """float32 bytes of the packed layer outputs of examples with ``lengths`` tokens."""
    tokens, pairs = sum(lengths), sum(n * n for n in lengths)
    return 4 * (hidden_layers * tokens * width + attention_layers * heads * pairs)


@torch.no_grad()
def compute_layers(
    forward: Callable[[Sequence], tuple[dict, object]],
    examples: Sequence,
    hidden: Sequence[int],
    attention: Sequence[int],
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """Packed layer outputs (see the module docstring). ``forward(batch)`` returns (inputs,
    encoder outputs with ``hidden_states`` and ``attentions``)."""
    packed: dict[str, list] = {f"hidden_{i}": [] for i in hidden}
    packed.update({f"attention_{i}": [] for i in attention})
    lengths = []
    for start in range(0, len(examples), batch_size):
        inputs, outputs = forward(examples[start : start + batch_size])
        for row, length in enumerate(inputs["attention_mask"].sum(1).tolist()):
            lengths.append(length)
            for i in hidden:
                packed[f"hidden_{i}"].append(outputs.hidden_states[i][row, :length].float().cpu())
            for i in attention:
                scores = outputs.attentions[i][row, :, :length, :length].float().cpu()
                packed[f"attention_{i}"].append(scores.reshape(-1))
    tensors = {name: torch.cat(chunks) for name, chunks in packed.items()}
    tensors["lengths"] = torch.tensor(lengths, dtype=torch.long)
    return tensors


class LayerTargets:
    """Padded batches of packed layer outputs (as :func:`compute_layers` stores them)."""

    def __init__(
        self, tensors: dict[str, torch.Tensor], hidden: Sequence[int], attention: Sequence[int]
    ):
        self.tensors, self.hidden, self.attention = tensors, list(hidden), list(attention)
        lengths = tensors["lengths"]
        self.lengths = lengths.tolist()
        self.token_start = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)]).tolist()
        self.pair_start = torch.cat(
            [torch.zeros(1, dtype=torch.long), (lengths**2).cumsum(0)]
        ).tolist()

    def batch(self, indices: Sequence[int], attention_mask: torch.Tensor):
        """(hidden states [(B, L, D)], attention scores [(B, H, L, L)]) for examples
        ``indices``, padded to ``attention_mask``'s L (padded hidden rows 0, padded scores
        the dtype minimum, as the mask makes them); ValueError if a length disagrees."""
        device, size = attention_mask.device, attention_mask.shape[1]
        wanted = attention_mask.sum(1).tolist()
        if [self.lengths[i] for i in indices] != wanted:
            raise ValueError("cached teacher outputs do not match this batch's token lengths")
        hidden = []
        for layer in self.hidden:
            source = self.tensors[f"hidden_{layer}"]
            out = source.new_zeros(len(indices), size, source.shape[-1])
            for row, i in enumerate(indices):
                out[row, : self.lengths[i]] = source[self.token_start[i] : self.token_start[i + 1]]
            hidden.append(out.to(device))
        scores = []
        for layer in self.attention:
            source = self.tensors[f"attention_{layer}"]
            heads = source.numel() // max(1, self.pair_start[-1])
            out = source.new_full((len(indices), heads, size, size), torch.finfo(source.dtype).min)
            for row, i in enumerate(indices):
                n = self.lengths[i]
                piece = source[heads * self.pair_start[i] : heads * self.pair_start[i + 1]]
                out[row, :, :n, :n] = piece.view(heads, n, n)
            scores.append(out.to(device))
        return hidden, scores


def open_teacher_cache(config: DistillConfig, log: Callable[[str], None]) -> TeacherCache | None:
    """The run's cache from ``teacher_cache`` (a folder, ``auto``: ``<data cache>/
    teacher_outputs``) and ``teacher_cache_mb``; None when ``teacher_cache`` is unset (none)."""
    if config.teacher_cache is None:
        return None
    folder = Path(config.teacher_cache).expanduser()
    if config.teacher_cache == "auto":
        data = Path(config.data_cache).expanduser() if config.data_cache else default_cache_dir()
        folder = data / "teacher_outputs"
    return TeacherCache(folder, config.teacher_cache_mb, log)
