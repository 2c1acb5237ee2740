"""Triton kernels, one loss per file, with their launch code and torch.library ops."""
