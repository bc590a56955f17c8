"""Benchmarks, side by side in one process and reported as ratios (``python -m psi.bench``): one optimizer
step, the ops it dispatches (:mod:`opcount`), an epoch, the engine, discovery, the image loader.
May import: everything (psi.paper, psi.grid, psi.study, psi.engine, psi.core)."""
