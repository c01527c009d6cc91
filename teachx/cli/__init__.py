"""The command line, the top floor: ``main`` (the `teachx` command and its run commands), ``study``,
``serve`` and ``cache`` (their command groups), ``describe`` (`teachx config --describe / --list`,
`teachx teachers`, `teachx models`) and ``launch`` (multi-process runs through torchrun)."""
