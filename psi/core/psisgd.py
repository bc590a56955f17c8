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

import warnings
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _device_dtype_check_for_fused, _use_grad_for_differentiable
from torch.optim.sgd import sgd as _torch_sgd

from psi.core.flat import FlatBuffers, adopt_state, copy_grads, flat_psi_sgd, flat_sgd, lay_out
from psi.core.functional import is_bias_of, psi_sgd

__all__ = ["NoPsiGroupWarning", "PSISGD", "PSIGD", "MAX_NORM"]

# The overflow safeguard of section 6.2 (p. 1135): "we normalize the PSI weights w(i) if ||w(i)|| is
# larger than 10000 during training". The default of PSISGD, psi.engine.optimizers and psi.engine.config.Config.
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
            faster too, and torch's SGD gives the same bits on either path (tested). On a psi
            group ``foreach=False`` is the per-tensor for-loop (as ``fused=False``, one tensor at a time).
        fused: ``None`` (the default) takes the flat path (below): a fixed number of ops whatever the
            depth; ``False`` the per-tensor path, the reference it matches bit for bit; ``True`` on
            plain groups torch's fused SGD kernel, on psi groups the flat path.
        differentiable: torch's, honoured on plain groups; a psi group refuses it (its step is not
            written for autograd): set it off on that group.
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

    The flat path (``fused=None``, the default; psi groups also with ``fused=True``; plain groups of an
    optimizer with psi groups, the same bits as torch's per-tensor step): at its first step the tensors
    of a bucket are copied into flat buffers of one device and dtype, each on a 64-byte boundary, and
    each ``p.data`` becomes a view of its place (as DDP's ``gradient_as_bucket_view`` and FSDP's flat
    parameters do); the state's momentum buffers are views of the flat momentum, the state dict per
    tensor. ``p.grad`` is not a view: the step copies it in and never writes it. A host-side check of
    data pointers before each step finds parameters moved out (``model.to()``, ``.double()``,
    ``p.data = ...``) and lays the buffers out again (the momentum takes the new dtype). A step where
    a tensor of a bucket has no gradient, or tensors of several devices or dtypes, tensor subclasses
    (DTensor, FSDP's) or strides neither contiguous nor channels-last, takes the per-tensor path (the
    reason in a one-time warning). ``torch.save(p)`` saves its whole buffer, as with any view;
    ``model.load_state_dict(sd, assign=True)`` makes new parameters: build the optimizer after it.

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
        _warn_if_plain(self.param_groups)
        self._flat: dict[int, FlatBuffers] = {}  # the flat buffers of psi buckets, by the id of their first tensor
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
        self.__dict__.setdefault("_flat", {})  # not pickled (torch's __getstate__): laid out again at the next step
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
        super().load_state_dict(state_dict)  # the flat momentum takes the loaded buffers in at the next step

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As torch's, but a psi group without its own ``weight_decay`` gets 0 (see class doc), and
        a psi group refuses what its step cannot honour (complex tensors, ``differentiable``)."""
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
                    frozen_sets: list[int], label: int = -1) -> bool:
        """Append the group's tensors with a gradient to the lists of a :class:`_Gathered` (as torch's
        SGD does) and label their neurons after ``label``: a 1-D tensor right after a weight with as
        many neurons is its bias and shares its neurons, every other tensor has its own. A psi tensor
        without a gradient goes to ``frozen`` with its label. Returns whether a gradient is sparse. The
        lists come as separate, empty arguments, as in torch's optimizers (``torch.compile`` traces them)."""
        has_sparse_grad = False
        momentum = group["momentum"] != 0
        is_psi = group["psi"]
        fused_check = group["fused"] and not is_psi and getattr(self, "_need_device_dtype_check_for_fused", True)
        last = None
        for p in group["params"]:
            if is_psi:  # neuron sets matter to psi groups alone
                label += not is_bias_of(p, last)
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

    def _check_flat(self, indices: tuple[int, ...]) -> int:
        """The key of the flat buffers of the psi groups ``indices`` (one bucket) in ``self._flat``, laid
        out (again) where missing or a parameter moved; -1 where this step takes the per-tensor path (a
        tensor without a gradient or with a sparse one, the state without some momentum buffer, a layout
        flat buffers cannot hold). Host-side only, and cheap: it runs at every step."""
        groups = [self.param_groups[i]["params"] for i in indices]
        params = [p for ps in groups for p in ps]
        for p in params:
            g = p.grad
            if g is None or g.is_sparse:  # no step, but a part of its neurons' norms: the per-tensor path does both
                return -1
        key = lay_out(self._flat, params, tuple(map(len, groups)), self.param_groups[indices[0]]["momentum"] != 0)
        return key if key >= 0 and adopt_state(self._flat[key], self.state) else -1

    def _flat_layouts(self, buckets: dict[tuple, list[int]], plain: list[int]) -> dict[Any, int]:
        """The keys in ``self._flat`` of the psi buckets (by hyperparameters) and plain groups (by index) this
        step takes on flat buffers (class doc). A compiled step takes none: inductor fuses the per-tensor
        path, and fails on the flat views."""
        if torch.compiler.is_compiling():
            return {}
        out: dict[Any, int] = {}
        for key, indices in buckets.items():
            group = self.param_groups[indices[0]]
            if group["fused"] is not False and group["foreach"] is not False:
                k = self._check_flat(tuple(indices))
                if k >= 0:
                    out[key] = k
        for i in plain if buckets else ():
            group = self.param_groups[i]
            if group["fused"] is None and group["foreach"] is not False and not group["differentiable"]:
                k = self._check_flat((i,))
                if k >= 0:
                    out[i] = k
        return out

    @_use_grad_for_differentiable
    def step(self, closure=None):  # noqa: ANN001 - torch's signature
        """Perform one optimization step (``closure`` re-evaluates the loss, as in torch).

        Psi groups with the same hyperparameters are stepped together (a bucket: one group per layer is
        the usual layout): on flat buffers by default, in one multi-tensor call with ``fused=False``. A
        psi group's tensors share their neurons: the norm of neuron ``i`` is taken over row ``i`` of all
        of them (a weight and its bias: a 1-D tensor right after a weight with as many neurons).
        Gradients are off during the step unless ``differentiable`` (torch's rule).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        buckets: dict[tuple, list[int]] = {}
        plain: list[int] = []
        for i, group in enumerate(self.param_groups):
            if group["psi"]:  # gathered into the bucket of its hyperparameters
                _check_psi_group(group)
                buckets.setdefault(_psi_hyper(group), []).append(i)
            else:
                plain.append(i)
        flats = self._flat_layouts(buckets, plain)  # the buckets and plain groups this step takes on flat buffers
        if flats:
            with torch.no_grad():
                layouts = [self._flat[k] for k in flats.values()]
                copy_grads(layouts, [[p.grad for p in f.params] for f in layouts])
        for i in plain:
            group = self.param_groups[i]
            if i in flats:
                with torch.no_grad():
                    flat_sgd(self._flat[flats[i]], **{k: group[k] for k in _SGD_KEYS})
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
        for key, indices in buckets.items():
            hyper = dict(zip(_PSI_KEYS, key, strict=True))
            del hyper["fused"]
            if key in flats:
                del hyper["foreach"]
                with torch.no_grad():
                    flat_psi_sgd(self._flat[flats[key]], None, **hyper)
                continue
            bucket, label = _Gathered([], [], [], [], [], []), -1
            for i in indices:  # each group into fresh lists (compile runs _init_group eagerly only on empty ones)
                part = _Gathered([], [], [], [], [], [])
                self._init_group(self.param_groups[i], *part, label)
                label = max(part.neuron_sets + part.frozen_sets, default=label)
                for whole, xs in zip(bucket, part, strict=True):
                    whole.extend(xs)
            with torch.no_grad():  # psi groups are never differentiable, even where the optimizer's default is
                created = bucket.bufs and any(b is None for b in bucket.bufs)
                psi_sgd(bucket.params, bucket.grads, bucket.bufs, neuron_sets=bucket.neuron_sets,
                        frozen=bucket.frozen, frozen_sets=bucket.frozen_sets, **hyper)
            if created:
                self._store(bucket.params, bucket.bufs)
        return loss

    def _store(self, params: list[Tensor], bufs: list[Tensor | None]) -> None:
        for p, buf in zip(params, bufs):  # bufs is empty without momentum
            self.state[p]["momentum_buffer"] = buf


class NoPsiGroupWarning(UserWarning):
    """PSISGD was given no ``psi=True`` group: it is torch's SGD on every parameter."""


_warned_plain = False


def _warn_if_plain(groups: list[dict[str, Any]]) -> None:
    """Warn once per process when no group is psi: ``PSISGD(model.parameters())`` silently being SGD is the
    mistake this catches (the groups come from :func:`psi.param_groups`)."""
    global _warned_plain
    if _warned_plain or any(g["psi"] for g in groups):
        return
    _warned_plain = True
    n = sum(len(g["params"]) for g in groups)
    warnings.warn(f"PSISGD got {len(groups)} parameter group(s) of {n} tensor(s), none with psi=True: every "
                  f"parameter takes torch.optim.SGD's update. Build the groups with psi.param_groups(model, "
                  f"example_input) (or add psi groups with add_param_group); this warning is shown once.",
                  NoPsiGroupWarning, stacklevel=3)


def _check_psi_group(group: dict[str, Any]) -> None:
    """Refuse, naming the setting and the way out, what a psi group's step cannot honour."""
    if group["differentiable"]:
        raise RuntimeError("PSISGD: differentiable=True is not supported on a psi group (psi=True): its step is not "
                           "written for autograd through the update. Set differentiable=False on that group (e.g. "
                           "{'params': ..., 'psi': True, 'differentiable': False}); plain groups (psi=False) are "
                           "torch's SGD and honour it")
    if group["fused"] and group["foreach"]:
        raise RuntimeError("`fused` and `foreach` cannot be `True` together.")


_SGD_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize")
_PSI_KEYS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "maximize", "max_norm", "foreach", "fused")


def _psi_hyper(group: dict[str, Any]) -> tuple:
    """The hyperparameters that decide whether psi groups can be stepped together (a plain
    tuple: torch.compile traces it, where operator.itemgetter breaks the graph)."""
    return (group["lr"], group["momentum"], group["dampening"], group["nesterov"], group["weight_decay"],
            group["maximize"], group["max_norm"], group["foreach"], group["fused"])  # _PSI_KEYS' order


class PSIGD(PSISGD):
    """PSI-GD (eq. 9): :class:`PSISGD`'s update, named for full-batch gradients (Theorem 2's setting): the
    paper's PSI-GD and PSI-SGD differ only in the gradient they are given."""
