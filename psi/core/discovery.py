"""Exact discovery of positively scale-invariant layers, and optimizer groups from it.

A layer is *scale-invariant* when multiplying each of its neurons (output channels, axis 0 of its
weight) by its own positive factor leaves the network's training-mode output unchanged (section 3.1
of the paper, p. 1130; Definition 1, p. 1131): conv/linear followed by a normalization with
per-channel statistics (BatchNorm in train mode, InstanceNorm, GroupNorm with one channel per
group), possibly through positively homogeneous ops (ReLU, LeakyReLU, pooling, dropout, flatten,
zero-padding).

How it is decided: the module tree proposes every ``Linear``/``Conv1d/2d/3d`` that the forward pass
calls (their weight has the neuron axis first; ``ConvTranspose`` does not and is never proposed).
Each candidate is then *confirmed numerically* on a float64 copy of the model, every normalization's
eps set to 1e-30 (``_NORM_EPS``: eps breaks the symmetry at tiny scales; we test the structure, not
that rounding) and every parameter slightly perturbed (so that a zero-init weight or a BN scale of 0
cannot hide a dependence): the weight is multiplied by random per-neuron factors spread over
[1e-6, 1e6] (``_SCALES``: wide, so that a clipping nonlinearity such as ReLU6 or a shrinkage cannot
pass for a homogeneous one) and the outputs must not move (relative 1e-8, ``_RTOL``). When the weight
alone fails and the layer has a bias, weight and bias are rescaled together (needed when an op
between the layer and its norm does not remove a constant, e.g. a ReLU). What fails both is
rejected: a layer whose output also reaches the loss around its norm (a residual branch without BN,
the last conv of a pre-activation block), the classifier, and a layer followed only by LayerNorm or
by GroupNorm with several channels per group, which are invariant to one common factor per sample or
group, not to a separate factor per neuron.

The mode each layer is judged in is the one the model will train in. If ``model.training`` is True,
the copy keeps every submodule's own flag: a BatchNorm left in ``eval()`` while the rest trains
(frozen BN, the usual fine-tuning setup) normalizes with its running statistics, an affine map, so
the layer before it is not invariant. If the whole model is in eval mode, the copy gets ``.train()``
(an overridden ``train()`` that keeps BN frozen is honoured), as the user calls it before training.
A BatchNorm with ``track_running_stats=False`` uses batch statistics in either mode, and so does
InstanceNorm by default (its ``track_running_stats`` is False; with True, in eval mode, it uses
running statistics like BatchNorm): the numerical test sees all that without special cases.

Which modules count as normalizations (their eps lowered): every module with a float ``eps`` that is
an instance of torch's BatchNorm/InstanceNorm (``_NormBase``), ``GroupNorm``, ``LayerNorm``,
``RMSNorm``, or whose class name contains ``Norm`` (timm's and torchvision's norms, which subclass
torch's or are named so).

Cost (:func:`discover`'s default ``strategy="group"``), a few forward passes for the whole model:
1. a gradient screen (one forward and backward, :meth:`_Probe.radial_screen`): a layer whose output
   has a nonzero derivative along the scaling of a neuron is certainly not invariant; this rejects the
   classifier, a ViT's or ConvNeXt's every Linear, without a test of their own;
2. group testing on the rest, each layer with its own random factors: all are rescaled at once; if the
   output stays, all pass; else the group is split into halves in module order and the halves are
   tested, and when both halves of a failed group fail twice in a row (failures are dense) its members
   are tested one by one. A pass costs one forward, one failure about 2 log2(n), n failures at most n + 7;
3. the same, weight and bias together, on the layers with a bias that failed and that the screen did
   not reject with their bias.
A group can pass while one of its members alone would fail only through an exact cancellation between
independent random factors of different layers: probability zero. The rescaling is done in place on
the probe's weights and undone by dividing by the same factors (no copies; the rounding it leaves is
~1e-16, far below ``_RTOL``), rather than on the layer's output by a hook, so that a weight read
outside its module's forward (tied weights) is rescaled wherever it is read. Memory: one float64
copy of the model (:func:`_float64_copy`) plus the activations of one backward pass on the first
two samples of ``example_input`` (``_SCREEN_SAMPLES``; the whole input when it is not one tensor,
or when the model refuses two), the group tests' forward passes keeping no activations, and,
transiently, one tensor of the size of the largest candidate weight (its gradient): for ResNet-50 on
16 images at 224x224, 980 MiB above the start, where a screen on all 16 took 3074.
``strategy="per-layer"`` is the algorithm before group testing (one forward per candidate and one
more per rejected layer with a bias, on a ``deepcopy(model).double()`` copy): kept as the reference
that the tests and ``python -m psi.bench discovery`` compare with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from torch import nn

from psi.core.probe import CANDIDATE_TYPES, Layer, _is_norm, find_layers

__all__ = ["find_scale_invariant", "param_groups", "discover", "NoScaleInvariantLayer"]


def discover(model: nn.Module, example_input: Any, *, seed: int = 0, strategy: str = "group") -> list[Layer]:
    """Every scale-invariant layer, in module order, with whether its bias scales with its weight.
    ``example_input`` is one batch (2 or more samples: BN needs them) in the form ``model`` takes: a
    tensor, a tuple of positional arguments or a dict of keyword ones. The model itself is not
    changed (the check runs on a copy). Pass the result to :func:`param_groups` (``found=``) to
    build groups without a second discovery. ``strategy``: module docstring."""
    return find_layers(model, example_input, seed, strategy)[0]


def find_scale_invariant(model: nn.Module, example_input: Any, *, seed: int = 0) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers whose neurons are positively
    scale-invariant (:func:`discover`, which also says which biases scale)."""
    return [layer.name for layer in discover(model, example_input, seed=seed)]


def param_groups(model: nn.Module, example_input: Any = None, *, found: Sequence[Layer] | None = None, seed: int = 0,
                 **hyper: Any) -> list[dict[str, Any]]:
    """Optimizer groups: one ``{'params': [weight] or [weight, bias], 'psi': True, 'name': ...}``
    per scale-invariant layer that is not frozen (the bias is in it only when it must scale with the
    weight), then ``{'params': <every other parameter>, 'psi': False}``. The layers are ``found``
    (from :func:`discover`) when given, else discovered on ``example_input``. ``hyper`` (``lr=...``) is
    copied into every group, except ``weight_decay``: it goes to the plain group only, as
    ``PSISGD(weight_decay=...)`` means it (L2 on a psi group makes the loss depend on the neurons'
    scales, and Theorem 1 no longer holds; to want it anyway, set the psi group's own ``weight_decay``).
    Finding no scale-invariant layer warns (:class:`NoScaleInvariantLayer`), naming what was looked at:
    the groups are then one plain group, and PSISGD is torch's SGD."""
    if found is None:
        if example_input is None:
            raise TypeError("param_groups needs example_input (a batch to discover the layers on) or found=")
        found = discover(model, example_input, seed=seed)
    if not found:
        _warn_none_found(model)
    psi_hyper = {k: v for k, v in hyper.items() if k != "weight_decay"}
    modules = dict(model.named_modules())
    groups, taken = [], set()
    for layer in found:
        m = modules[layer.name]
        if not m.weight.requires_grad:  # frozen: nothing to optimize
            continue
        params = [m.weight] + ([m.bias] if layer.with_bias else [])
        groups.append({"params": params, "psi": True, "name": layer.name, **psi_hyper})
        taken.update(id(p) for p in params)
    rest, seen = [], set()
    for p in model.parameters():
        if id(p) not in taken and id(p) not in seen and p.requires_grad:
            rest.append(p)
            seen.add(id(p))
    groups.append({"params": rest, "psi": False, **hyper})
    return groups


class NoScaleInvariantLayer(UserWarning):
    """:func:`param_groups` found no scale-invariant layer: every parameter is in the plain group."""


def _warn_none_found(model: nn.Module) -> None:
    layers = [n for n, m in model.named_modules() if isinstance(m, CANDIDATE_TYPES)]
    norms = sorted({type(m).__name__ for m in model.modules() if _is_norm(m)})
    warnings.warn(f"param_groups found no scale-invariant layer in {type(model).__name__}: of its {len(layers)} "
                  f"Linear/Conv layer(s), none is followed by a normalization that makes its neurons' scale "
                  f"irrelevant (normalizations in the model: {', '.join(norms) or 'none'}). Every parameter is in "
                  f"the plain group, so PSISGD on these groups is torch.optim.SGD.", NoScaleInvariantLayer,
                  stacklevel=3)
