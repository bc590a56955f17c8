"""psi: training batch-normalized networks on the PSI manifold (Yi, UAI 2022)."""

from . import manifold
from .discovery import Layer, discover, find_scale_invariant, param_groups
from .psisgd import MAX_NORM, PSIGD, PSISGD, psi_sgd

__all__ = ["manifold", "discover", "Layer", "find_scale_invariant", "param_groups", "PSISGD", "PSIGD", "psi_sgd", "MAX_NORM"]
__version__ = "0.1.0"
