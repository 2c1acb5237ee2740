"""Drop-ins for other libraries' training code (``kd_kernels.integrations.<library>``).

Each module imports its library lazily and only calls kd_kernels' public API; ``import
kd_kernels`` never needs any of them.
"""
