"""Training methods behind one contract (``base.TrainingMethod``), chosen with ``method.name``.

``impactx`` (the default), ``baseline``, ``abn``, ``rrr``, ``saliency_guided``, ``reldrop``, and the
concept corrections ``rrclarc``, ``aclarc``, ``rrr_revealed`` and ``impactx_cleaned``: one file each, registered in ``METHODS``. ``teachx methods`` lists them with their options.
"""

from teachx.training.methods.base import (
    LEGACY_METHOD,
    METHODS,
    MethodContext,
    Option,
    TrainingMethod,
    build_method,
    method_name,
    method_of_model,
    method_stages,
    recorded_config_method,
    recorded_method,
)
from teachx.training.methods.impactx_options import (
    DECODER_CHOSEN,
    OPTION_NAMES,
    ImpactxOptions,
    impactx_options,
    legacy_layout,
    saved_impactx_options,
    uses_impactx_options,
)

# Method modules register themselves in METHODS on import.
from teachx.training.methods import abn as _abn  # noqa: F401,E402
from teachx.training.methods import aclarc as _aclarc  # noqa: F401,E402
from teachx.training.methods import baseline as _baseline  # noqa: F401,E402
from teachx.training.methods import impactx as _impactx  # noqa: F401,E402
from teachx.training.methods import impactx_cleaned as _impactx_cleaned  # noqa: F401,E402
from teachx.training.methods import reldrop as _reldrop  # noqa: F401,E402
from teachx.training.methods import rrclarc as _rrclarc  # noqa: F401,E402
from teachx.training.methods import rrr as _rrr  # noqa: F401,E402
from teachx.training.methods import rrr_revealed as _rrr_revealed  # noqa: F401,E402
from teachx.training.methods import saliency_guided as _saliency_guided  # noqa: F401,E402
from teachx.training.methods.base import register_section_aliases  # noqa: E402

register_section_aliases()  # impactx.KEY: IMPACTX's options, also written this way

__all__ = [
    "DECODER_CHOSEN",
    "OPTION_NAMES",
    "ImpactxOptions",
    "impactx_options",
    "legacy_layout",
    "saved_impactx_options",
    "uses_impactx_options",
    "LEGACY_METHOD",
    "METHODS",
    "MethodContext",
    "Option",
    "TrainingMethod",
    "build_method",
    "method_name",
    "method_of_model",
    "method_stages",
    "recorded_config_method",
    "recorded_method",
]
