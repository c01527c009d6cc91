"""The explanation service behind `teachx serve`: the one object the web layer and the CLI talk to.

``Service(paths)`` is a thin facade over the service's layers, each in its own module:

- :mod:`teachx.service.loading`: the catalog's runs and models, loading a model and its test data the
  first time they are asked for (a unit whose checkpoint is damaged reports its error, the others keep
  working), and the provenance record every answer carries (run directory, checkpoint and its sha256,
  config hash, teachx version, method and options, dataset, split and index or the upload's sha256);
- :mod:`teachx.service.rows`: the offline cache (:mod:`teachx.service.cache`) of probabilities,
  built-in maps, teacher maps, pixel-flipping curves and agreements, computing only the missing rows,
  and the offline precompute;
- :mod:`teachx.service.maps`: predictions and maps of a test image, each of the one class it explains;
- :mod:`teachx.service.uploads`: predictions and maps of an uploaded image;
- :mod:`teachx.service.metrics`: the image list with its filters and sort keys, and one image's
  pixel-flipping curve and agreement.

Errors are :class:`teachx.service.errors.ServiceError` subclasses with an HTTP status and a one-line message.
"""

from __future__ import annotations

from teachx.service.metrics import MetricViews
from teachx.service.uploads import Uploads


class Service(MetricViews, Uploads):
    """Runs and models of one or more directories, with their caches; safe to call from threads."""
