"""Tools built on the optimizers: the ``adamkit`` command, the memory planner, the training job,
the race and the benchmarks. Each is an importable module first; ``cli`` only parses and prints."""
