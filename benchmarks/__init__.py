"""Microbenchmarks of kd_kernels against the implementations users write or install."""
