"""Count what a piece of code dispatches: aten ops, and the ones that make the host wait.

On a GPU, a Python training loop is fast when the host queues kernels and never waits for
them. Two things make it wait: a kernel launch per small op (the cost grows with the number
of dispatched ops) and a *host sync*, where the host needs a value the device computes.
Both can be counted on the CPU, where there is no GPU to time, by watching the dispatcher:

- every ``aten`` op reaching the dispatcher is one kernel launch on a GPU (a ``_foreach``
  op is one, however many tensors it touches);
- ``aten._local_scalar_dense`` is what ``.item()``, ``float(t)``, ``int(t)`` and ``bool(t)``
  call; ``nonzero``, ``masked_select``, boolean-mask indexing, ``unique`` and friends have
  an output whose size depends on the data, so the host must wait for it; ``equal`` returns
  a Python bool.

``Tensor.tolist()`` and ``Tensor.numpy()`` do not go through the dispatcher on the CPU, so
they are invisible here; the engine does not call them inside the loop.

    with OpCounter() as c:
        opt.step()
    c.total, c.syncs
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["OpCounter", "SYNC_OPS"]

# ops whose result the host must read (or whose output size depends on the data)
SYNC_OPS = frozenset({
    "aten._local_scalar_dense", "aten.nonzero", "aten.nonzero_static", "aten.masked_select",
    "aten.equal", "aten.is_nonzero", "aten.unique_consecutive", "aten._unique", "aten._unique2",
    "aten.unique_dim", "aten.repeat_interleave", "aten.argwhere", "aten.masked_scatter",
})


def _packet(func: Any) -> str:
    return f"aten.{func._schema.name.split('::', 1)[1]}" if func.namespace == "aten" else str(func)


def _has_bool_index(args: tuple) -> bool:
    """``x[mask]`` / ``x[mask] = v``: an index tensor of bools needs ``nonzero`` under the hood."""
    indices = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else ()
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


class OpCounter(TorchDispatchMode):
    """A dispatch mode that counts ops by name (``ops``) and host syncs by name (``syncs``)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        name = _packet(func)
        self.ops[name] += 1
        if name in SYNC_OPS or (name in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_")
                                and _has_bool_index(args)):
            self.syncs[name] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        """All dispatched aten ops (a GPU launches about one kernel for each)."""
        return sum(self.ops.values())

    @property
    def sync_count(self) -> int:
        return sum(self.syncs.values())
