"""Public implementations that serve as benchmark competitors and test oracles, loaded
without their heavy extras (tests/oracles.py re-exports them)."""

import importlib.util
import sys
import types


def textbrewer_losses() -> types.ModuleType:
    """textbrewer.losses (pure torch) without textbrewer/__init__, which imports tensorboard.

    The package's folder is mounted as a bare package so that losses.py's relative import of
    .compatibility still resolves. Raises ImportError if textbrewer is not installed.
    """
    spec = importlib.util.find_spec("textbrewer")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("textbrewer is not installed: pip install --no-deps textbrewer")
    name = "_textbrewer_oracle"
    if name not in sys.modules:
        package = types.ModuleType(name)
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules[name] = package
    return importlib.import_module(f"{name}.losses")
