"""The run configuration, on the ground floor: every layer above speaks it.

``schema`` (the dataclasses of a run config: data / model / train / teacher / method, with
their documented defaults), ``train`` (the train.* section), ``loader`` (strict dataclasses from nested
dicts, overrides, YAML), ``shipped`` (the example configs shipped in ``teachx/configs``, usable by name)
and ``load`` (defaults <- file <- overrides). Checks that need the registries of upper floors (dataset,
decoder, map-loss and method names) are added by those floors as hooks (``schema.add_hook``); the runs
layer (:func:`teachx.runs.resolve.resolve_config`) loads them all and checks the names before a run.
"""
