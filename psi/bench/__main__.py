"""``python -m psi.bench optimizer|ops|epoch|engine``: see :mod:`psi.bench`."""

from psi.bench.cli import main

main()
