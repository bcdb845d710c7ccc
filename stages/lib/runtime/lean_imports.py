"""Defer modules that libraries import eagerly but a stage rarely uses.

- ``bitsandbytes``: diffusers (``models.modeling_utils`` -> ``quantizers``) and peft (``peft.helpers``) import it
  whenever it is installed, for quantized checkpoints that no stage loads. On a CUDA host the import loads
  bitsandbytes' native library and Triton backends: seconds of every stage's startup.
- ``scipy.stats`` (with ``scipy.ndimage``): diffusers' schedulers import it for beta sigma schedules; 0.8 s on the
  2-core CPU.

:func:`install` makes ``import <module>`` return the module with its code not yet run: the code runs on the first
use of a name from it (e.g. when ``optimizer=adamw8bit`` builds bitsandbytes' optimizer), or before one of its
submodules is imported, and never in a stage that does not use it. Nothing else changes: the module is found and
reported available as before.

``SDPIPE_EAGER_IMPORTS=1`` turns this off.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import threading
import types

DEFERRED = frozenset({"bitsandbytes", "scipy.stats"})
EAGER_ENV = "SDPIPE_EAGER_IMPORTS"


class _DeferredModule(types.ModuleType):
    """A module whose code has not run yet: the first look-up of a name it lacks runs it (see ``_DeferredLoader``).

    Import machinery reads only attributes set before ``exec_module`` (``__spec__``, ``__path__``, ...), which
    exist, so a second ``import`` of the package does not run it."""

    def __getattr__(self, name: str) -> object:
        loader = self.__dict__.get("__loader__")
        if not isinstance(loader, _DeferredLoader):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        loader.run(self)
        return getattr(self, name)


class _DeferredLoader(importlib.abc.Loader):
    """Wraps a module's loader: ``exec_module`` only marks the module deferred; ``run`` executes it once."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self.loader = loader
        self._lock = threading.RLock()

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__class__ = _DeferredModule

    def run(self, module: types.ModuleType) -> None:
        with self._lock:
            if type(module) is not _DeferredModule:
                return
            module.__class__ = types.ModuleType
            module.__loader__ = self.loader
            if module.__spec__ is not None:
                module.__spec__.loader = self.loader
            try:
                self.loader.exec_module(module)
            except BaseException:
                sys.modules.pop(module.__name__, None)  # the next import tries again and raises for itself
                raise


class _DeferredImports(importlib.abc.MetaPathFinder):
    """Finds the modules in ``DEFERRED`` through the other finders and defers their code."""

    def find_spec(self, fullname: str, path, target=None):  # noqa: ANN001 -- MetaPathFinder's signature
        if fullname not in DEFERRED:
            parts = fullname.split(".")
            for depth in range(1, len(parts)):  # a submodule may rely on its package's own set-up
                package = sys.modules.get(".".join(parts[:depth]))
                if type(package) is _DeferredModule:
                    package.__loader__.run(package)
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is None:
                continue
            if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                spec.loader = _DeferredLoader(spec.loader)
            return spec
        return None


_FINDER = _DeferredImports()


def install() -> None:
    """Defer the ``DEFERRED`` modules in this process (idempotent; off with ``SDPIPE_EAGER_IMPORTS=1``)."""
    if os.environ.get(EAGER_ENV) != "1" and _FINDER not in sys.meta_path:
        sys.meta_path.insert(0, _FINDER)
