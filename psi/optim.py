"""PSI-SGD and PSI-SGDM (eq. 10, Algorithm 1) as a drop-in ``torch.optim.Optimizer``.

Groups marked ``psi=True`` hold scale-invariant weights (see :func:`psi.param_groups`): every
neuron ``w(i)`` (axis 0) steps along its Riemannian gradient ``||w(i)||^2 G(i)`` (eq. 7),
with the retraction ``W + X`` (eq. 8). Every other group takes exactly ``torch.optim.SGD``'s
step: the same functional core is called, so a ``PSISGD`` without psi groups *is* SGD, bit
for bit.

Momentum follows ``torch.optim.SGD``'s convention (buffer ``b <- mu b + (1 - dampening) r``,
step ``w <- w - lr b``), with ``r`` the Riemannian gradient. With a constant ``lr`` this is
Algorithm 1 exactly (``u = -lr b``); when a schedule changes ``lr`` the whole buffer takes the
new rate at once, as in torch's SGD, where Algorithm 1 would keep the old rate inside ``u``.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as _torch_sgd

__all__ = ["PSISGD", "PSIGD", "psi_sgd"]


class PSISGD(Optimizer):
    """SGD on the PSI manifold for groups with ``psi=True``, torch's SGD for the rest.

    Args:
        params: parameters or groups; a group with ``psi=True`` must hold tensors whose axis
            0 indexes neurons (a conv/linear weight, and its bias when the bias scales with it).
        lr: the step ``eta``. On psi groups it is the step on the unit sphere of each neuron
            (the angle moved is about ``eta * ||grad_v L||``), whatever ``||w||`` is.
        momentum, dampening, nesterov, maximize: as in ``torch.optim.SGD``. ``momentum=0`` is
            PSI-SGD (eq. 10), ``momentum>0`` PSI-SGDM (Algorithm 1).
        weight_decay: L2 coefficient. It applies to non-psi groups; psi groups get 0 unless the
            group sets its own ``weight_decay``. On a psi group it adds ``lambda w`` to the
            gradient before the ``||w||^2`` scaling: the loss is then no longer scale-invariant
            and Theorem 1 (equivariance under ``T_a``) no longer holds.
        max_norm: the overflow safeguard of section 6.2. A neuron whose norm exceeds it is
            divided by its norm, and so is its momentum buffer, which keeps Theorem 1 exact.
            The norm is the one measured at the start of the step (it is needed there for
            eq. 7), so the rescaling lands one step after the crossing; rescaling commutes
            with the step (Theorem 1), so where it lands changes no class. ``None`` disables it.
        foreach: multi-tensor path; ``None`` picks it on CUDA (as torch does) and on the CPU
            for psi groups, where it is faster.

    The step makes no host-device synchronisation and never writes ``.grad``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float,
        momentum: float = 0.0,
        dampening: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
        max_norm: float | None = 1e4,
        *,
        foreach: bool | None = None,
        maximize: bool = False,
    ) -> None:
        if lr < 0.0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if momentum < 0.0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0.0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if max_norm is not None and max_norm <= 0.0:
            raise ValueError(f"Invalid max_norm: {max_norm} (a positive number, or None to disable)")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        defaults = dict(
            lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
            nesterov=nesterov, maximize=maximize, foreach=foreach, max_norm=max_norm,
            psi=False, differentiable=False, fused=None,
        )
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, but a psi group without its own ``weight_decay`` gets 0 (see class doc)."""
        if param_group.get("psi", False):
            param_group.setdefault("weight_decay", 0.0)
        super().add_param_group(param_group)

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    bufs: list[Tensor | None], neuron_sets: list[int]) -> bool:
        has_sparse_grad = False
        label, last = -1, None
        for p in group["params"]:
            # a 1-D tensor right after a weight with as many neurons is its bias: same neurons
            if not (p.dim() == 1 and last is not None and last.dim() > 1 and last.shape[0] == p.shape[0]):
                label += 1
            last = p
            if p.grad is None:
                continue
            params.append(p)
            grads.append(p.grad)
            neuron_sets.append(label)
            has_sparse_grad |= p.grad.is_sparse
            if group["momentum"] != 0:
                bufs.append(self.state[p].get("momentum_buffer"))
        if has_sparse_grad and group["psi"]:
            raise RuntimeError("PSISGD does not support sparse gradients in a psi group")
        return has_sparse_grad

    @torch.no_grad()
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch).

        Psi groups with the same hyperparameters are stepped together in one multi-tensor
        call (one group per layer is the usual layout, and a call per layer would cost a
        Python round trip each); a psi group's tensors share their neurons: the norm of
        neuron ``i`` is taken over row ``i`` of all of them (a weight and the bias that
        scales with it).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple, tuple[list, list, list, list]] = {}
        for group in self.param_groups:
            params: list[Tensor] = []
            grads: list[Tensor] = []
            bufs: list[Tensor | None] = []
            sets: list[int] = []
            has_sparse_grad = self._init_group(group, params, grads, bufs, sets)
            if group["psi"]:
                b = buckets.setdefault(tuple(group[k] for k in _PSI_KEYS), ([], [], [], []))
                offset = b[3][-1] + 1 if b[3] else 0
                b[0].extend(params), b[1].extend(grads), b[2].extend(bufs)
                b[3].extend(offset + s for s in sets)
                continue
            _torch_sgd(params, grads, bufs, weight_decay=group["weight_decay"], momentum=group["momentum"],
                       lr=group["lr"], dampening=group["dampening"], nesterov=group["nesterov"],
                       maximize=group["maximize"], has_sparse_grad=has_sparse_grad, foreach=group["foreach"],
                       fused=group["fused"], grad_scale=getattr(self, "grad_scale", None),
                       found_inf=getattr(self, "found_inf", None))
            self._store(group, params, bufs)
        for key, (params, grads, bufs, neuron_sets) in buckets.items():
            hyper = dict(zip(_PSI_KEYS, key, strict=True))
            psi_sgd(params, grads, bufs, neuron_sets=neuron_sets, **hyper)
            self._store(hyper, params, bufs)
        return loss

    def _store(self, group: dict[str, Any], params: list[Tensor], bufs: list[Tensor | None]) -> None:
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs, strict=True):
                self.state[p]["momentum_buffer"] = buf


_PSI_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", "max_norm", "foreach")


class PSIGD(PSISGD):
    """PSI-GD (eq. 9): the same update as :class:`PSISGD`, named for its full-batch use.

    The paper's PSI-GD and PSI-SGD differ only in the gradient they are given (the full batch
    or a minibatch); the optimizer cannot tell the two apart, so this class only changes the
    name. Feed it full-batch gradients (Theorem 2's setting).
    """


def _rows(w: Tensor) -> Tensor:
    return w.reshape(w.shape[0], -1)


def _as_column(v: Tensor, w: Tensor) -> Tensor:
    return v.view((-1,) + (1,) * (w.dim() - 1))


def psi_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffer_list: list[Tensor | None],
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    max_norm: float | None,
    foreach: bool | None = None,
    neuron_sets: list[int] | None = None,
) -> None:
    """Functional PSI-SGD(M) over scale-invariant tensors (neurons on axis 0); see :class:`PSISGD`.

    ``neuron_sets[k]`` labels the neurons of ``params[k]``: tensors with the same label share
    them (row ``i`` of each is part of neuron ``i``); ``None`` gives every tensor its own.
    """
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    fn = _multi_tensor_psi_sgd if foreach else _single_tensor_psi_sgd
    sq, cap = _neuron_sqnorms_and_caps(params, neuron_sets, max_norm)
    fn(params, grads, momentum_buffer_list, sq, cap, lr=lr, momentum=momentum, dampening=dampening,
       nesterov=nesterov, weight_decay=weight_decay, maximize=maximize)


def _neuron_sqnorms_and_caps(params: list[Tensor], neuron_sets: list[int] | None,
                             max_norm: float | None) -> tuple[list[Tensor], list[Tensor] | None]:
    """``||w(i)||^2`` for every tensor's neurons (shaped to broadcast), and the safeguard
    factors (1, or 1/||w(i)|| where ``||w(i)|| > max_norm``)."""
    if not params:
        return [], None
    sq = [torch.linalg.vecdot(_rows(w), _rows(w)) for w in params]
    if neuron_sets is not None and len(set(neuron_sets)) < len(neuron_sets):
        total: dict[int, Tensor] = {}
        for s, v in zip(neuron_sets, sq, strict=True):
            total[s] = total[s] + v if s in total else v
        sq = [total[s] for s in neuron_sets]
    sizes = [w.shape[0] for w in params]
    flat = torch.cat(sq)
    sq = [_as_column(v, w) for v, w in zip(flat.split(sizes), params, strict=True)]
    if max_norm is None:
        return sq, None
    cap = torch.where(flat > max_norm**2, flat.rsqrt(), torch.ones_like(flat))
    return sq, [_as_column(v, w) for v, w in zip(cap.split(sizes), params, strict=True)]


def _single_tensor_psi_sgd(params, grads, bufs, sq, caps, *, lr, momentum, dampening, nesterov, weight_decay,
                           maximize) -> None:
    for i, (w, g, r2) in enumerate(zip(params, grads, sq, strict=True)):
        g = -g if maximize else g
        if weight_decay != 0:
            g = g.add(w, alpha=weight_decay)
        if momentum != 0:
            buf = bufs[i]
            if buf is None:  # first step: the buffer is the Riemannian gradient, as in torch's SGD
                buf = torch.mul(g, r2).detach()
                bufs[i] = buf
            else:
                buf.mul_(momentum).addcmul_(g, r2, value=1 - dampening)
            step = buf.mul(momentum).addcmul_(g, r2) if nesterov else buf
        else:
            step = g * r2
        w.add_(step, alpha=-lr)
        if caps is not None:
            w.mul_(caps[i])
            if momentum != 0:
                buf.mul_(caps[i])


def _multi_tensor_psi_sgd(params, grads, bufs, sq, caps, *, lr, momentum, dampening, nesterov, weight_decay,
                          maximize) -> None:
    if not params:
        return
    if maximize:
        grads = torch._foreach_neg(grads)
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        old = [i for i, b in enumerate(bufs) if b is not None]
        if old:
            ob = [bufs[i] for i in old]
            torch._foreach_mul_(ob, momentum)
            torch._foreach_addcmul_(ob, [grads[i] for i in old], [sq[i] for i in old], value=1 - dampening)
        for i, b in enumerate(bufs):
            if b is None:  # first step: the buffer is the Riemannian gradient, as in torch's SGD
                bufs[i] = torch.mul(grads[i], sq[i]).detach()
        if nesterov:
            steps = torch._foreach_mul(bufs, momentum)
            torch._foreach_addcmul_(steps, grads, sq)
        else:
            steps = bufs
    else:
        steps = torch._foreach_mul(grads, sq)
    torch._foreach_add_(params, steps, alpha=-lr)
    if caps is not None:
        torch._foreach_mul_(params, caps)
        if momentum != 0:
            torch._foreach_mul_(bufs, caps)
