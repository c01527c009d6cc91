"""Load Quantus as a test/bench-time reference, with the narrowest shims this environment needs.

Quantus is not a teachx dependency; tests and ``bench/bench_metrics.py`` use it when it is
installed (``pip install --no-deps quantus==0.6.*``, which also wants scikit-image to be present).
Two things stop it from running unmodified here, and each gets one shim:

1. **Missing or broken optional imports** (``cv2``; ``torchvision`` when zennit is installed,
   whose PyPI wheel fails on our CPU torch with "operator torchvision::nms does not exist").
   Quantus 0.6 imports ``cv2`` at module level for its rotation/translation perturbations
   (robustness metrics) and reaches ``torchvision`` only through zennit's explainers. We use
   neither. Only for a package whose real import fails, a stub is served *during the import of
   Quantus*: any attribute of it is a placeholder that raises ``QuantusShimError`` naming the
   missing package as soon as it is called, instantiated or looked into. So a stub can never
   produce a number: code that reaches it fails loudly. The stubs are taken out of
   ``sys.modules`` (and their finder out of ``sys.meta_path``) right after the import; Quantus
   keeps its own references, other tests see the real (missing) packages.
2. **``np.trapz``** is gone in numpy 2.4; Quantus' ``calculate_auc`` (PixelFlipping and
   RegionPerturbation AUCs, IROF, Selectivity) calls it at run time. ``numpy_compat()`` aliases
   ``np.trapz = np.trapezoid`` for the duration of a ``with`` block and removes the alias after.
   numpy's own ``trapz`` was a thin deprecated wrapper around ``trapezoid`` (numpy 2.0-2.3), so
   the alias computes what Quantus computed with older numpy.

Usage::

    quantus = load_quantus()            # ImportError with the reason when it cannot load
    with numpy_compat():
        scores = quantus.PixelFlipping(...)(model=..., x_batch=..., ...)
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
from typing import Iterator, Optional

import numpy as np

# packages Quantus imports for features teachx never compares against; stubbed only if broken
STUBBABLE = ("cv2", "torchvision")

_loaded: Optional[types.ModuleType] = None
_shims: tuple[str, ...] = ()
_failure: Optional[str] = None


class QuantusShimError(RuntimeError):
    """Quantus used a package that was stubbed out because it does not import here."""


def _unavailable(package: str, name: str) -> type:
    """A placeholder class: subclassing it works (so ``class X(Stub)`` imports), using it raises."""

    def fail(*_args, **_kwargs):
        raise QuantusShimError(
            f"'{name}' is a stub: {package} does not import in this environment, so the Quantus "
            "feature that needs it cannot be used as a reference here"
        )

    class _Meta(type):
        __call__ = fail

        def __getattr__(cls, attr):  # only reached for attributes the class does not have
            fail()

    return _Meta(name.rsplit(".", 1)[-1], (), {"__module__": package})


class _StubModule(types.ModuleType):
    def __init__(self, name: str, package: str):
        super().__init__(name)
        self.__path__ = []  # a package, so ``import stub.sub`` goes through the finder
        self.__teachx_stub__ = package

    def __getattr__(self, attr: str):
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _unavailable(self.__teachx_stub__, f"{self.__name__}.{attr}")


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves ``_StubModule`` for the given top-level packages and all their submodules."""

    def __init__(self, packages: tuple[str, ...]):
        self.packages = packages
        self.served: set[str] = set()  # packages something actually imported

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".", 1)[0] in self.packages:
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        self.served.add(spec.name.split(".", 1)[0])
        return _StubModule(spec.name, spec.name.split(".", 1)[0])

    def exec_module(self, module):
        pass


def _imports(package: str) -> bool:
    """Whether the real package imports (a failed import's leftovers are cleared)."""
    before = set(sys.modules)
    try:
        importlib.import_module(package)
        return True
    except Exception:  # ModuleNotFoundError, or torchvision's RuntimeError on a mismatched torch
        for name in set(sys.modules) - before:
            if name.split(".", 1)[0] == package:
                del sys.modules[name]
        return False


def _forget(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


def load_quantus() -> types.ModuleType:
    """The ``quantus`` module, with stubs for broken optional imports; ImportError if it cannot load.

    Loaded once per process. ``applied_shims()`` names the packages that were stubbed.
    """
    global _loaded, _shims, _failure
    if _loaded is not None:
        return _loaded
    if _failure is not None:
        raise ImportError(_failure)
    if importlib.util.find_spec("quantus") is None:
        _failure = "quantus is not installed (pip install --no-deps 'quantus==0.6.*')"
        raise ImportError(_failure)
    try:
        _loaded = importlib.import_module("quantus")
        return _loaded
    except Exception as error:  # fall through to the shimmed import
        first_error = f"{type(error).__name__}: {error}"
    _forget("quantus")
    broken = tuple(p for p in STUBBABLE if not _imports(p))
    finder = _StubFinder(broken)
    sys.meta_path.insert(0, finder)
    try:
        _loaded = importlib.import_module("quantus")
        _shims = tuple(sorted(finder.served))
        return _loaded
    except Exception as error:
        _forget("quantus")
        _failure = f"quantus does not import even with stubs for {broken}: {type(error).__name__}: {error}"
        _failure += f" (unshimmed: {first_error})"
        raise ImportError(_failure) from error
    finally:
        sys.meta_path.remove(finder)
        for package in broken:
            _forget(package)


def applied_shims() -> tuple[str, ...]:
    """Packages stubbed during the import of Quantus (empty when it imported as is)."""
    return _shims


@contextlib.contextmanager
def numpy_compat() -> Iterator[None]:
    """``np.trapz`` as an alias of ``np.trapezoid`` inside the block, when numpy lacks it."""
    if "trapz" in vars(np) or not hasattr(np, "trapezoid"):
        yield
        return
    np.trapz = np.trapezoid  # type: ignore[attr-defined]
    try:
        yield
    finally:
        del np.trapz
