"""Runs: the stages of one run put together.

``pipeline`` (baseline -> teacher maps -> training method -> test, each stage resumable, and the method
stage), ``recovery`` (the stage records on disk, the way forward from a damaged file, ``--redo``),
``records`` (the typed stage records and run results, written and read there alone), ``plan`` (the data
plan and how the teacher is trained), ``stages`` (the classifier stages), ``teacher`` (the teacher a run
explains its images with, the teacher model and its maps), ``evaluation`` (map quality, the built-in maps'
faithfulness, shortcut evaluation, the example images), ``resolve`` (a config resolved for running: every
floor's checks and its names), ``rundir`` (what teachx owns in an output directory), ``figures`` (the
figures a run draws) and ``explain`` (a run's model explaining new images). Studies
(:mod:`teachx.studies`), reports (:mod:`teachx.reporting`), the service (:mod:`teachx.service`) and the
command line (:mod:`teachx.cli`) are layers over this.
"""
