"""Flat buffers for the psi tensors of one :class:`~psi.PSISGD` bucket: the constant-cost step.

The per-tensor step (:func:`psi.core.functional.psi_sgd`) spends a few ops on every tensor, so
its cost grows with depth. Here the weights (and the biases that scale with their neurons), their
gradients and their momentum live in three flat buffers of one device and dtype, the tensors of
each fan-in class (``numel / shape[0]``: the length of a neuron's row) side by side, and every
parameter is rebound to a view of its place (``p.data``, as ``DistributedDataParallel``'s
``gradient_as_bucket_view`` and FSDP's flat parameters do). Row ``i`` of a parameter is then a
contiguous run of its class's 2-D view ``[rows, fan_in]``, for a contiguous or a channels-last
tensor alike, so the neurons' squared norms are one reduce per class and the update a fixed
number of foreach ops over the classes (:func:`flat_psi_sgd`): the same arithmetic as the
per-tensor path on the same numbers, hence the same bits (tests/test_flat.py).

What can move a parameter out of its buffer (``model.to()``, ``.double()``, ``p.data = ...``) is
caught before a step by comparing data pointers on the host (:meth:`FlatBuffers.intact`); the
optimizer then lays the buffers out again from the parameters' new values. Momentum buffers are
per-parameter views of the flat one in the optimizer's state, so a state dict stays per parameter.
"""

from __future__ import annotations

import math
import operator
import warnings

import torch
from torch import Tensor, nn
from torch.optim.sgd import sgd as _torch_sgd

from psi.core.functional import _multi_tensor_psi_sgd, coefficients, is_bias_of

__all__ = ["FlatBuffers", "adopt_state", "copy_grads", "flat_psi_sgd", "flat_sgd", "lay_out", "neuron_labels",
           "why_not_flat"]

_CHANNELS_LAST = {4: torch.channels_last, 5: torch.channels_last_3d}  # the other dense layouts taken


def why_not_flat(params: list[Tensor]) -> str | None:
    """Why these tensors cannot share flat buffers (``None`` when they can): the flat layout needs
    plain dense floating-point tensors, all on one device in one dtype, whose neuron rows are
    contiguous runs (contiguous or channels-last memory)."""
    if not params:
        return "no tensors"
    first = params[0]
    for p in params:
        if type(p) not in (Tensor, nn.Parameter) or type(p.data) is not Tensor:
            return f"a {type(p).__name__} parameter (a tensor subclass such as FSDP's or a DTensor)"
        if p.layout != torch.strided or not p.is_floating_point():
            return f"a {p.layout} {p.dtype} tensor (the flat layout takes dense floating-point ones)"
        if p.device != first.device:
            return f"tensors on several devices ({first.device} and {p.device}) in psi groups of the same settings"
        if p.dtype != first.dtype:
            return f"tensors of several dtypes ({first.dtype} and {p.dtype}) in psi groups of the same settings"
        if p.numel() == 0:
            return f"an empty tensor of shape {tuple(p.shape)}"
        formats = [torch.contiguous_format, _CHANNELS_LAST.get(p.dim(), torch.contiguous_format)]
        if not any(p.is_contiguous(memory_format=f) for f in formats):
            return f"a tensor of shape {tuple(p.shape)} with strides {p.stride()} (neither contiguous nor channels-last)"
    return None


_warned: set[str] = set()


def warn_reference_once(reason: str) -> None:
    """Say once per reason and process why a bucket takes the per-tensor (reference) path."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"PSISGD: {reason}; those groups take the per-tensor step (fused=False), which gives "
                      f"the same result at a cost that grows with the number of tensors. This warning is shown once.",
                      RuntimeWarning, stacklevel=4)


class FlatBuffers:
    """Flat weight, gradient and momentum buffers of one bucket's psi tensors, and the views into them.

    ``params`` in the bucket's order, ``neuron_sets`` their labels (tensors with the same label share
    their neurons, as in :func:`~psi.core.functional.psi_sgd`; at most two per label: a weight and
    its bias). Building copies each tensor's values (and ``momentum_buffers``, where given) into the
    buffers and rebinds ``p.data`` to its view.
    """

    def __init__(self, params: list[Tensor], neuron_sets: list[int], momentum: bool) -> None:
        first = params[0]
        fan_ins = [p.numel() // p.shape[0] for p in params]
        classes = sorted(set(fan_ins))
        self.params = list(params)
        self.neuron_sets = list(neuron_sets)
        self.sizes: tuple[int, ...] = (len(params),)  # the tensors of each group (lay_out sets them)
        self.class_rows: list[int] = []  # the neurons' rows of each class, in class order
        offsets: list[int] = [0] * len(params)  # where each tensor starts in the buffers (elements)
        row_of: list[int] = [0] * len(params)  # its first row in the rows of all classes
        class_spans: list[tuple[int, int, int]] = []  # (start element, rows, fan-in) per class
        # Every tensor starts on a 64-byte boundary, as a tensor of its own would (torch's allocators
        # align so): some kernels take other paths on other alignments and give other bits (a 1x1 conv
        # of a weight 4 bytes off, on the CPU). Within a class that takes padding rows of zeros, which
        # stay zero (no gradient, zero norm: coefficient 0); between classes, padding elements.
        align = max(1, 64 // first.element_size())
        start = row = 0
        for fan_in in classes:
            start += -start % align
            step = align // math.gcd(fan_in, align)  # rows whose fan_in elements make a multiple of align
            rows = 0
            for i, p in enumerate(params):
                if fan_ins[i] == fan_in:
                    rows += -rows % step
                    offsets[i], row_of[i] = start + rows * fan_in, row + rows
                    rows += p.shape[0]
            class_spans.append((start, rows, fan_in))
            self.class_rows.append(rows)
            start, row = start + rows * fan_in, row + rows
        self.rows = row
        kw = dict(device=first.device, dtype=first.dtype)
        self.weight = torch.zeros(start, **kw)
        self.grad = torch.zeros(start, **kw)  # its padding is never written: zero gradients
        self.momentum = torch.zeros(start, **kw) if momentum else None
        self.momentum_ready = False  # the first step (or a state with buffers) fills it

        def views(flat: Tensor) -> list[Tensor]:
            return [flat.as_strided(p.shape, p.stride(), off) for p, off in zip(params, offsets, strict=True)]

        def class_views(flat: Tensor) -> list[Tensor]:
            return [flat[s:s + r * f].view(r, f) for s, r, f in class_spans]

        self.fan_ins = [f for _, _, f in class_spans]
        self.weight_classes, self.grad_classes = class_views(self.weight), class_views(self.grad)
        self.momentum_classes = class_views(self.momentum) if momentum else []
        self.grad_views = views(self.grad)
        # the fan-in-1 class, when it holds only 1-D tensors (BN's weights and biases, a classifier's bias), takes
        # its gradients in one cat (a foreach copy costs a dispatch per tensor on the CPU); the rest one foreach copy
        ones = [i for i, f in enumerate(fan_ins) if f == 1]
        self.cat_idx = ones if ones and all(params[i].dim() == 1 for i in ones) else []
        self.copy_idx = [i for i in range(len(params)) if i not in set(self.cat_idx)]
        self.cat_parts: list[int | Tensor] = []  # the cat's inputs: a tensor's index, or zeros for its padding
        if self.cat_idx:
            s0, r0, _ = class_spans[classes.index(1)]
            self.cat_span, end = self.grad[s0:s0 + r0], s0
            for i in self.cat_idx:
                if offsets[i] > end:
                    self.cat_parts.append(torch.zeros(offsets[i] - end, **kw))
                self.cat_parts.append(i)
                end = offsets[i] + params[i].numel()
        self.momentum_views = views(self.momentum) if momentum else []
        with torch.no_grad():
            for p, view in zip(params, views(self.weight), strict=True):
                view.copy_(p)
                p.data = view
        self.pointers = [p.data_ptr() for p in params]
        self.partner = self._partners(row_of)
        # the neurons' norms, written class by class (out=: no cat), and after them a row kept 0
        # (the partner of a row without one); and 1 as a tensor for the safeguard
        self.norms = torch.zeros(self.rows + (self.partner is not None), 1, **kw)
        self.norm_classes = list(self.norms[:self.rows].split(self.class_rows))
        self.one = torch.ones(1, 1, **kw)
        # the step's per-neuron factors (gradient, safeguard, momentum's: functional.coefficients),
        # written in place, and each class's [rows, 1] column of them, broadcast on its rows
        self.factors = [torch.empty(self.rows, 1, **kw) for _ in range(3)]
        self.factor_classes = [list(f.split(self.class_rows)) for f in self.factors]

    def _partners(self, row_of: list[int]) -> Tensor | None:
        """For each row of the buffers, the row of the other tensor of its neuron (a weight's bias and
        back), or the extra zero row after the last one: their squared norms add to the neuron's."""
        by_label: dict[int, list[int]] = {}
        for i, label in enumerate(self.neuron_sets):
            by_label.setdefault(label, []).append(i)
        pairs = [ks for ks in by_label.values() if len(ks) > 1]
        if not pairs:
            return None
        partner = list(range(self.rows, self.rows + 1)) * self.rows  # every row: the zero row
        for ks in pairs:
            if len(ks) != 2:
                raise AssertionError(f"a neuron set of {len(ks)} tensors (PSISGD labels a weight and its bias)")
            a, b = ks
            for r in range(self.params[a].shape[0]):
                partner[row_of[a] + r], partner[row_of[b] + r] = row_of[b] + r, row_of[a] + r
        return torch.tensor(partner, device=self.weight.device)

    def intact(self, params: list[Tensor], sizes: tuple[int, ...]) -> bool:
        """Whether these are still the tensors laid out here, in groups of the same ``sizes``, each still a
        view of its place: a host-side comparison of objects and data pointers, no device sync."""
        return (sizes == self.sizes and len(params) == len(self.params)
                and all(map(operator.is_, params, self.params))
                and [p.data_ptr() for p in params] == self.pointers)

    def adopt(self, bufs: list[Tensor | None]) -> bool:
        """Take the state's momentum buffers (one per tensor) into the flat one: they are its views
        already, or (a loaded state dict, a new layout) they are copied in and the views take their
        place in ``bufs``; where none has one yet, the next step makes them all (and ``bufs`` takes the
        views now). Returns False where only some tensors have one (the per-tensor step makes the rest)."""
        if self.momentum is None:
            return True
        if self.momentum_ready and all(b is v for b, v in zip(bufs, self.momentum_views, strict=True)):
            return True
        if all(b is None for b in bufs):
            self.momentum_ready = False
            bufs[:] = self.momentum_views
            return True
        if any(b is None for b in bufs):
            return False
        with torch.no_grad():
            for i, (b, view) in enumerate(zip(bufs, self.momentum_views, strict=True)):
                if b is not view:
                    view.copy_(b)
                    bufs[i] = view
        self.momentum_ready = True
        return True


def copy_grads(layouts: list[FlatBuffers], grads: list[list[Tensor]]) -> None:
    """Every layout's gradients (``grads[k]`` in ``layouts[k].params``' order) into its flat gradient: one
    ``cat`` per layout with a class of 1-D tensors, and one foreach copy for all the rest (never written)."""
    views: list[Tensor] = []
    rest: list[Tensor] = []
    for flat, gs in zip(layouts, grads, strict=True):
        if flat.cat_idx:
            torch.cat([gs[x] if isinstance(x, int) else x for x in flat.cat_parts], out=flat.cat_span)
        views += [flat.grad_views[i] for i in flat.copy_idx]
        rest += [gs[i] for i in flat.copy_idx]
    if views:
        torch._foreach_copy_(views, rest)


def flat_sgd(flat: FlatBuffers, *, lr: float | Tensor, momentum: float, dampening: float, nesterov: bool,
             weight_decay: float, maximize: bool) -> None:
    """torch's SGD (``torch.optim.sgd.sgd``) on a plain group's flat buffers, the gradients copied in already:
    its update is elementwise, so one tensor gives the bits of the per-tensor step at a few ops."""
    bufs: list[Tensor | None] = [flat.momentum if flat.momentum_ready else None] if momentum != 0 else []
    _torch_sgd([flat.weight], [flat.grad], bufs, weight_decay=weight_decay, momentum=momentum, lr=lr,
               dampening=dampening, nesterov=nesterov, maximize=maximize, has_sparse_grad=False, foreach=True,
               fused=False, grad_scale=None, found_inf=None)
    if momentum != 0 and not flat.momentum_ready:  # torch's first buffer (the gradient's clone) into the flat one
        flat.momentum.copy_(bufs[0])
        flat.momentum_ready = True


def flat_psi_sgd(
    flat: FlatBuffers,
    grads: list[Tensor] | None,
    *,
    lr: float | Tensor,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    maximize: bool,
    max_norm: float | None,
) -> None:
    """PSI-SGD(M) on flat buffers: :func:`~psi.core.functional.psi_sgd`'s update, as many ops whatever the
    number of tensors (about 12 plus two per fan-in class). ``grads`` in ``flat.params``' order are copied
    into the flat gradient (:func:`copy_grads`), never written; None: the caller copied them. With
    momentum, ``flat.momentum`` holds the buffers (filled here on the first step)."""
    if grads is not None:
        copy_grads([flat], [grads])
    if weight_decay != 0:  # as the per-tensor path: g + alpha w, the sign flipped to maximize
        flat.grad.add_(flat.weight, alpha=-weight_decay if maximize else weight_decay)
    # per-neuron norms: one reduce per class over its [rows, fan_in] view; a row of one element is
    # its absolute value, as the per-tensor path takes it for 1-D tensors (the same bits)
    for w, f, out in zip(flat.weight_classes, flat.fan_ins, flat.norm_classes, strict=True):
        if f == 1:
            torch.abs(w, out=out)
        else:
            torch.linalg.vector_norm(w, dim=1, keepdim=True, out=out)
    if flat.partner is None:
        flat_sq = flat.norms.square()
    else:  # a weight's rows and its bias's share their neurons: each adds the other's squared norm
        padded = flat.norms.square()
        flat_sq = padded[:flat.rows] + padded.index_select(0, flat.partner)
    coefficients(flat_sq, lr=lr, maximize=maximize, max_norm=max_norm, momentum=momentum, one=flat.one,
                 out=flat.factors)
    cols = flat.factor_classes
    caps = cols[1] if max_norm is not None else None
    mucaps = cols[2] if max_norm is not None and momentum != 0 else None
    us: list[Tensor | None] = []
    if momentum != 0:
        us = list(flat.momentum_classes) if flat.momentum_ready else [None] * len(flat.fan_ins)
    _multi_tensor_psi_sgd(flat.weight_classes, flat.grad_classes, us, list(cols[0]), caps, mucaps,
                          momentum=momentum, dampening=dampening, nesterov=nesterov, contiguous=True)
    if momentum != 0 and not flat.momentum_ready:  # the first step's buffers, made above, into the flat one
        torch._foreach_copy_(flat.momentum_classes, us)
        flat.momentum_ready = True


def neuron_labels(params: list[Tensor], sizes: tuple[int, ...]) -> list[int]:
    """The neuron-set label of each tensor of groups of ``sizes`` tensors (``params`` in order): a bias
    (:func:`~psi.core.functional.is_bias_of`) shares its weight's label, every other tensor has its own,
    as :class:`~psi.PSISGD` labels them; a bias never pairs across groups."""
    labels: list[int] = []
    start = 0
    for n in sizes:
        last = None
        for p in params[start:start + n]:
            labels.append((labels[-1] if labels else -1) + (not is_bias_of(p, last)))
            last = p
        start += n
    return labels


def lay_out(layouts: dict[int, FlatBuffers], params: list[Tensor], sizes: tuple[int, ...], momentum: bool) -> int:
    """The key in ``layouts`` (the id of the first tensor) of the flat buffers of one bucket's ``params``
    (groups of ``sizes`` tensors), laid out anew where missing or where a parameter moved out of them; -1
    where these tensors cannot share flat buffers (the reason said once in a warning)."""
    key = id(params[0])
    flat = layouts.get(key)
    if flat is not None and flat.intact(params, sizes):
        return key
    reason = why_not_flat(params)
    if reason is not None:
        warn_reference_once(reason)
        return -1
    ids = {id(p) for p in params}
    for k in [k for k, f in layouts.items() if any(id(p) in ids for p in f.params)]:
        del layouts[k]  # a layout that loses tensors to this one (groups regrouped by new settings)
    layouts[key] = FlatBuffers(params, neuron_labels(params, sizes), momentum)
    layouts[key].sizes = sizes
    return key


def adopt_state(flat: FlatBuffers, state: dict) -> bool:
    """Make the optimizer ``state``'s momentum buffers of ``flat.params`` views of the flat momentum
    (:meth:`FlatBuffers.adopt`); False where only some tensors have one."""
    if flat.momentum is None:
        return True
    bufs = [state[p].get("momentum_buffer") if p in state else None for p in flat.params]
    if not flat.adopt(bufs):
        return False
    for p, b in zip(flat.params, bufs, strict=True):
        state[p]["momentum_buffer"] = b
    return True
