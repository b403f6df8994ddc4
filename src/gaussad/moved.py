"""The module paths of the one flat package (gaussad 0.1.0, before the wings layout) keep working: ``import
gaussad.tune`` (or ``from gaussad import distributed``) imports ``gaussad.tools.tune`` and warns once, with a
DeprecationWarning naming the new path.

CHANGELOG.md lists the moves. Only the modules that moved are aliased; the alias is the module itself (no copy), so
``gaussad.tune.tune is gaussad.tools.tune.tune``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from types import ModuleType

MOVED = {
    **{m: f"core.{m}" for m in ("gaussian", "bank", "maps", "threshold", "fusion", "drift")},
    **{m: f"intake.{m}" for m in ("files", "images", "engine", "features", "tiles", "backbones")},
    **{m: f"detector.{m}" for m in ("params", "state", "fitting", "decision", "persistence", "model", "inference",
                                    "results", "heatmap")},
    **{m: f"tools.{m}" for m in ("tune", "evaluate", "report", "datasets", "synthetic", "export", "distributed",
                                 "demo")},
    "serve": "service.app",
    **{m: f"service.{m}" for m in ("operations", "feedback", "results_log", "results_file", "keys")},
}


class _Alias(importlib.abc.Loader):
    """Loads an old path as the module at its new path, leaving the module's own spec as it was."""

    def __init__(self, target: str):
        self.target = target
        self.spec = None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        warnings.warn(f"{spec.name} moved to {self.target}; the old path will go in a later version (CHANGELOG.md)",
                      DeprecationWarning, stacklevel=2)
        module = importlib.import_module(self.target)
        self.spec = module.__spec__
        return module

    def exec_module(self, module: ModuleType) -> None:
        module.__spec__ = self.spec  # the import system set the alias's spec on the real module: put its own back


class _Finder(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname: str, path: object = None, target: object = None):
        head, _, rest = fullname.removeprefix("gaussad.").partition(".")
        if not fullname.startswith("gaussad.") or head not in MOVED:
            return None
        target = f"gaussad.{MOVED[head]}" + (f".{rest}" if rest else "")
        return importlib.util.spec_from_loader(fullname, _Alias(target))


def install() -> None:
    """Put the finder for the old paths on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        # first: the path finder would find an old path's submodules through the new package's __path__
        sys.meta_path.insert(0, _Finder())
