"""``python -m psi.grid plan|run|status|work|slurm``: see :mod:`psi.grid.cli`."""

from psi.grid.cli import main

raise SystemExit(main(reexec=True))
