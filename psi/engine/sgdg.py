"""SGD-G: Cho and Lee 2017's SGD on the Grassmann manifold G(1, n), the paper's SGDG baseline.

Written from "Riemannian approach to batch normalization" (NeurIPS 2017) and checked against its
authors' code (github.com/MinhyungCho/riemannian-batch-normalization, TensorFlow, the code of
their experiments, and its PyTorch port ``...-pytorch``: ``grassmann_optimizer.py``, ``gutils.py``;
``tests/test_sgdg.py`` transcribes their update). Every neuron of a scale-invariant layer is kept
at unit norm (a point of the sphere, standing for its line). With ``g`` the Euclidean gradient
plus, when ``omega > 0``, the orthogonality regularizer's ``2 omega (Y Y^T Y - Y)`` (the gradient
of ``omega/2 ||Y Y^T - I||_F^2`` for the unit rows ``Y`` of *one layer*: their ``--omega``), ``h``
its projection on the tangent space, clipped to norm ``grad_clip`` (their nu, ``--grad_clip 0.1``),
the momentum ``d = beta * m - lr * h`` is followed along the great circle (the exponential map,
:func:`psi.manifold.expmap` at unit norm, written out here: see ``_grassmann_rows``) and
parallel-transported to the new point:
``m <- d cos|d| - y |d| sin|d|``. Groups without ``psi=True`` take torch's SGD step, as in
:class:`psi.PSISGD`. Their code differs in two things we do not copy: the PyTorch port rebuilds
the optimizer at each learning-rate drop (its momentum restarts), and both renormalize the rows
before a step where we renormalize after it (the same to rounding).

Every operation of the update but the regularizer acts on each neuron (a row) separately, so the
neurons of all layers whose weights have the same trailing shape (``w.shape[1:]``: the 3x3
convolutions of a stage with the same input width) are concatenated into one matrix and updated
together: a step dispatches a few dozen ops per distinct shape (4 on a CIFAR ResNet) instead of
about 35 per layer. The numbers are those of the layer-by-layer update up to float rounding
(tested). The regularizer couples the neurons of a layer, so it is computed layer by layer.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

__all__ = ["SGDG"]


class SGDG(Optimizer):
    """Cho and Lee's SGD-G on psi groups (weight tensors, neurons on axis 0), SGD elsewhere.

    A psi group may hold the weights of any number of layers; a bias that scales with its
    weight has no place on the sphere of the weight's neurons and is refused. A psi group reads
    ``lr``, ``momentum``, ``grad_clip`` and ``omega``; its state is ``momentum`` (the transported
    ``m``, shaped like the tensor; it starts at 0). Non-psi groups take torch's SGD with their
    ``lr``, ``momentum`` (``rest_momentum`` unless the group sets its own), ``weight_decay`` and
    ``nesterov``, on its multi-tensor path on every device (torch picks it on GPUs only; the bits
    are the same).
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, grad_clip: float | None = 0.1,
                 weight_decay: float = 0.0, *, omega: float = 0.0, nesterov: bool = False,
                 rest_momentum: float = 0.9) -> None:
        if omega < 0:
            raise ValueError(f"Invalid omega: {omega}")
        groups = list(params)
        if groups and not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        groups = [g if g.get("psi", False) or "momentum" in g else dict(g, momentum=rest_momentum) for g in groups]
        defaults = dict(lr=lr, momentum=momentum, grad_clip=grad_clip, omega=omega, weight_decay=weight_decay,
                        nesterov=nesterov, psi=False)
        super().__init__(groups, defaults)
        # Start on the manifold: unit-norm neurons (the function is unchanged under BN). This is
        # psi.manifold.canonical(w) to rounding (tested), kept as written: canonical takes the root of
        # vecdot(w, w), a different reduction than norm(), and changes the last bits of every SGDG run.
        with torch.no_grad():
            for group in self.param_groups:
                if group["psi"]:
                    for w in group["params"]:
                        if w.dim() < 2:
                            raise ValueError("SGDG supports psi groups of weight tensors only (no bias that scales "
                                             "with its weight)")
                        w.div_(w.reshape(w.shape[0], -1).norm(dim=1).view((-1,) + (1,) * (w.dim() - 1)))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not group["psi"]:
                bufs: list[Tensor | None] = [self.state[p].get("momentum_buffer") for p in params]
                _torch_sgd(params, [p.grad for p in params], bufs, weight_decay=group["weight_decay"],
                           momentum=group["momentum"], lr=group["lr"], dampening=0.0, nesterov=group["nesterov"],
                           maximize=False, foreach=True)
                for p, b in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = b
                continue
            same_rows: dict[tuple, list[Tensor]] = {}
            for w in params:
                same_rows.setdefault((w.shape[1:], w.dtype, w.device), []).append(w)
            for ws in same_rows.values():
                self._grassmann_step(ws, group)
        return loss

    def _grassmann_step(self, ws: list[Tensor], group: dict[str, Any]) -> None:
        """One step for layers whose weights share ``shape[1:]``: their neurons stacked as rows."""
        ms = []
        for w in ws:
            state = self.state[w]
            if "momentum" not in state:
                state["momentum"] = torch.zeros_like(w)
            ms.append(state["momentum"])
        y, m = torch.cat(ws), torch.cat(ms)
        sizes = [w.shape[0] for w in ws]
        g = torch.cat([w.grad for w in ws]).flatten(1)
        if group["omega"]:
            _add_orthogonality(g, y.flatten(1), sizes, group["omega"])
        new_y, new_m = _grassmann_rows(y.flatten(1), g, m.flatten(1), lr=group["lr"], momentum=group["momentum"],
                                       grad_clip=group["grad_clip"])
        torch._foreach_copy_(ws, new_y.view_as(y).split(sizes))
        torch._foreach_copy_(ms, new_m.view_as(m).split(sizes))


def _add_orthogonality(g: Tensor, y: Tensor, sizes: list[int], omega: float) -> None:
    """Add to ``g`` (rows of stacked layers, in place) the gradient of Cho and Lee's orthogonality
    regularizer ``omega/2 ||Y Y^T - I||_F^2`` of each layer's unit rows ``Y``: ``2 omega (Y Y^T Y - Y)``,
    the term their code adds to the gradient before projecting it (``-Y`` is radial: the projection
    removes it, kept to be the formula they write)."""
    yyty = torch.cat([(a @ a.mT) @ a for a in y.split(sizes)])
    g.add_(yyty.sub_(y), alpha=2 * omega)


def _grassmann_rows(y: Tensor, g: Tensor, m: Tensor, *, lr: float, momentum: float,
                    grad_clip: float | None) -> tuple[Tensor, Tensor]:
    """Cho and Lee's SGD-G step (their ``SgdgOptimizer._apply_dense``) on unit rows ``y`` (a neuron
    each), Euclidean gradient ``g`` and transported momentum ``m`` (0 at the start): the new rows and
    the new momentum.

    ``g`` and ``m`` are overwritten (the caller's concatenated copies): in place, a step on
    stacked layers makes three large temporaries instead of about fifteen, which is what
    stacking costs on a CPU, where the per-layer tensors stayed in cache."""
    h = g.addcmul_(y, torch.linalg.vecdot(y, g).unsqueeze(1), value=-1)  # tangent part: g - <y, g> y
    if grad_clip is None:
        d = m.mul_(momentum).add_(h, alpha=-lr)  # d = momentum m - lr h
    else:  # the same with h clipped to norm grad_clip: h * min(1, grad_clip / |h|)
        clip = torch.clamp(grad_clip / torch.linalg.vector_norm(h, dim=1, keepdim=True).clamp_min(1e-30), max=1.0)
        d = m.mul_(momentum).addcmul_(h, clip, value=-lr)
    dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    cos, sin = torch.cos(dn), torch.sin(dn)
    # The exponential map y cos|d| + d/|d| sin|d|: psi.manifold.expmap(y, d) at unit rows, to rounding
    # (tested). Written out because expmap projects d onto the tangent space again and divides by |y|
    # (1 up to rounding): other bits, and more passes over the stacked rows.
    new_y = (y * cos).addcmul_(d, sin / dn.clamp_min(1e-30))
    new_m = d.mul_(cos).addcmul_(y, dn * sin, value=-1)  # parallel transport of d: d cos|d| - y |d| sin|d|
    # back on the sphere despite rounding: psi.manifold.canonical, in the arithmetic of __init__ (see there)
    return new_y.div_(torch.linalg.vector_norm(new_y, dim=1, keepdim=True)), new_m
