"""PSI-SGD and PSI-SGDM (eq. 10, Algorithm 1) as a drop-in ``torch.optim.Optimizer``.

Groups marked ``psi=True`` hold scale-invariant weights (see :func:`psi.param_groups`): every
neuron ``w(i)`` (axis 0) steps along its Riemannian gradient ``||w(i)||^2 G(i)`` (eq. 7),
with the retraction ``W + X`` (eq. 8). Every other group takes exactly ``torch.optim.SGD``'s
step: the same functional core is called, so a ``PSISGD`` without psi groups *is* SGD, bit
for bit.

Momentum on psi groups is Algorithm 1 as printed: the state ``momentum_buffer`` of a psi
tensor is the velocity ``u`` in weight units (``u <- mu u - lr ||w||^2 G``, ``w <- w + u``), so
a change of ``lr`` by a schedule acts on new gradients only. torch's SGD (and so the non-psi
groups) keeps ``b`` with ``w <- w - lr b`` instead; with a constant ``lr`` the two agree
(``u = -lr b``). Dampening, Nesterov and the first step (``u = -lr ||w||^2 G``, undampened)
follow torch's SGD.

The constructor is ``torch.optim.SGD``'s (same order, defaults, validation and errors), with
``max_norm`` keyword-only after torch's arguments, so that an SGD call keeps its meaning.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _device_dtype_check_for_fused, _to_scalar, _use_grad_for_differentiable
from torch.optim.sgd import sgd as _torch_sgd

__all__ = ["PSISGD", "PSIGD", "psi_sgd", "MAX_NORM"]

# The overflow safeguard of section 6.2 (p. 1135): "we normalize the PSI weights w(i) if ||w(i)|| is
# larger than 10000 during training". The default of PSISGD, psi.optimizers and psi.train.Config.
MAX_NORM = 1e4


# What a group lacks in a state dict saved by an older psi or by torch's SGD, or in an optimizer
# unpickled from one (torch's SGD.__setstate__ fills the same keys with the same values).
_GROUP_DEFAULTS: dict[str, Any] = dict(nesterov=False, maximize=False, foreach=None, differentiable=False,
                                       fused=False, psi=False, max_norm=MAX_NORM)


class _Gathered(NamedTuple):
    """What a step collects from its groups (as torch's SGD's ``_init_group`` does), field by field:
    the tensors with a gradient, their gradients, their momentum buffers (only with momentum;
    ``None`` where none exists yet) and, for psi groups, the label of each tensor's neuron set
    (tensors with the same label share their neurons: :func:`psi_sgd`'s ``neuron_sets``), then
    the psi tensors without a gradient and their labels (they take no step, but their rows are
    part of their neurons' norms)."""

    params: list[Tensor]
    grads: list[Tensor]
    bufs: list[Tensor | None]
    neuron_sets: list[int]
    frozen: list[Tensor]
    frozen_sets: list[int]


class PSISGD(Optimizer):
    """SGD on the PSI manifold for groups with ``psi=True``, torch's SGD for the rest.

    The arguments are ``torch.optim.SGD``'s, in its order and with its defaults (a positional
    ``PSISGD(p, 0.1, 0.9, 0, 5e-4)`` means what it means for SGD: ``weight_decay=5e-4``), and
    ``max_norm`` is keyword-only after them. Validation and its errors are torch's.

    Args:
        params: parameters or groups; a group with ``psi=True`` must hold real floating-point
            tensors whose axis 0 indexes neurons (a conv/linear weight, and its bias when the bias
            scales with it).
        lr: the step ``eta`` (a float, or a 1-element tensor of any shape). On psi groups it is
            the step on the unit sphere of each neuron (the angle moved is about
            ``eta * ||grad_v L||``), whatever ``||w||`` is.
        momentum, dampening, nesterov: as in ``torch.optim.SGD``. ``momentum=0`` is PSI-SGD
            (eq. 10), ``momentum>0`` PSI-SGDM (Algorithm 1).
        weight_decay: L2 coefficient. It applies to non-psi groups; psi groups get 0 unless the
            group sets its own ``weight_decay``. On a psi group it adds ``lambda w`` to the
            gradient before the ``||w||^2`` scaling: the loss is then no longer scale-invariant
            and Theorem 1 (equivariance under ``T_a``) no longer holds.
        maximize: as in torch: the step is the one that minimizes ``-loss``, the gradient's sign
            flipped before ``weight_decay`` adds ``lambda w`` (on psi groups as on the others).
        foreach: multi-tensor path. ``None`` picks it on every device for every group (unless
            ``fused`` or ``differentiable`` is set, where torch's choice stands); on the CPU it is
            faster too, and torch's SGD gives the same bits on either path (tested).
        differentiable, fused: torch's, honoured on plain groups. A psi group refuses either set
            to True (its step is neither written for autograd nor fused): set them off on that group.
        max_norm: the overflow safeguard of section 6.2. A neuron whose norm exceeds it is
            divided by its norm, and so is its momentum buffer, which keeps Theorem 1 exact.
            The norm is the one measured at the start of the step (it is needed there for
            eq. 7), so the rescaling lands one step after the crossing; rescaling commutes
            with the step (Theorem 1), so where it lands changes no class. ``None`` disables it.

    A psi tensor without a gradient in a step (frozen, or unused) takes no step, as in torch, but
    its rows still count in its neurons' norms: eq. 7's ``||w(i)||^2`` is the norm of the point,
    the whole neuron, and the Riemannian gradient restricted to the tensors that move is
    ``||w(i)||^2`` times their Euclidean gradient (the metric of eq. 6 is the Euclidean one times
    a number per neuron, so dropping the frozen coordinates is the projection onto what moves).
    Skipping the neuron set instead would throw away the gradients it has. The safeguard then
    rescales only the tensors that step.

    The step makes no host-device synchronisation and never writes ``.grad``.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        momentum: float = 0.0,
        dampening: float = 0.0,
        weight_decay: float | Tensor = 0.0,
        nesterov: bool = False,
        *,
        maximize: bool = False,
        foreach: bool | None = None,
        differentiable: bool = False,
        fused: bool | None = None,
        max_norm: float | None = MAX_NORM,
    ) -> None:
        if isinstance(lr, Tensor) and lr.numel() != 1:
            raise ValueError("Tensor lr must be 1-element")
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
            nesterov=nesterov, maximize=maximize, foreach=foreach, differentiable=differentiable,
            fused=fused, max_norm=max_norm, psi=False,
        )
        super().__init__(params, defaults)
        if fused:  # torch's SGD's checks, in its order
            self._need_device_dtype_check_for_fused = True
            if differentiable:
                raise RuntimeError("`fused` does not support `differentiable`")
            if foreach:
                raise RuntimeError("`fused` and `foreach` cannot be `True` together.")

    @property
    def _step_supports_amp_scaling(self) -> bool:
        """GradScaler leaves the unscaling to a fused step (torch's SGD with ``fused=True``); psi groups
        need unscaled gradients, so only an optimizer without them takes that road."""
        return bool(self.defaults.get("fused")) and not any(g["psi"] for g in self.param_groups)

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Fill what an optimizer pickled by an older psi (or torch's SGD) lacks, as torch's SGD does."""
        super().__setstate__(state)
        for key, value in _GROUP_DEFAULTS.items():
            self.defaults.setdefault(key, value)
            for group in self.param_groups:
                group.setdefault(key, value)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As torch's; a saved group that lacks a key (saved by an older psi, or by torch's SGD) takes
        it from the group it replaces, so that a checkpoint keeps the layout this optimizer was built
        with (a psi group stays psi, with its ``max_norm``). Load-state-dict pre hooks see the filled
        dict. torch's SGD saves momentum buffers ``b`` (``w <- w - lr b``), a psi group reads Algorithm 1's
        ``u``: an SGD checkpoint continues exactly on plain groups; on psi groups drop its ``state``."""
        saved = state_dict.get("param_groups")
        if isinstance(saved, list) and len(saved) == len(self.param_groups):
            filled = [{**{k: v for k, v in own.items() if k not in ("params", "param_names")}, **group}
                      for own, group in zip(self.param_groups, saved, strict=True)]
            state_dict = {**state_dict, "param_groups": filled}
        super().load_state_dict(state_dict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, but a psi group without its own ``weight_decay`` gets 0 (see class doc), and
        a psi group refuses what its step cannot honour (complex tensors, ``fused``, ``differentiable``)."""
        if param_group.get("psi", False):
            param_group.setdefault("weight_decay", 0.0)
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["psi"]:
            _check_psi_group(group)
            for p in group["params"]:
                if not p.is_floating_point():
                    raise ValueError(f"PSISGD: a psi group (psi=True) needs real floating-point tensors, got "
                                     f"{p.dtype}: put such parameters in a plain group (psi=False), which is torch's SGD")

    def _init_group(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor],
                    bufs: list[Tensor | None], neuron_sets: list[int], frozen: list[Tensor],
                    frozen_sets: list[int]) -> bool:
        """Append the group's tensors with a gradient to the lists of a :class:`_Gathered` (as torch's
        SGD does) and label their neurons, continuing after the last label there: a 1-D tensor right
        after a weight with as many neurons is its bias and shares its neurons, every other tensor has
        its own. A psi tensor without a gradient goes to ``frozen`` with its label. The lists come as
        separate arguments, as in torch's optimizers: given empty lists, ``torch.compile`` runs this
        eagerly instead of tracing it. Returns whether a gradient is sparse."""
        has_sparse_grad = False
        momentum = group["momentum"] != 0
        is_psi = group["psi"]
        fused_check = group["fused"] and getattr(self, "_need_device_dtype_check_for_fused", True)
        labels = [neuron_sets[-1] if neuron_sets else -1, frozen_sets[-1] if frozen_sets else -1]
        label, last = max(labels), None
        for p in group["params"]:
            if not (last is not None and p.dim() == 1 and last.dim() > 1 and last.shape[0] == p.shape[0]):
                label += 1
            last = p
            grad = p.grad
            if grad is None:
                if is_psi:
                    frozen.append(p)
                    frozen_sets.append(label)
                continue
            if fused_check:
                _device_dtype_check_for_fused(p)
                self._need_device_dtype_check_for_fused = fused_check = False
            params.append(p)
            grads.append(grad)
            neuron_sets.append(label)
            has_sparse_grad |= grad.is_sparse
            if momentum:
                state = self.state.get(p)
                bufs.append(None if state is None else state.get("momentum_buffer"))
        if has_sparse_grad and is_psi:
            raise RuntimeError("PSISGD does not support sparse gradients in a psi group: put the tensor in a plain "
                               "group (psi=False), which is torch's SGD and takes them")
        return has_sparse_grad

    @_use_grad_for_differentiable
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch).

        Psi groups with the same hyperparameters are stepped together in one multi-tensor
        call (one group per layer is the usual layout, and a call per layer would cost a
        Python round trip each); a psi group's tensors share their neurons: the norm of
        neuron ``i`` is taken over row ``i`` of all of them (a weight and the bias that
        scales with it: a 1-D tensor placed right after a weight with as many neurons).
        Gradients are off during the step unless ``differentiable`` (torch's rule).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple, _Gathered] = {}
        for group in self.param_groups:
            if group["psi"]:  # gathered into the bucket of its hyperparameters, stepped below
                _check_psi_group(group)
                bucket = buckets.get(key := _psi_hyper(group))
                if bucket is None:
                    bucket = buckets[key] = _Gathered([], [], [], [], [], [])
                self._init_group(group, *bucket)
                continue
            gathered = _Gathered([], [], [], [], [], [])
            has_sparse_grad = self._init_group(group, *gathered)
            foreach, fused = group["foreach"], group["fused"]
            if foreach is None and not fused:  # differentiable: torch's for-loop (foreach takes no tensor alpha)
                foreach = not has_sparse_grad and not group["differentiable"]
            _torch_sgd(gathered.params, gathered.grads, gathered.bufs, weight_decay=group["weight_decay"],
                       momentum=group["momentum"], lr=group["lr"], dampening=group["dampening"],
                       nesterov=group["nesterov"], maximize=group["maximize"], has_sparse_grad=has_sparse_grad,
                       foreach=foreach, fused=fused, grad_scale=getattr(self, "grad_scale", None),
                       found_inf=getattr(self, "found_inf", None))
            self._store(gathered.params, gathered.bufs)
        for key, bucket in buckets.items():
            hyper = dict(zip(_PSI_KEYS, key, strict=True))
            created = bucket.bufs and any(b is None for b in bucket.bufs)
            with torch.no_grad():  # psi groups are never differentiable, even where the optimizer's default is
                psi_sgd(bucket.params, bucket.grads, bucket.bufs, neuron_sets=bucket.neuron_sets,
                        frozen=bucket.frozen, frozen_sets=bucket.frozen_sets, **hyper)
            if created:
                self._store(bucket.params, bucket.bufs)
        return loss

    def _store(self, params: list[Tensor], bufs: list[Tensor | None]) -> None:
        for p, buf in zip(params, bufs):  # empty when there is no momentum
            self.state[p]["momentum_buffer"] = buf


def _check_psi_group(group: dict[str, Any]) -> None:
    """Refuse, naming the setting and the way out, what a psi group's step cannot honour."""
    for key, why in (("fused", "there is no fused PSI kernel; foreach=None or True is its multi-tensor path"),
                     ("differentiable", "its step is not written for autograd through the update")):
        if group[key]:
            raise RuntimeError(f"PSISGD: {key}=True is not supported on a psi group (psi=True): {why}. Set "
                               f"{key}=False on that group (e.g. {{'params': ..., 'psi': True, '{key}': False}}); "
                               f"plain groups (psi=False) are torch's SGD and honour it")


_PSI_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", "max_norm", "foreach")


def _psi_hyper(group: dict[str, Any]) -> tuple:
    """The hyperparameters that decide whether psi groups can be stepped together (a plain
    tuple: torch.compile traces it, where operator.itemgetter breaks the graph)."""
    return tuple(group[k] for k in _PSI_KEYS)


class PSIGD(PSISGD):
    """PSI-GD (eq. 9): the same update as :class:`PSISGD`, named for its full-batch use.

    The paper's PSI-GD and PSI-SGD differ only in the gradient they are given (the full batch
    or a minibatch); the optimizer cannot tell the two apart, so this class only changes the
    name. Feed it full-batch gradients (Theorem 2's setting).
    """


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
    if order != list(range(len(params))):
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
    gcoef = flat_sq * (lr if maximize else -lr)
    rows = [gcoef]
    if max_norm is not None:
        cap = torch.where(flat_sq > max_norm**2, flat_sq.rsqrt(), torch.ones_like(flat_sq))
        rows = [gcoef * cap, cap, cap * momentum]
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
    caps, mucaps = (cols[1], cols[2]) if max_norm is not None else (None, None)
    fn = _multi_tensor_psi_sgd if foreach else _single_tensor_psi_sgd
    fn(params, grads, us, cols[0], caps, mucaps, momentum=momentum, dampening=dampening, nesterov=nesterov)
    if us is not momentum_buffer_list:  # new buffers back to the caller's order
        for pos, i in enumerate(order):
            momentum_buffer_list[i] = us[pos]


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
        else:
            torch.addcmul(step, w, caps[i], out=w)


def _multi_tensor_psi_sgd(params, grads, us, gcoef, caps, mucaps, *, momentum, dampening, nesterov) -> None:
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
    else:
        for w, s, c in zip(params, steps, caps, strict=True):
            torch.addcmul(s, w, c, out=w)  # cap w + step in one pass
