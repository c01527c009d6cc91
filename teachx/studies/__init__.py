"""Studies of many runs: ``study`` (seeds x arms x regimes with paired statistics, units shared between
arms and worker processes) and ``status`` (where an unfinished study stands)."""
