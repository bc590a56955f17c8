"""The numerical test behind :func:`psi.discover`: a layer's neurons are scale-invariant when rescaling
them leaves the float64 output unchanged; layers are tested in groups (bisected when a group fails) after
a gradient screen, so a ResNet needs a few dozen forwards, not one per layer."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from psi.core.manifold import random_scales, rescale

# Every parameter of the probe is moved by noise * (_NOISE_REL * mean |p| + _NOISE_ABS): relative, to
# keep each tensor's scale; absolute, so that a zero-initialised weight or a BN scale of 0 cannot hide
# a dependence (a layer before a zero BN scale would pass for invariant whatever it is).
_NOISE_REL, _NOISE_ABS = 0.1, 1e-3
# The outputs must not move by more than this, relative to their largest entry, when a layer's neurons
# are rescaled: float64 rounding through a network stays far below it, a real dependence far above.
_RTOL = 1e-8


# Normalizations' eps on the probe: eps breaks the symmetry at tiny scales (var + eps is not scale-free);
# we test the structure, not that rounding. Positive, so that a constant channel still divides by > 0.
_NORM_EPS = 1e-30


_NOISE_SLICE = 1 << 20  # the noise is drawn this many entries at a time


# Per-neuron factors, log-uniform over this range: wide, so that a clipping nonlinearity (ReLU6,
# hardtanh) or a shrinkage cannot pass for a positively homogeneous one on a narrow range of scales.
_SCALES = (1e-6, 1e6)


# The factors' generator is seeded with the probe's seed plus this: a stream of their own, not the
# one that drew the noise (seed) nor the forward pass's dropout masks (torch.manual_seed(seed)).
_SCALES_SEED_OFFSET = 1


# The gradient screen: a per-neuron derivative along the scaling above this, relative to the largest
# |dL/dw_i| |w_i| of all the candidates' neurons, shows a dependence; float64 rounding leaves ~1e-12 at
# most. Relative to the largest, not to the neuron's own: a neuron whose gradient is itself rounding (a
# BatchNorm over 2 samples outputs +-1 whatever comes in, so nothing before it gets a gradient) has a
# "cosine" of noise over noise, which proves nothing; the numerical test decides it.
_SCREEN_TOL = 1e-6


# ... and when even the largest is rounding next to the loss's own scale (sum of |output| |random
# weights|), no gradient says anything: the screen rejects nothing.
_SCREEN_FLOOR = 1e-10


_SCREEN_SEED_OFFSET = 2  # the screen's random loss: a stream of its own


# The screen's backward keeps its batch's activations: it runs on the first _SCREEN_SAMPLES samples of a
# tensor input (2: BatchNorm's least). A rejection on any batch is sound (an invariant layer is invariant
# on every batch); a model that refuses the smaller batch is screened on the whole one.
_SCREEN_SAMPLES = 2


_TINY = 1e-30  # added to the reference's scale so that an output that is 0 everywhere must stay exactly 0


@dataclass(frozen=True)
class Layer:
    """A scale-invariant layer: its name in ``model.named_modules()`` and whether its bias must scale
    with the weight (it joins the weight's group then)."""

    name: str
    with_bias: bool


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


def _is_norm(m: nn.Module) -> bool:
    return isinstance(getattr(m, "eps", None), float) and (isinstance(m, _NORM_TYPES) or "Norm" in type(m).__name__)


def _float64_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every floating parameter and buffer in float64, made without an intermediate
    copy in the model's own dtype (``deepcopy(model).double()`` holds both at its peak): ``deepcopy``'s
    memo is filled with the float64 tensors first. Tied tensors stay tied (one memo entry per tensor)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo or not t.is_floating_point() or isinstance(t, nn.parameter.UninitializedTensorMixin):
            continue
        d = t.detach().to(torch.float64, copy=True)  # copy=True: a float64 model must not share its storage
        memo[id(t)] = nn.Parameter(d, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else d
    return copy.deepcopy(model, memo)


class _Probe:
    """A float64, perturbed copy of the model, in the mode it will train in, with a seeded forward pass."""

    def __init__(self, model: nn.Module, example_input: Any, seed: int, legacy_copy: bool = False) -> None:
        """``legacy_copy``: copy and perturb as before group testing (``strategy="per-layer"``)."""
        self.model = copy.deepcopy(model).double() if legacy_copy else _float64_copy(model)
        if not model.training:  # the user calls model.train() before training; an overridden train() is honoured
            self.model.train()
        self.seed = seed
        self.forwards = 0
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for p in self.model.parameters():
                scale = _NOISE_REL * p.abs().mean() + _NOISE_ABS
                if legacy_copy:  # as before: two temporaries of p's size
                    p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype).to(p.device) * scale)
                    continue
                # in slices: the temporaries stay small next to a 100M-entry classifier weight; drawn in
                # float32, 8x faster than float64 on a CPU thread (the noise needs no more digits)
                for part in p.view(-1).split(_NOISE_SLICE) if p.is_contiguous() else [p]:
                    part.add_(torch.randn(part.shape, generator=gen, dtype=torch.float32).to(p.device), alpha=float(scale))
        for m in self.model.modules():
            if _is_norm(m):
                m.eps = _NORM_EPS
        self.inputs = _map_floats(example_input, lambda t: t.detach().double())
        self.devices = sorted({p.device.index or 0 for p in self.model.parameters() if p.device.type == "cuda"})
        called: set[nn.Module] = set()
        hooks = [m.register_forward_hook(lambda m, i, o: called.add(m)) for m in self.model.modules()
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
        self.candidates = [(name, m) for name, m in self.model.named_modules()
                           if isinstance(m, CANDIDATE_TYPES) and m in called]

    def forward(self, grad: bool = False, inputs: Any = None) -> list[Tensor]:
        self.forwards += 1
        inputs = self.inputs if inputs is None else inputs
        # the same dropout masks every time, the user's RNG untouched
        with torch.random.fork_rng(devices=self.devices), torch.set_grad_enabled(grad):
            torch.manual_seed(self.seed)
            if isinstance(inputs, (tuple, list)):
                out = self.model(*inputs)
            elif isinstance(inputs, dict):
                out = self.model(**inputs)
            else:
                out = self.model(inputs)
        return list(_flat_outputs(out))

    def unchanged(self) -> bool:
        out = self.forward()
        return all(
            torch.isfinite(o).all() and (o - r).abs().max() <= _RTOL * (r.abs().max() + _TINY)
            for o, r in zip(out, self.reference, strict=True)
        )

    @torch.no_grad()
    def invariant_under(self, layer: nn.Module, with_bias: bool) -> bool:
        """Rescale the layer's neurons (and bias) by random positive factors: does the output stay?
        (``strategy="per-layer"``: a clone of the tensors restores them.)"""
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

    @torch.no_grad()
    def group_unchanged(self, layers: Sequence[nn.Module], factors: dict[nn.Module, Tensor], with_bias: bool) -> bool:
        """Rescale every layer of ``layers`` by its own factors at once, in place: does the output stay?"""
        scaled = [(t, factors[m].to(t).reshape((-1,) + (1,) * (t.dim() - 1)))
                  for m in layers for t in [m.weight] + ([m.bias] if with_bias else [])]
        for t, a in scaled:
            t.mul_(a)
        try:
            return self.unchanged()
        finally:
            for t, a in scaled:
                t.div_(a)

    def radial_screen(self, layers: Sequence[nn.Module]) -> tuple[set[nn.Module], set[nn.Module]]:
        """The layers that fail the weight-only test and those that fail the weight-and-bias test, shown by
        one forward and backward pass: an invariant layer's output has zero derivative along the scaling
        of any one neuron, ``<dL/dw_i, w_i> (+ dL/db_i b_i)``, for every loss ``L`` (here a random linear
        function of the outputs). A derivative above rounding (``_SCREEN_TOL``, relative to
        ``|dL/dw_i| |w_i|``) proves a dependence; the rest is tested numerically as before. Only the
        candidates' tensors take gradients, each reduced to per-neuron numbers and dropped as soon as it is
        accumulated, so no gradient copy of the model is held. A model whose backward fails screens nothing."""
        radial: dict[int, tuple[Tensor, Tensor]] = {}

        def reduce(p: Tensor) -> None:
            g, w = p.grad.flatten(1) if p.dim() > 1 else p.grad[:, None], p.flatten(1) if p.dim() > 1 else p[:, None]
            radial[id(p)] = (torch.bmm(g[:, None], w[:, :, None]).flatten(), g.norm(dim=1) * w.norm(dim=1))
            p.grad = None

        tensors = {id(t): t for m in layers for t in (m.weight, m.bias) if t is not None}
        flags = [(p, p.requires_grad) for p in self.model.parameters()]
        hooks = []
        x = self.inputs
        batches = [x[:_SCREEN_SAMPLES], x] if isinstance(x, Tensor) and x.dim() and len(x) > _SCREEN_SAMPLES else [x]
        try:
            for p, _ in flags:
                p.requires_grad_(id(p) in tensors)
            hooks = [t.register_post_accumulate_grad_hook(reduce) for t in tensors.values()]
            for k, batch in enumerate(batches):
                gen = torch.Generator().manual_seed(self.seed + _SCREEN_SEED_OFFSET)
                try:
                    outs = [o for o in self.forward(grad=True, inputs=batch) if o.requires_grad]
                    weights = [torch.randn(o.shape, generator=gen, dtype=o.dtype).to(o.device) for o in outs]
                    loss_scale = float(sum(o.detach().norm() * r.norm() for o, r in zip(outs, weights, strict=True)))
                    if outs:
                        sum((o * r).sum() for o, r in zip(outs, weights, strict=True)).backward()
                    break
                except Exception:
                    radial.clear()
                    if k == len(batches) - 1:
                        raise
        except RuntimeError:  # a backward the model does not support: no screening
            radial.clear()
        finally:
            for h in hooks:
                h.remove()
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
        fails_alone, fails_with_bias = set(), set()
        largest = max((float(scale.max()) for _, scale in radial.values() if scale.numel()), default=0.0)
        if not radial or largest <= _SCREEN_FLOOR * loss_scale:
            return fails_alone, fails_with_bias
        for m in layers:
            if id(m.weight) not in radial:
                continue
            d, _ = radial[id(m.weight)]
            if (d.abs() > _SCREEN_TOL * largest).any():
                fails_alone.add(m)
            if m.bias is not None and id(m.bias) in radial:
                db, _ = radial[id(m.bias)]
                if ((d + db).abs() > _SCREEN_TOL * largest).any():
                    fails_with_bias.add(m)
        return fails_alone, fails_with_bias


def _passing(test: Callable[[list], bool], items: list, failed: bool = False, dense: bool = False) -> list:
    """The members of ``items`` for which ``test([member])`` holds, testing groups (``failed``: the
    whole group is known to fail). A failed group is halved; when both halves fail twice in a row
    (``dense``: so did the parent's), failures are dense and the members are tested one by one, so
    that n failures cost at most n + 7 tests rather than bisection's 2n."""
    if not items or (not failed and test(items)):
        return items
    if len(items) == 1:
        return []
    left, right = items[: len(items) // 2], items[len(items) // 2:]
    if test(left):
        return left + _passing(test, right, failed=True)
    if test(right):
        return _passing(test, left, failed=True) + right
    if dense:  # a lone half is known to fail
        return [i for half in (left, right) if len(half) > 1 for i in half if test([i])]
    return _passing(test, left, True, True) + _passing(test, right, True, True)


def find_layers(model: nn.Module, example_input: Any, seed: int, strategy: str, screen: bool = True
         ) -> tuple[list[Layer], int]:
    """:func:`discover` and the number of forward passes it ran (``screen=False``: no gradient screen)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    probe = _Probe(model, example_input, seed, legacy_copy=strategy == "per-layer")
    layers = [m for _, m in probe.candidates]
    found: dict[nn.Module, bool] = {}
    if strategy == "per-layer":
        for layer in layers:
            if probe.invariant_under(layer, with_bias=False):
                found[layer] = False
            elif layer.bias is not None and probe.invariant_under(layer, with_bias=True):
                found[layer] = True
    else:
        fails_alone, fails_with_bias = probe.radial_screen(layers) if screen else (set(), set())
        gen = torch.Generator().manual_seed(seed + _SCALES_SEED_OFFSET)
        factors = {m: random_scales(m.weight.shape[0], *_SCALES, generator=gen) for m in layers}
        tested = [m for m in layers if m not in fails_alone]
        found = dict.fromkeys(_passing(lambda g: probe.group_unchanged(g, factors, False), tested), False)
        biased = [m for m in layers if m not in found and m.bias is not None and m not in fails_with_bias]
        found.update(dict.fromkeys(_passing(lambda g: probe.group_unchanged(g, factors, True), biased), True))
    return [Layer(name, found[m]) for name, m in probe.candidates if m in found], probe.forwards


CANDIDATE_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


STRATEGIES = ("group", "per-layer")


_NORM_TYPES = (_NormBase, nn.GroupNorm, nn.LayerNorm) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
