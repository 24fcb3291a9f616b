"""Old import paths of the pipeline modules, kept working with a ``DeprecationWarning``.

Up to 0.1 the pipeline lived next to the core (``stbat_plugin.api``, ``stbat_plugin.config``,
...). It is now :mod:`stbat_plugin.pipeline`; importing an old path returns the module at the
new one (the very same module object) and warns once per path.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType
from typing import Any

MOVED = frozenset({
    "api", "balance", "checkpoint", "classical", "cli", "config", "diagnose", "distributed",
    "experiment", "method_registry", "methods", "metrics", "paper", "plots", "preflight",
    "report", "results", "runfolder", "tasks", "trainer",
})


class _Alias(importlib.abc.Loader):
    def __init__(self, new: str):
        self.new = new

    def create_module(self, spec: Any) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.new}; import it from there (the old path "
                      "will be removed in 0.3)", DeprecationWarning, stacklevel=3)
        return importlib.import_module(self.new)

    def exec_module(self, module: ModuleType) -> None:  # already executed under its new name
        pass


class MovedModules(importlib.abc.MetaPathFinder):
    """Finds ``stbat_plugin.<old>`` for each moved module and aliases it to the new path."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Any:
        package, _, name = fullname.rpartition(".")
        if package != "stbat_plugin" or name not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, _Alias(f"stbat_plugin.pipeline.{name}"))


def install() -> None:
    if not any(isinstance(f, MovedModules) for f in sys.meta_path):
        sys.meta_path.append(MovedModules())
