"""The notebooks' experiments: the toy net, the symmetry, the geometry, the rates, Figure 4, the CIFAR and
analysis notebooks' functions, the curves, and the notebooks' set-up.
May import: psi.grid, psi.study, psi.engine, psi.core."""
