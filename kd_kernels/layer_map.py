"""Which teacher layer each student layer learns from (TinyBERT-style layer distillation)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["LayerMap", "layer_map"]

LAYER_MAP_STRATEGIES = ("uniform", "top", "bottom")


@dataclass(frozen=True)
class LayerMap:
    """Teacher indices for a student of ``len(attention)`` layers.

    Attributes:
        attention: one teacher layer index per student layer (into ``outputs.attentions``).
        hidden: ``len(attention) + 1`` indices into ``outputs.hidden_states``, where index 0 is
            the embedding output, so ``hidden[0]`` pairs the two embedding layers.
    """

    attention: tuple[int, ...]
    hidden: tuple[int, ...]


def layer_map(
    num_student: int, num_teacher: int, strategy: str | Sequence[int] = "uniform"
) -> LayerMap:
    """The TinyBERT layer mapping of a ``num_student``-layer student to a ``num_teacher``-layer
    teacher.

    Strategies (i = 0 .. num_student - 1):
        ``"uniform"``: k = num_teacher / num_student (must divide); attention[i] = (i+1)k - 1,
            hidden[i] = i k for i = 0 .. num_student (TinyBERT's g(m) = 3m for 4 of 12).
        ``"top"``: the last num_student teacher layers; attention[i] = T - S + i,
            hidden = [0] + [T - S + i for i = 1 .. S].
        ``"bottom"``: the first layers; attention[i] = i, hidden[i] = i for i = 0 .. S.
        a list of ints: the attention map itself, hidden = [0] + [a + 1 for a in list].
    """
    for name, value in (("num_student", num_student), ("num_teacher", num_teacher)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    if num_student > num_teacher:
        raise ValueError(
            f"a student of {num_student} layers cannot map onto a teacher of {num_teacher}"
        )
    if isinstance(strategy, str):
        if strategy == "uniform":
            if num_teacher % num_student:
                raise ValueError(
                    f"strategy='uniform' needs num_teacher ({num_teacher}) divisible by "
                    f"num_student ({num_student}); use 'top', 'bottom' or an explicit list"
                )
            k = num_teacher // num_student
            attention = [(i + 1) * k - 1 for i in range(num_student)]
            return LayerMap(tuple(attention), tuple(i * k for i in range(num_student + 1)))
        if strategy == "top":
            first = num_teacher - num_student
            attention = [first + i for i in range(num_student)]
            return LayerMap(tuple(attention), (0, *(first + i for i in range(1, num_student + 1))))
        if strategy == "bottom":
            return LayerMap(tuple(range(num_student)), tuple(range(num_student + 1)))
        raise ValueError(
            f"strategy must be one of {LAYER_MAP_STRATEGIES} or a list of teacher layer "
            f"indices, got {strategy!r}"
        )
    attention = list(strategy)
    if len(attention) != num_student:
        raise ValueError(
            f"an explicit layer map needs one teacher layer per student layer ({num_student}), "
            f"got {len(attention)}"
        )
    for index in attention:
        if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_teacher:
            raise ValueError(
                f"teacher layer indices must be ints in [0, {num_teacher}), got {index!r}"
            )
    return LayerMap(tuple(attention), (0, *(a + 1 for a in attention)))
