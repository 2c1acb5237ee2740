"""GradCache (Gao et al., 2021, "Scaling Deep Contrastive Learning Batch Size under Memory
Limited Setup"): a contrastive batch of any size with the activations of one piece at a time.

With an encoder f, a batch cut into pieces x_1 .. x_P and a loss L(e) of all embeddings
e = [f(x_1); ...; f(x_P)] (InfoNCE couples every row with every other, so the batch cannot be
split into independent micro-batches):

1. embed every piece without gradient, noting the RNG state before each (dropout);
2. take L(e) and g = dL/de, the embeddings' gradient (O(N D) memory with the fused InfoNCE);
3. in backward, re-embed each piece with gradient from its saved RNG state (so dropout draws
   the same masks and f(x_p) is the embedding g_p belongs to) and back-propagate
   <f(x_p), g_p * grad_output> into the parameters.

dL/dtheta = sum_p J_p^T g_p exactly, so the loss and the parameters' gradients are those of the
whole batch in one pass; memory is the embeddings plus one piece's activations. The cost is a
second forward pass of the encoder.

One implementation serves ``kd_kernels.integrations.sentence_transformers`` and the ``kd-train``
sentence methods.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_leaves
from torch.utils.checkpoint import get_device_states, set_device_states


class RNGSnapshot:
    """The CPU RNG and the RNG of every CUDA device among ``tensors``, taken at creation.

    ``with snapshot:`` runs its block from that state inside ``torch.random.fork_rng``, so the
    RNG outside the block is left as it was (a replay in backward does not shift later draws).
    """

    def __init__(self, *tensors: torch.Tensor):
        self.cpu_state = torch.get_rng_state()
        self.devices, self.device_states = get_device_states(*tensors)
        self._fork: Any = None

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng(devices=self.devices)
        self._fork.__enter__()
        torch.set_rng_state(self.cpu_state)
        set_device_states(self.devices, self.device_states)

    def __exit__(self, *exc: object) -> None:
        self._fork.__exit__(*exc)
        self._fork = None


class _AutocastState:
    """The autocast setting of one device type, to re-enter it in backward: a replay must run
    in the precision of the forward pass whose gradient it completes."""

    def __init__(self, device_type: str):
        self.device_type = device_type
        self.enabled = torch.is_autocast_enabled(device_type)
        self.dtype = torch.get_autocast_dtype(device_type)

    def __call__(self) -> torch.autocast:
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.enabled)


def _tensors_of(piece: Any) -> list[torch.Tensor]:
    return [leaf for leaf in tree_leaves(piece) if isinstance(leaf, torch.Tensor)]


class GradCache:
    """One batch under GradCache: :meth:`embed` (step 1), then :meth:`loss` (steps 2 and 3).

    Args:
        encode: ``encode(piece) -> (rows, D)`` embeddings; it must draw its randomness from
            torch's global RNG (dropout does) and be deterministic given that state. Pieces are
            any objects it takes (tokenized dicts, tuples of tensors); the CUDA RNG of every
            device their tensors live on is saved with the CPU one.
        module: the module ``encode`` runs, when it is wrapped in DistributedDataParallel:
            replays then accumulate gradients locally (``no_sync``) and only the last one
            all-reduces, as gradient accumulation does; if the forward pass ran inside an outer
            ``no_sync`` (accumulating micro-batches), none does.

    Example::

        cache = GradCache(lambda ids: encoder(ids).pooler_output)
        first, second = torch.cat(cache.embed(input_ids.split(256))).chunk(2)
        loss = cache.loss(kdk.info_nce_loss(first, second))
        loss.backward()  # re-embeds piece by piece into the encoder's .grad

    The loss must reach the parameters only through the embeddings: any other tensor it
    depends on (a learnable temperature) gets no gradient.
    """

    def __init__(self, encode: Callable[[Any], torch.Tensor], *, module: nn.Module | None = None):
        self.encode = encode
        self.module = module
        self.pieces: list[Any] = []
        self.embeddings: list[torch.Tensor] = []
        self.states: list[RNGSnapshot] = []
        self._autocast: _AutocastState | None = None

    def embed(self, pieces: Sequence[Any]) -> list[torch.Tensor]:
        """Step 1: each piece's embeddings (rows, D), computed without gradient. When grad mode
        is on they are leaves that require grad: build the loss from them (concatenate, split,
        reorder) and pass it to :meth:`loss`. May be called again to add pieces (a view that
        depends on the first ones' values, as an adversarial one does)."""
        if len(pieces) == 0:
            raise ValueError("GradCache needs at least one piece")
        tracking = torch.is_grad_enabled()
        added = []
        for piece in pieces:
            # The snapshot is taken right before the piece's forward, so its replay draws the
            # same dropout masks whatever ran in between.
            state = RNGSnapshot(*_tensors_of(piece)) if tracking else None
            with torch.no_grad():
                out = self.encode(piece)
            if self._autocast is None:
                self._autocast = _AutocastState(out.device.type)
            added.append(out.detach().requires_grad_(tracking))
            self.pieces.append(piece)
            self.states.append(state)  # type: ignore[arg-type]
        self.embeddings += added
        return added

    def _no_sync(self, last: bool, synchronize: bool):
        ddp = isinstance(self.module, nn.parallel.DistributedDataParallel)
        if ddp and not (last and synchronize):
            return self.module.no_sync()  # type: ignore[union-attr]
        return contextlib.nullcontext()

    def _gradients(self, loss: torch.Tensor) -> list[torch.Tensor]:
        """Step 2: d loss / d embeddings, zeros for a piece the loss does not read."""
        found = torch.autograd.grad(loss, self.embeddings, allow_unused=True)
        return [
            torch.zeros_like(e) if g is None else g
            for e, g in zip(self.embeddings, found, strict=True)
        ]

    def loss(self, loss: torch.Tensor) -> torch.Tensor:
        """Steps 2 and 3: ``loss`` (a scalar built from :meth:`embed`'s tensors) detached, with
        its backward replaced by the piece-by-piece replay into the parameters. Without grad
        mode (evaluation) it is returned as it is."""
        if not (torch.is_grad_enabled() and loss.requires_grad):
            return loss
        grads = self._gradients(loss)
        synchronize = getattr(self.module, "require_backward_grad_sync", True)
        autocast = self._autocast
        pieces, states, encode = self.pieces, self.states, self.encode
        self.embeddings = []  # the cache keeps the gradients only; the hook owns them now

        def replay(grad_output: torch.Tensor) -> None:
            last = len(pieces) - 1
            with torch.enable_grad():
                for index, (piece, state, grad) in enumerate(
                    zip(pieces, states, grads, strict=True)
                ):
                    with self._no_sync(index == last, synchronize), state, autocast():  # type: ignore[misc]
                        out = encode(piece)
                    if out.requires_grad:
                        out.backward((grad * grad_output).to(out.dtype))

        cached = loss.detach().requires_grad_()
        cached.register_hook(replay)
        return cached

    def input_gradients(
        self, loss: torch.Tensor, leaf_of: Callable[[Any], tuple[Any, torch.Tensor]]
    ) -> list[torch.Tensor]:
        """d loss / d an input tensor of every piece, by the same replay; parameters get no
        gradient (an adversarial perturbation's direction, computed with one piece of
        activations at a time).

        ``leaf_of(piece) -> (piece', x)``: ``piece'`` is ``piece`` with its input tensor
        replaced by ``x``, a leaf that requires grad. Returns one gradient per piece, shaped as
        its ``x``.
        """
        grads = self._gradients(loss)
        gradients = []
        with torch.enable_grad():
            for piece, state, grad in zip(self.pieces, self.states, grads, strict=True):
                replaced, leaf = leaf_of(piece)
                with state, self._autocast():  # type: ignore[misc]
                    out = self.encode(replaced)
                (gradient,) = torch.autograd.grad(out, leaf, grad.to(out.dtype))
                gradients.append(gradient)
        return gradients
