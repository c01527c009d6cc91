"""Runs: the stages of one run put together.

``pipeline`` (baseline -> teacher maps -> training method -> test, each stage resumable), ``resolve``
(a config resolved for running: every floor's checks and its names), ``rundir`` (what teachx owns in an
output directory), ``teacher`` (the teacher a run explains its images with), ``builtin_eval`` (the built-in
maps' evaluation inside a run), ``figures`` (the figures a run draws) and ``explain`` (a run's model
explaining new images). Studies (:mod:`teachx.studies`), reports (:mod:`teachx.reporting`), the service
(:mod:`teachx.service`) and the command line (:mod:`teachx.cli`) are layers over this.
"""
