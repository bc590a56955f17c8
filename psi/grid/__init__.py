"""Running a study on machines (``python -m psi.grid``): the command line, workers and their slots, MPS,
the time estimate, progress, SLURM. May import: psi.study, psi.engine, psi.core."""
