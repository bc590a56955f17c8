"""Operations on the PSI manifold: weights up to positive per-neuron rescaling.

A point is a weight tensor ``W`` whose axis 0 indexes neurons (output channels); neuron ``i``
is ``W[i]`` flattened. The class ``[W]`` collects every ``T_a(W) = (a_i W[i])_i`` with
``a > 0`` (Definition 1 of Yi, UAI 2022). Tangent vectors ``X`` have the shape of ``W``.
Everything is batched over neurons (one reduction per tensor, no Python loop over neurons)
and works for any floating dtype and device.

Every function also takes a list of tensors (a network is a product manifold): it is
applied tensor by tensor, and ``inner``/``dist`` combine the factors (a sum, a root of the
sum of squares).

This module is the reference for eq. 6-8: :class:`psi.PSISGD`'s fused step and :mod:`psi.engine.sgdg`
write the same operations in their own arithmetic (the bits their recorded runs hold) and are
tested against these functions to rounding.

Names follow geoopt/pymanopt: ``proju`` projects onto the horizontal space, ``egrad2rgrad``
turns a Euclidean gradient into the Riemannian one, ``retr`` is the paper's retraction and
``expmap`` the exact exponential map of metric (6) (Proposition 2, p. 1131; the paper gives
none: Remark 2, p. 1132).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

__all__ = ["sqnorms", "canonical", "rescale", "inner", "norm", "proju", "egrad2rgrad", "retr", "expmap",
           "dist", "random_scales", "Point"]

Point = Tensor | Sequence[Tensor]


def _rows(W: Tensor) -> Tensor:
    """``W`` as (neurons, fan-in), a view when ``W`` is contiguous."""
    return W.reshape(W.shape[0], -1)


def _per_neuron(v: Tensor, W: Tensor) -> Tensor:
    """A (neurons,) vector shaped to broadcast against ``W``."""
    return v.reshape((-1,) + (1,) * (W.dim() - 1))


def _lift(fn: Callable[..., Tensor]) -> Callable[..., Tensor | list[Tensor]]:
    """Apply a one-tensor operation factor by factor when given lists (product manifold)."""

    def lifted(W, *args):
        if isinstance(W, Tensor):
            return fn(W, *args)
        return [fn(*xs) for xs in zip(W, *args, strict=True)]

    lifted.__name__, lifted.__doc__ = fn.__name__, fn.__doc__
    return lifted


def _lift_sum(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """Sum a one-tensor scalar over the factors of a product manifold."""

    def lifted(W, *args):
        if isinstance(W, Tensor):
            return fn(W, *args)
        return torch.stack([fn(*xs) for xs in zip(W, *args, strict=True)]).sum()

    lifted.__name__, lifted.__doc__ = fn.__name__, fn.__doc__
    return lifted


@_lift
def sqnorms(W: Tensor) -> Tensor:
    """Squared norm ``||w(i)||^2`` of every neuron, shape (neurons,)."""
    r = _rows(W)
    return torch.linalg.vecdot(r, r)


@_lift
def canonical(W: Tensor) -> Tensor:
    """The representative of ``[W]`` with every neuron of unit norm."""
    return W / _per_neuron(sqnorms(W).sqrt(), W)


@_lift
def rescale(W: Tensor, a: Tensor) -> Tensor:
    """``T_a(W)``: neuron ``i`` multiplied by ``a[i] > 0`` (the symmetry of section 3.1, p. 1130)."""
    return W * _per_neuron(a.to(W), W)


@_lift_sum
def inner(W: Tensor, X: Tensor, Y: Tensor) -> Tensor:
    """Metric (6): ``sum_i <x(i), y(i)> / ||w(i)||^2``; the same for every representative
    when ``X``, ``Y`` are moved with it (``T_a X``)."""
    return (torch.linalg.vecdot(_rows(X), _rows(Y)) / sqnorms(W)).sum()


def norm(W: Point, X: Point) -> Tensor:
    """Length of the tangent vector ``X`` under metric (6)."""
    return inner(W, X, X).sqrt()


@_lift
def proju(W: Tensor, X: Tensor) -> Tensor:
    """Horizontal part of ``X``: the radial component along ``w(i)`` removed per neuron.
    The vertical space at ``W`` is spanned by the ``w(i)`` (moving along a class)."""
    coef = torch.linalg.vecdot(_rows(X), _rows(W)) / sqnorms(W)
    return X - _per_neuron(coef, W) * W


@_lift
def egrad2rgrad(W: Tensor, G: Tensor) -> Tensor:
    """Riemannian gradient (7): ``||w(i)||^2 * G(i)``. For a scale-invariant loss ``G`` is
    horizontal already (Lemma 1), so no projection is needed; it is not applied here."""
    return G * _per_neuron(sqnorms(W), W)


@_lift
def retr(W: Tensor, X: Tensor) -> Tensor:
    """Retraction (8), Proposition 3: ``R_W(X) = W + X``."""
    return W + X


@_lift
def expmap(W: Tensor, X: Tensor) -> Tensor:
    """Exponential map of metric (6): each neuron moves on the great circle of its own
    sphere (radius ``||w(i)||`` kept) by the angle ``||x(i)|| / ||w(i)||``.

    The radial part of ``X`` is dropped first (``proju``): it is vertical, so it does not
    move the class. ``d/dt expmap(W, tX)`` at 0 is ``proju(W, X)``.
    """
    X = proju(W, X)
    r = sqnorms(W).sqrt()
    xn = sqnorms(X).sqrt()
    theta = xn / r
    # sin(theta)/theta * r/xn * x = sin(theta) r x / xn, written to stay finite at x = 0
    sinc = torch.where(theta > 0, torch.sin(theta) / theta.clamp_min(1e-300), 1.0)
    return _per_neuron(torch.cos(theta), W) * W + _per_neuron(sinc, W) * X


@_lift
def _sqdist(W1: Tensor, W2: Tensor) -> Tensor:
    u, v = _rows(canonical(W1)), _rows(canonical(W2))
    # 2 atan2(|u - v|, |u + v|) is the angle, accurate near 0 and near pi (unlike acos)
    angle = 2 * torch.atan2(torch.linalg.vector_norm(u - v, dim=1), torch.linalg.vector_norm(u + v, dim=1))
    return angle.square().sum()


def dist(W1: Point, W2: Point) -> Tensor:
    """Geodesic distance between ``[W1]`` and ``[W2]``: the root of the sum over neurons of
    the squared angle between ``w1(i)`` and ``w2(i)`` (the quotient of section 4 with metric (6)
    is a product of unit spheres: a class stands for its unit-norm representative)."""
    sq = _sqdist(W1, W2)
    return sq.sqrt() if isinstance(sq, Tensor) else torch.stack(sq).sum().sqrt()


def random_scales(n: int, low: float = 1e-3, high: float = 1e3, *, generator: torch.Generator | None = None,
                  dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> Tensor:
    """``n`` positive factors, log-uniform in ``[low, high]``: a random element of the group."""
    u = torch.rand(n, generator=generator, dtype=dtype, device=device)
    return low * (high / low) ** u
