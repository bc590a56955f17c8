"""The functional core of PSI-SGD(M) (eqs. 10-12): :func:`psi_sgd` on lists of tensors, as
``torch.optim.sgd.sgd`` is SGD's, with a single-tensor and a multi-tensor (foreach) path that give the same
bits; per-neuron squared norms are summed over every tensor of a neuron's group (weight and bias, eq. 7)."""

from __future__ import annotations

import torch
from torch import Tensor
from torch.optim.optimizer import _to_scalar


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
    frozen: list[Tensor] | None = None,
    frozen_sets: list[int] | None = None,
) -> None:
    """Functional PSI-SGD(M) over scale-invariant tensors (neurons on axis 0); see :class:`PSISGD`.

    ``momentum_buffer_list`` holds Algorithm 1's ``u`` (``w_{t+1} = w_t + u_{t+1}``).
    ``neuron_sets[k]`` labels the neurons of ``params[k]``: tensors with the same label share
    them (row ``i`` of each is part of neuron ``i``); ``None`` gives every tensor its own.
    ``frozen``: tensors that take no step (no gradient) but whose rows belong to the neurons
    labelled ``frozen_sets`` (the same labels as ``neuron_sets``): their squared norms join those
    neurons' ``||w(i)||^2`` (see :class:`PSISGD`). ``lr``: a float or a 1-element tensor.
    """
    if not params:
        return
    lr = _to_scalar(lr)  # a 1-element tensor of any shape to 0-dim, as torch's SGD does (no sync)
    if foreach is None:
        foreach = not torch.jit.is_scripting()
    # Tensors sorted by dimension (stable), so that the per-neuron coefficients of each
    # dimension are one contiguous block: a few views and splits give every tensor its
    # broadcastable columns (a per-tensor view would cost a Python round trip each).
    dims = [w.dim() for w in params]
    order = sorted(range(len(params)), key=dims.__getitem__)
    us = momentum_buffer_list
    dims.sort()
    reordered = order != list(range(len(params)))
    if reordered:
        params, grads, us = ([xs[i] for i in order] for xs in (params, grads, us)) if us else \
            ([params[i] for i in order], [grads[i] for i in order], us)
        neuron_sets = None if neuron_sets is None else [neuron_sets[i] for i in order]
    if weight_decay != 0:
        # maximize: torch's SGD steps along -(-G + wd w) = G - wd w; the step below carries the sign flip
        # (+lr), so the gradient takes -wd: the same bits as negating G first (negation is exact)
        alpha = -weight_decay if maximize else weight_decay
        grads = torch._foreach_add(grads, params, alpha=alpha) if foreach else \
            [g.add(w, alpha=alpha) for g, w in zip(grads, params, strict=True)]
    # the gradient's factor -lr ||w(i)||^2 (eq. 7, 10) and the safeguard's factor (1 or 1/||w(i)||).
    # flat_sq is psi.manifold.sqnorms, and with momentum 0 the step is
    # manifold.retr(W, -lr * manifold.egrad2rgrad(W, G)), both to rounding (tests/test_optim.py ties
    # them); written as the square of vector_norm and fused here: other bits than sqnorms' vecdot,
    # and the arithmetic every recorded run used.
    sizes = [w.shape[0] for w in params]
    others: list[Tensor] = []
    if frozen and neuron_sets is not None:  # the frozen tensors of neuron sets that step
        stepping = set(neuron_sets)
        kept = [(t, label) for t, label in zip(frozen, frozen_sets or [], strict=True) if label in stepping]
        others = [t for t, _ in kept]
    flat_sq = torch.cat([torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim()))) if w.dim() > 1 else w.abs()
                         for w in params + others]).square()
    if others:
        flat_sq = _sum_shared(flat_sq, sizes + [t.shape[0] for t in others],
                              neuron_sets + [label for _, label in kept], len(params))
    elif neuron_sets is not None and len(set(neuron_sets)) < len(neuron_sets):  # some tensors share neurons
        flat_sq = _sum_shared(flat_sq, sizes, neuron_sets, len(params))
    rows = coefficients(flat_sq, lr=lr, maximize=maximize, max_norm=max_norm, momentum=momentum)
    coefs = torch.stack(rows)
    cols: list[list[Tensor]] = [[] for _ in rows]
    start, offset = 0, 0
    while start < len(params):
        dim, end = dims[start], start
        while end < len(params) and dims[end] == dim:
            end += 1
        n = sum(sizes[start:end])
        block = coefs[:, offset:offset + n].view((len(rows), n) + (1,) * (dim - 1))
        for col, c in zip(cols, block.unbind(0), strict=True):
            col.extend(c.split(sizes[start:end]))
        start, offset = end, offset + n
    caps = cols[1] if max_norm is not None else None
    mucaps = cols[2] if len(cols) > 2 else None
    fn = _multi_tensor_psi_sgd if foreach else _single_tensor_psi_sgd
    fn(params, grads, us, cols[0], caps, mucaps, momentum=momentum, dampening=dampening, nesterov=nesterov)
    if reordered and us:  # new buffers back to the caller's order (no ``is not`` on lists: torch 2.11 cannot trace it)
        for pos, i in enumerate(order):
            momentum_buffer_list[i] = us[pos]


def is_bias_of(p: Tensor, last: Tensor | None) -> bool:
    """Whether ``p``, placed right after ``last`` in its group, is ``last``'s bias: a 1-D tensor after a
    weight with as many neurons (the two share their neurons)."""
    return last is not None and p.dim() == 1 and last.dim() > 1 and last.shape[0] == p.shape[0]


def coefficients(flat_sq: Tensor, *, lr: float | Tensor, maximize: bool, max_norm: float | None,
                 momentum: float, one: Tensor | float = 1.0, out: list[Tensor] | None = None) -> list[Tensor]:
    """The per-neuron factors of a step from the neurons' squared norms ``||w(i)||^2``: the
    gradient's ``c = -lr ||w(i)||^2 cap`` (eq. 7, 10; ``+lr`` to maximize), and with the safeguard
    on, ``cap`` (1, or ``1/||w(i)||`` past ``max_norm``, section 6.2) and, with momentum,
    ``cap * momentum``. Both paths (per tensor and flat) take them from here, so they give the same
    bits. ``one``: 1 as a tensor the caller keeps, ``out``: tensors the caller keeps for the three
    (each split once, when laid out): the scalar and the splits would cost an op per step each."""
    o = out or [None] * 3
    scale = lr if maximize else -lr
    if max_norm is None:
        return [torch.mul(flat_sq, scale, out=o[0])]
    gcoef = flat_sq * scale
    big = flat_sq > max_norm**2
    cap = torch.where(big, flat_sq.rsqrt(), one) if out is None else torch.where(big, flat_sq.rsqrt(), one, out=o[1])
    return [torch.mul(gcoef, cap, out=o[0]), cap] + ([torch.mul(cap, momentum, out=o[2])] if momentum != 0 else [])


def _sum_shared(flat_sq: Tensor, sizes: list[int], neuron_sets: list[int], n: int) -> Tensor:
    """Give each of the first ``n`` tensors the squared norms of its neuron set (summed over the set's
    tensors, the ones after ``n`` included: frozen tensors, which take no step)."""
    parts = flat_sq.split(sizes)
    total: dict[int, Tensor] = {}
    for label, v in zip(neuron_sets, parts, strict=True):
        total[label] = total[label] + v if label in total else v
    return torch.cat([total[label] for label in neuron_sets[:n]])


# In both paths below, with c = -lr ||w||^2 cap (per neuron) and cap the safeguard factor:
#   u <- cap mu u + (1 - dampening) c g     (the first u is c g, as torch's first buffer is g)
#   w <- cap w + u                          (nesterov: cap w + mu u + c g)
# which is Algorithm 1 followed by the safeguard's rescaling of w and u (section 6.2).


def _single_tensor_psi_sgd(params, grads, us, gcoef, caps, mucaps, *, momentum, dampening, nesterov) -> None:
    for i, (w, g, c) in enumerate(zip(params, grads, gcoef, strict=True)):
        if momentum == 0:
            if caps is not None:
                w.mul_(caps[i])
            w.addcmul_(g, c)
            continue
        u = us[i]
        if u is None:
            u = us[i] = torch.mul(g, c).detach()
        else:
            u.mul_(momentum if mucaps is None else mucaps[i]).addcmul_(g, c, value=1 - dampening)
        step = torch.addcmul(u * momentum, g, c) if nesterov else u
        if caps is None:
            w.add_(step)
        else:  # cap w + step, written back with copy_: an ``out=`` of a channels-last w breaks a compiled graph
            w.copy_(torch.addcmul(step, w, caps[i]))


def _multi_tensor_psi_sgd(params, grads, us, gcoef, caps, mucaps, *, momentum, dampening, nesterov,
                          contiguous: bool = False) -> None:
    """``contiguous``: ``params`` are a few contiguous tensors, never traced (the flat path's classes): cap w
    + step is written in place with ``out=``, which saves a pass and a temporary of every parameter."""
    if momentum == 0:
        if caps is not None:
            torch._foreach_mul_(params, caps)
        torch._foreach_addcmul_(params, grads, gcoef)
        return
    if all(u is not None for u in us):
        torch._foreach_mul_(us, momentum if mucaps is None else mucaps)
        torch._foreach_addcmul_(us, grads, gcoef, value=1 - dampening)
    else:  # some buffers are new (first step, or a parameter that had no gradient before)
        for i, u in enumerate(us):
            if u is None:
                us[i] = torch.mul(grads[i], gcoef[i]).detach()
            else:
                u.mul_(momentum if mucaps is None else mucaps[i]).addcmul_(grads[i], gcoef[i], value=1 - dampening)
    steps = us
    if nesterov:
        steps = torch._foreach_mul(us, momentum)
        torch._foreach_addcmul_(steps, grads, gcoef)
    if caps is None:
        torch._foreach_add_(params, steps)
    elif contiguous:
        for w, s, c in zip(params, steps, caps, strict=True):
            torch.addcmul(s, w, c, out=w)
    else:  # cap w + step (one rounding of w cap, as addcmul has it), then copied back: an ``out=``
        # of a non-contiguous (channels-last) w breaks a compiled graph, a foreach copy does not
        torch._foreach_copy_(params, torch._foreach_addcmul(steps, params, caps))
