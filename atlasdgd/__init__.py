"""atlasdgd: Deep Generative Decoder models (scDGD / multiDGD) for single-cell atlases.

The package's names are imported on first use, so ``import atlasdgd.model`` (the torch core) needs
neither anndata nor the storage libraries: a bare GPU image runs the core.
"""

from __future__ import annotations

import importlib
import sys
import types

from atlasdgd.runtime.malloc import limit_malloc_arenas
from atlasdgd.runtime.threads import prefer_short_spinning, warn_if_torch_came_first

warn_if_torch_came_first()
prefer_short_spinning()  # before anything imports torch: OpenMP reads it once (see runtime/threads.py)
limit_malloc_arenas()  # before any thread allocates: arenas are taken at a thread's first allocation

__version__ = "0.1.0"

_EXPORTS = {
    "DGD": "atlasdgd.api",
    "Atlas": "atlasdgd.atlas",
    "SimulationConfig": "atlasdgd.simulate",
    "simulate": "atlasdgd.simulate",
}
__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'atlasdgd' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


class _Package(types.ModuleType):
    """Keeps ``atlasdgd.simulate`` the function (as it always was) after the submodule of the same name
    is imported: the import system would otherwise replace the attribute with the module."""

    def __setattr__(self, name: str, value) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
