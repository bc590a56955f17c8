"""psi: training batch-normalized networks on the PSI manifold (Yi, UAI 2022)."""

from . import manifold
from .discovery import find_scale_invariant, param_groups
from .optim import PSIGD, PSISGD, psi_sgd

__all__ = ["manifold", "find_scale_invariant", "param_groups", "PSISGD", "PSIGD", "psi_sgd"]
__version__ = "0.1.0"
