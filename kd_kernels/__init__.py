"""kd_kernels: fused GPU/CPU kernels for knowledge-distillation and contrastive losses.

Example: ``kdk.kd_loss(student_logits, teacher_logits, temperature=2.0)`` after
``import kd_kernels as kdk``.
"""

from kd_kernels import nn
from kd_kernels._backend import available_backends
from kd_kernels.functional import kd_loss

__all__ = ["available_backends", "kd_loss", "nn"]
__version__ = "0.1.0"
