"""Independent public implementations used as test oracles (loaders shared with benchmarks)."""

from benchmarks._peers import textbrewer_losses

__all__ = ["textbrewer_losses"]
