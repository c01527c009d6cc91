"""Teachers: explanation methods behind one contract, ``attribute(model, inputs, target)``.

``build(name, **options)`` returns a ready teacher; ``TEACHERS.names()`` lists them. Importing this
package registers every built-in method (one module each).
"""

from __future__ import annotations

from typing import Any

from teachx.errors import ConfigError
from teachx.teachers.base import TEACHERS, Teacher

# each import registers its methods in TEACHERS
from teachx.teachers import gradients as _gradients  # noqa: F401,E402
from teachx.teachers import gradcam as _gradcam  # noqa: F401,E402
from teachx.teachers import occlusion as _occlusion  # noqa: F401,E402
from teachx.teachers import bcos as _bcos  # noqa: F401,E402
from teachx.teachers import shap as _shap  # noqa: F401,E402

try:  # LRP lands as its own package
    from teachx.teachers import lrp as _lrp  # noqa: F401,E402
except ImportError:  # pragma: no cover - only while lrp is absent
    import importlib.util as _u

    if _u.find_spec("teachx.teachers.lrp") is not None:
        raise


def build(name: str, **options: Any) -> Teacher:
    """Build the teacher ``name`` with ``options``; bad names/options raise a one-line ConfigError."""
    cls = TEACHERS.get(name)
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"bad options for teacher '{name}': {exc}; see `teachx teachers` and the docs") from None


__all__ = ["TEACHERS", "Teacher", "build"]
