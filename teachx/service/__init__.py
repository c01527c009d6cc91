"""`teachx serve`: an interactive explanation service over runs and studies.

The library (:mod:`teachx.service.catalog`, :mod:`teachx.service.engine` over its layers
:mod:`~teachx.service.loading`, :mod:`~teachx.service.rows`, :mod:`~teachx.service.maps`,
:mod:`~teachx.service.uploads` and :mod:`~teachx.service.metrics`, :mod:`teachx.service.cache`,
:mod:`teachx.service.render`) does the work and needs no web stack;
:mod:`teachx.service.app` is a thin FastAPI layer over it (install ``teachx[serve]``), and the page
in ``teachx/service/static`` is plain HTML/JS/CSS served by that app.
"""

from teachx.service.engine import Service
from teachx.service.errors import ServiceError

__all__ = ["Service", "ServiceError"]
