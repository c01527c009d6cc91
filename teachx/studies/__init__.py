"""Studies of many runs: seeds x arms x regimes with paired statistics, units shared between arms and worker
processes. ``spec`` (the study config, its units and their keys), ``runner`` (training and evaluating the
units, the study record), ``statistics`` (paired comparisons, Holm, verdicts, the summary table) and
``status`` (where an unfinished study stands)."""
