"""One training run and a sweep of them: datasets and loaders, models, the baselines and the optimizer
registry, the run's configuration, its folder (lock, atomic writes, checkpoints), processes and devices,
the trainer. May import: psi.core (and numpy, torch)."""
