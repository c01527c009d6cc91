"""Orchestration: the stages of a run put together, and studies of many runs.

``pipeline`` (baseline -> teacher maps -> training method -> test, each stage resumable), ``study`` (seeds x
arms x regimes with paired statistics, units shared between arms and worker processes), ``study_status``
(where an unfinished study stands), ``rundir`` (what teachx owns in an output directory) and
``builtin_eval`` (the built-in maps' evaluation inside a run). The command line (:mod:`teachx.interfaces`)
and the service (:mod:`teachx.service`) are thin layers over this.
"""
