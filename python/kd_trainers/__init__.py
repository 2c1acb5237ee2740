"""Reference trainers for distillation and contrastive methods on top of kd_kernels."""
