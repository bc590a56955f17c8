"""SGD-G: Cho and Lee 2017's SGD on the Grassmann manifold G(1, n), the paper's SGDG baseline.

Written from "Riemannian approach to batch normalization" (NeurIPS 2017), Algorithm 1: every
neuron of a scale-invariant layer is kept at unit norm (a point of the sphere, standing for
its line); with ``h`` the Euclidean gradient's projection on the tangent space, clipped to
norm ``grad_clip`` (their nu = 0.1), the momentum ``m <- beta * tau(m) - lr * h`` is followed
along the great circle (the exponential map, :func:`psi.manifold.expmap` at unit norm) and
parallel-transported to the new point: ``tau(d) = d cos|d| - y |d| sin|d|``.
Groups without ``psi=True`` take torch's SGD step, as in :class:`psi.PSISGD`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

__all__ = ["SGDG"]


class SGDG(Optimizer):
    """Cho and Lee's SGD-G on psi groups (one weight tensor each, neurons on axis 0), SGD elsewhere."""

    def __init__(self, params, lr: float, momentum: float = 0.9, grad_clip: float | None = 0.1,
                 weight_decay: float = 0.0, *, rest_momentum: float = 0.9) -> None:
        defaults = dict(lr=lr, momentum=momentum, grad_clip=grad_clip, weight_decay=weight_decay,
                        rest_momentum=rest_momentum, psi=False)
        super().__init__(params, defaults)
        with torch.no_grad():  # start on the manifold: unit-norm neurons (the function is unchanged under BN)
            for group in self.param_groups:
                if group["psi"]:
                    if len(group["params"]) != 1:
                        raise ValueError("SGDG supports psi groups of one weight tensor (no bias that scales with it)")
                    w = group["params"][0]
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
                           momentum=group["rest_momentum"], lr=group["lr"], dampening=0.0, nesterov=False,
                           maximize=False)
                for p, b in zip(params, bufs, strict=True):
                    self.state[p]["momentum_buffer"] = b
                continue
            for w in params:
                self._grassmann_step(w, self.state[w], group)
        return loss

    def _grassmann_step(self, w: Tensor, state: dict[str, Any], group: dict[str, Any]) -> None:
        y = w.reshape(w.shape[0], -1)
        g = w.grad.reshape(w.shape[0], -1)
        h = g - torch.linalg.vecdot(y, g).unsqueeze(1) * y  # tangent part
        if group["grad_clip"] is not None:
            hn = torch.linalg.vector_norm(h, dim=1, keepdim=True)
            h = h * torch.clamp(group["grad_clip"] / hn.clamp_min(1e-30), max=1.0)
        m = state.get("momentum")
        d = -group["lr"] * h if m is None else group["momentum"] * m - group["lr"] * h
        dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
        direction = d / dn.clamp_min(1e-30)
        new_y = y * torch.cos(dn) + direction * torch.sin(dn)  # exponential map on the unit sphere
        state["momentum"] = d * torch.cos(dn) - y * (dn * torch.sin(dn))  # parallel transport of d
        new_y = new_y / torch.linalg.vector_norm(new_y, dim=1, keepdim=True)  # stay on the sphere despite rounding
        w.copy_(new_y.view_as(w))
