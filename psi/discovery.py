"""Exact discovery of positively scale-invariant layers, and optimizer groups from it.

A layer is *scale-invariant* when multiplying each of its neurons (output channels, axis 0 of its
weight) by its own positive factor leaves the network's training-mode output unchanged (section 3.1
of the paper, p. 1130; Definition 1, p. 1131): conv/linear followed by BatchNorm, possibly through
positively homogeneous ops (ReLU, LeakyReLU, pooling, dropout, flatten, zero-padding).

How it is decided: the module tree proposes every ``Linear``/``Conv1d/2d/3d`` that the forward pass
calls (their weight has the neuron axis first; ``ConvTranspose`` does not and is never proposed).
Each candidate is then *confirmed numerically* on a float64 copy of the model in train mode, with
BatchNorm's eps set to 1e-30 (``_BN_EPS``: eps breaks the symmetry at tiny scales; we test the
structure, not that rounding) and every parameter slightly perturbed (so that a zero-init weight or
a BN scale of 0 cannot hide a dependence): the weight is multiplied by random per-neuron factors
spread over [1e-6, 1e6] (``_SCALES``: wide, so that a clipping nonlinearity such as ReLU6 or a
shrinkage cannot pass for a homogeneous one) and the outputs must not move (relative 1e-8,
``_RTOL``). When the weight alone fails and the layer has a bias, weight and bias are rescaled
together (needed when an op between the layer and its BN does not remove a constant, e.g. a ReLU).
What fails both is rejected: a layer whose output also reaches the loss around its BN (a residual
branch without BN, the last conv of a pre-activation block), the classifier, and a layer followed
only by LayerNorm or GroupNorm, which are invariant to one common factor per sample or group, not to
a separate factor per neuron.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .manifold import random_scales, rescale

__all__ = ["find_scale_invariant", "param_groups", "CANDIDATE_TYPES"]

CANDIDATE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# The outputs must not move by more than this, relative to their largest entry, when a layer's neurons
# are rescaled: float64 rounding through a network stays far below it, a real dependence far above.
_RTOL = 1e-8
# BatchNorm's eps on the probe: eps breaks the symmetry at tiny scales (var + eps is not scale-free);
# we test the structure, not that rounding. Positive, so that a constant channel still divides by > 0.
_BN_EPS = 1e-30
# Every parameter of the probe is moved by noise * (_NOISE_REL * mean |p| + _NOISE_ABS): relative, to
# keep each tensor's scale; absolute, so that a zero-initialised weight or a BN scale of 0 cannot hide
# a dependence (a layer before a zero BN scale would pass for invariant whatever it is).
_NOISE_REL, _NOISE_ABS = 0.1, 1e-3
# Per-neuron factors, log-uniform over this range: wide, so that a clipping nonlinearity (ReLU6,
# hardtanh) or a shrinkage cannot pass for a positively homogeneous one on a narrow range of scales.
_SCALES = (1e-6, 1e6)
# The factors' generator is seeded with the probe's seed plus this: a stream of their own, not the
# one that drew the noise (seed) nor the forward pass's dropout masks (torch.manual_seed(seed)).
_SCALES_SEED_OFFSET = 1
_TINY = 1e-30  # added to the reference's scale so that an output that is 0 everywhere must stay exactly 0


def _map_floats(x: Any, fn) -> Any:
    if isinstance(x, Tensor):
        return fn(x) if x.is_floating_point() else x
    if isinstance(x, (list, tuple)):
        return type(x)(_map_floats(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map_floats(v, fn) for k, v in x.items()}
    return x


def _flat_outputs(x: Any) -> Iterator[Tensor]:
    if isinstance(x, Tensor):
        if x.is_floating_point():
            yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _flat_outputs(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _flat_outputs(v)
    elif hasattr(x, "__dict__"):  # dataclass-like model outputs
        for v in vars(x).values():
            yield from _flat_outputs(v)


class _Probe:
    """A float64, train-mode, perturbed copy of the model with a seeded forward pass."""

    def __init__(self, model: nn.Module, example_input: Any, seed: int) -> None:
        self.model = copy.deepcopy(model).double().train()
        self.seed = seed
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                noise = torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device)
                p.add_(noise * (_NOISE_REL * p.abs().mean() + _NOISE_ABS))
        for m in self.model.modules():
            if isinstance(m, _BatchNorm):
                m.eps = _BN_EPS
        self.inputs = _map_floats(example_input, lambda t: t.detach().double())
        self.devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        self.called: set[nn.Module] = set()
        hooks = [m.register_forward_hook(lambda m, i, o: self.called.add(m)) for m in self.model.modules()
                 if isinstance(m, CANDIDATE_TYPES)]
        try:
            self.reference = self.forward()
        except Exception as e:
            raise RuntimeError(f"scale-invariance discovery runs a float64 copy of the model in train mode on "
                               f"example_input and that forward pass failed ({type(e).__name__}: {e}). Pass one "
                               f"batch the model accepts, with 2 or more samples (BatchNorm needs them).") from e
        finally:
            for h in hooks:
                h.remove()

    @torch.no_grad()
    def forward(self) -> list[Tensor]:
        with torch.random.fork_rng(devices=self.devices):  # the same dropout masks, the user's RNG untouched
            torch.manual_seed(self.seed)
            if isinstance(self.inputs, (tuple, list)):
                out = self.model(*self.inputs)
            elif isinstance(self.inputs, dict):
                out = self.model(**self.inputs)
            else:
                out = self.model(self.inputs)
        return list(_flat_outputs(out))

    def unchanged(self) -> bool:
        out = self.forward()
        return all(
            torch.isfinite(o).all() and (o - r).abs().max() <= _RTOL * (r.abs().max() + _TINY)
            for o, r in zip(out, self.reference, strict=True)
        )

    @torch.no_grad()
    def invariant_under(self, layer: nn.Module, with_bias: bool) -> bool:
        """Rescale the layer's neurons (and bias) by random positive factors: does the output stay?"""
        tensors = [layer.weight] + ([layer.bias] if with_bias else [])
        saved = [t.clone() for t in tensors]
        gen = torch.Generator().manual_seed(self.seed + _SCALES_SEED_OFFSET)
        a = random_scales(layer.weight.shape[0], *_SCALES, generator=gen).to(layer.weight.device)
        for t in tensors:
            t.copy_(rescale(t, a))
        try:
            return self.unchanged()
        finally:
            for t, s in zip(tensors, saved, strict=True):
                t.copy_(s)


def _discover(model: nn.Module, example_input: Any, seed: int = 0) -> list[tuple[str, bool]]:
    """(name, bias scales with the weight) for every scale-invariant layer, in module order."""
    probe = _Probe(model, example_input, seed)
    found = []
    for name, layer in probe.model.named_modules():
        if not isinstance(layer, CANDIDATE_TYPES) or layer not in probe.called:
            continue
        if probe.invariant_under(layer, with_bias=False):
            found.append((name, False))
        elif layer.bias is not None and probe.invariant_under(layer, with_bias=True):
            found.append((name, True))
    return found


def find_scale_invariant(model: nn.Module, example_input: Any, *, seed: int = 0) -> list[str]:
    """Names (as in ``model.named_modules()``) of the layers whose neurons are positively
    scale-invariant. ``example_input`` is one batch (2 or more samples: BN needs them) in the
    form ``model`` takes: a tensor, a tuple of positional arguments or a dict of keyword ones.
    The model itself is not changed (the check runs on a copy)."""
    return [name for name, _ in _discover(model, example_input, seed)]


def param_groups(model: nn.Module, example_input: Any, *, seed: int = 0, **hyper: Any) -> list[dict[str, Any]]:
    """Optimizer groups: one ``{'params': [weight] or [weight, bias], 'psi': True, 'name': ...}``
    per scale-invariant layer (the bias is in it only when it must scale with the weight),
    then ``{'params': <every other parameter>, 'psi': False}``. ``hyper`` (``lr=...``,
    ``weight_decay=...``) is copied into every group."""
    modules = dict(model.named_modules())
    groups, taken = [], set()
    for name, with_bias in _discover(model, example_input, seed):
        layer = modules[name]
        if not layer.weight.requires_grad:  # frozen: nothing to optimize
            continue
        params = [layer.weight] + ([layer.bias] if with_bias else [])
        groups.append({"params": params, "psi": True, "name": name, **hyper})
        taken.update(id(p) for p in params)
    rest, seen = [], set()
    for p in model.parameters():
        if id(p) not in taken and id(p) not in seen and p.requires_grad:
            rest.append(p)
            seen.add(id(p))
    groups.append({"params": rest, "psi": False, **hyper})
    return groups
