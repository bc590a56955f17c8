"""psi: training batch-normalized networks on the PSI manifold (Yi, UAI 2022).

The method lives in :mod:`psi.core`; this face re-exports what a practitioner needs:
``psi.PSISGD(psi.param_groups(model, example), lr=...)``.
"""

from psi.core import manifold
from psi.core.discovery import Layer, discover, find_scale_invariant, param_groups
from psi.core.functional import psi_sgd
from psi.core.psisgd import MAX_NORM, PSIGD, PSISGD

__all__ = ["manifold", "discover", "Layer", "find_scale_invariant", "param_groups", "PSISGD", "PSIGD",
           "psi_sgd", "MAX_NORM"]
__version__ = "0.1.0"
