"""kd_kernels: fused GPU/CPU kernels for knowledge-distillation and contrastive losses.

Example: ``kdk.kd_loss(student_logits, teacher_logits, temperature=2.0)`` after
``import kd_kernels as kdk``.
"""

from kd_kernels import nn
from kd_kernels._backend import available_backends
from kd_kernels.functional import attention_mse_loss, hidden_mse_loss, info_nce_loss, kd_loss
from kd_kernels.fused_linear import fused_linear_kd_loss
from kd_kernels.layer_map import LayerMap, layer_map

__all__ = [
    "LayerMap",
    "attention_mse_loss",
    "available_backends",
    "fused_linear_kd_loss",
    "hidden_mse_loss",
    "info_nce_loss",
    "kd_loss",
    "layer_map",
    "nn",
]
__version__ = "0.1.0"
