"""The geometry of the PSI manifold, measured (notebook 02): retraction against the exponential map,
lengths on the quotient against lengths on the spheres, Lemma 1, effective learning rates, paths.

The training measurements share :func:`psi.paper.loop.train_steps`, so SGD and PSI-SGD see the same
batches; each is read per neuron of one scale-invariant layer named by its module path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psi.core import manifold as M
from psi.engine.models import BNMLP
from psi.paper.loop import train_steps
from psi.paper.symmetry import set_bn_eps, sgd_and_psi_sgd

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["retraction_gaps", "curve_lengths", "track_neurons", "neuron_path", "arc_length", "sphere_net",
           "bn_net", "layer_gradient", "findings", "plot_sphere_paths", "plot_retraction_vs_expmap",
           "plot_lemma1", "plot_effective_lr", "plot_neuron_path"]


def retraction_gaps(W: Tensor, X: Tensor, ts: Sequence[float]) -> list[float]:
    """``dist([W + tX], [expmap_W(tX)])`` for each ``t``: how far the paper's retraction (eq. 8) lands
    from the exponential map of metric (6) (great circles). ``X`` horizontal at ``W``."""
    return [float(M.dist(M.retr(W, t * X), M.expmap(W, t * X))) for t in ts]


def curve_lengths(curve: Callable[[Tensor], Tensor], n: int = 4000) -> tuple[float, float]:
    """Two lengths of ``t -> curve(t)``, ``t in [0, 1]`` (midpoint rule, ``n`` pieces, central
    differences): under metric (6) counting only the horizontal part of the velocity, and the
    plain length of the canonical curve ``(w(i)/||w(i)||)`` on the product of unit spheres. They
    agree when the quotient is (isometric to) that product."""
    ts = torch.linspace(0, 1, n + 1, dtype=torch.float64)
    h = ts[1] - ts[0]
    quotient = sphere = 0.0
    for t0 in ts[:-1]:
        w0, w1, wm = curve(t0), curve(t0 + h), curve(t0 + h / 2)
        quotient += float(M.norm(wm, M.proju(wm, (w1 - w0) / h))) * float(h)
        sphere += float(((M.canonical(w1) - M.canonical(w0)) / h).norm()) * float(h)
    return quotient, sphere


def track_neurons(model: nn.Module, opt: torch.optim.Optimizer, layer: str, x: Tensor, y: Tensor, steps: int,
                  batch_size: int = 64, seed: int = 0,
                  loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> pd.DataFrame:
    """Per step and neuron of ``layer``: ``sq_before``/``sq_after`` (``||w(i)||^2`` around the step),
    ``grad_sq`` (``||G(i)||^2`` of the batch gradient the step used) and ``angle`` (radians the
    direction ``w(i)/||w(i)||`` turned). Lemma 1, for SGD: ``sq_after - sq_before = lr^2 grad_sq``.
    The effective learning rate on the sphere is ``angle / (||w(i)|| ||G(i)||)``, the turn per unit of
    the gradient in the direction (``||w|| ||G||``): ``lr / ||w||^2`` for SGD, ``lr`` for PSI-SGD."""
    w = model.get_submodule(layer).weight
    before = w.detach().clone()
    frames = []
    for step in train_steps(model, opt, x, y, steps, batch_size, loss_fn, seed=seed):
        after = w.detach().clone()
        u, v = M.canonical(before).flatten(1), M.canonical(after).flatten(1)
        frames.append(pd.DataFrame({"step": step.index, "neuron": np.arange(len(w)),
                                    "sq_before": M.sqnorms(before).numpy(), "sq_after": M.sqnorms(after).numpy(),
                                    "grad_sq": M.sqnorms(w.grad).numpy(), "angle": _angle(u, v).numpy()}))
        before = after
    return pd.concat(frames, ignore_index=True)


def neuron_path(model: nn.Module, opt: torch.optim.Optimizer, layer: str, x: Tensor, y: Tensor, steps: int,
                neuron: int = 0, batch_size: int = 64, seed: int = 0,
                loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> np.ndarray:
    """The direction ``w/||w||`` of one neuron of ``layer`` at the start and after every step: ``(steps + 1, d)``."""
    w = model.get_submodule(layer).weight
    points = [M.canonical(w.detach())[neuron].flatten().numpy()]
    for _ in train_steps(model, opt, x, y, steps, batch_size, loss_fn, seed=seed):
        points.append(M.canonical(w.detach())[neuron].flatten().numpy())
    return np.array(points)


def arc_length(points: np.ndarray) -> float:
    """Length of a path of unit vectors along great circles: the summed angles between successive points."""
    p = torch.from_numpy(points)
    return float(_angle(p[1:], p[:-1]).sum())


def _angle(u: Tensor, v: Tensor) -> Tensor:
    """Row-wise angle between unit vectors, ``2 atan2(|u - v|, |u + v|)``: exact for tiny angles, where
    ``arccos(u . v)`` rounds to 0."""
    return 2 * torch.atan2((u - v).norm(dim=-1), (u + v).norm(dim=-1))


def sphere_net(d_in: int = 64, classes: int = 10, seed: int = 0, scale: float = 3.0) -> nn.Sequential:
    """Linear(d_in, 3)-BN-ReLU-Linear(3, 8)-BN-ReLU-Linear(8, classes), float64: the neurons of its
    second BN layer (module ``"3"``) have three inputs, so their directions live on the sphere we can
    draw. That layer starts at ``scale`` times torch's init (``||w|| > 1``, as after some training)."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d_in, 3, bias=False), nn.BatchNorm1d(3), nn.ReLU(), nn.Linear(3, 8, bias=False),
                        nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, classes)).double()
    with torch.no_grad():
        net[3].weight.mul_(scale)
    return net


def neuron_paths(lr: float, x: Tensor, y: Tensor, steps: int, seed: int = 0) -> dict[str, pd.DataFrame]:
    """Neuron ``3``'s path (:func:`neuron_path`) in a fresh :func:`sphere_net` under SGD and under PSI-SGD,
    at rate ``lr`` on the same batches: ``{"SGD": path, "PSI-SGD": path}``."""
    paths = {}
    for name, make_opt in sgd_and_psi_sgd(lr, x[:64]).items():
        net = sphere_net(seed=seed)
        paths[name] = neuron_path(net, make_opt(net), "3", x, y, steps, seed=seed)
    return paths


def findings(*, metric: tuple[float, float], radial: float, vertical: dict[float, float],
             riemannian: Sequence[tuple[float, float]], order: float,
             kept: float, lengths: tuple[float, float, float], sgd: pd.DataFrame, median_gap: float,
             eff: dict[str, pd.Series], lr: float, arcs: dict[str, float]) -> list[str]:
    """Notebook 02's conclusions as sentences computed from its numbers, each with the test it passed
    or failed: ``metric`` (metric (6) at ``T_a W`` and at ``W``), ``radial`` (what ``proju`` leaves along
    ``w``, relative), ``vertical`` (cosine of a BN network's gradient with ``W``, per BN eps 1e-30 and 1e-5),
    ``riemannian`` (pairs ``<grad L, Z>_W``, ``G . Z``), ``order`` (of the gap between
    retraction and expmap), ``kept`` (expmap's largest relative change of a norm), ``lengths``
    (horizontal length under (6), length on the spheres, distance of the ends), ``sgd`` (SGD's
    :func:`track_neurons` with ``measured`` and ``predicted`` increments), ``eff`` (median effective
    learning rate per step, ``"SGD"`` and ``"PSI-SGD"``), ``arcs`` (arc length of each path)."""
    lhs, rhs = metric
    metric_gap = abs(lhs - rhs) / abs(rhs)
    riem_gap = max(abs(a - b) / max(abs(b), 1e-300) for a, b in riemannian)
    q, s, d = lengths
    len_gap = abs(q - s) / s
    negative = int((sgd["measured"] < 0).sum())
    e_sgd, e_psi = eff["SGD"], eff["PSI-SGD"]
    return [
        f"Metric (6) at T_a W and at W differs by {metric_gap:.0e} (relative): "
        f"{'the same up to rounding' if metric_gap < 1e-10 else 'NOT the same'}; the horizontal projection leaves "
        f"{radial:.0e} (relative) along w.",
        f"Along the vertical direction W the loss has a slope (cosine with the gradient) of {vertical[1e-30]:.0e} with "
        f"BN's eps 1e-30 and {vertical[1e-5]:.0e} with the default 1e-5: "
        + ("flat up to rounding without eps." if abs(vertical[1e-30]) < 1e-10 else "NOT flat even without eps."),
        f"Eq. (7): <grad L, Z>_W and G . Z differ by at most {riem_gap:.0e} (relative) over {len(riemannian)} random Z: "
        f"{'it represents the differential' if riem_gap < 1e-10 else 'it does NOT represent the differential'}.",
        f"Retraction and exponential map: their gap grows as t^{order:.2f} ("
        + ("third order: they agree to second order" if abs(order - 3) < 0.2 else "not third order")
        + f"); expmap changed a norm by at most {kept:.0e} (relative).",
        f"A curve's horizontal length under (6), {q:.4f}, and its canonical curve's length on the unit spheres, {s:.4f}, "
        f"differ by {len_gap:.0e} (relative): "
        + ("the quotient measures as the product of spheres" if len_gap < 1e-4 else "they disagree")
        + f"; the ends are {d:.4f} apart, {'no more than' if d <= min(q, s) * (1 + 1e-9) else 'MORE than'} either length.",
        f"Lemma 1 under SGD: the smallest of {len(sgd)} per-neuron increments of ||w||^2 was {sgd['measured'].min():.1e}, "
        f"{negative} were negative; median relative gap to eta^2 ||G||^2: {median_gap:.1e}. "
        + ("The norms grew at every step." if negative == 0 else f"Lemma 1 failed on {negative} increments (BN's eps)."),
        f"SGD's effective learning rate went from {e_sgd.iloc[0]:.4f} to {e_sgd.iloc[-1]:.4f} "
        f"(x{e_sgd.iloc[-1] / e_sgd.iloc[0]:.2f}); "
        f"PSI-SGD's stayed between {e_psi.min():.4f} and {e_psi.max():.4f} (eta = {lr:g}).",
        f"From the same start, the neuron of section 7 turned {arcs['PSI-SGD']:.3f} rad under PSI-SGD and {arcs['SGD']:.3f} "
        f"rad under SGD ({arcs['PSI-SGD'] / max(arcs['SGD'], 1e-300):.1f} times as far).",
    ]


def plot_sphere_paths(ax, paths: dict[str, np.ndarray]) -> None:
    """Paths of unit 3-vectors (:func:`neuron_path`) on a wireframe unit sphere of a 3-D ``ax``, one
    color each, with their arc lengths in the legend and the common start in black."""
    u, v = np.mgrid[0:2 * np.pi:40j, 0:np.pi:20j]
    ax.plot_wireframe(np.cos(u) * np.sin(v), np.sin(u) * np.sin(v), np.cos(v), color="0.85", linewidth=0.4)
    for k, (name, p) in enumerate(paths.items()):
        ax.plot(*p.T, color=f"C{k}", label=f"{name}: {arc_length(p):.3f} rad")
        ax.scatter(*p[-1], color=f"C{k}", s=30)
    ax.scatter(*next(iter(paths.values()))[0], color="k", s=40, label="start")
    ax.legend()


def bn_net(d_in: int = 64, hidden: int = 32, classes: int = 10, seed: int = 0, eps: float | None = None) -> nn.Module:
    """The float64 Linear-BN-ReLU-Linear network of notebook 02 (:class:`psi.engine.models.BNMLP`, its BN layer
    ``"net.1"``), initialized after ``torch.manual_seed(seed)``; ``eps``: BN's eps (None: torch's default)."""
    torch.manual_seed(seed)
    net = BNMLP(d_in, [hidden], classes).double()
    return net if eps is None else set_bn_eps(net, eps)


def layer_gradient(model: nn.Module, layer: str, x: Tensor, y: Tensor,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> tuple[Tensor, Tensor]:
    """``(W, G)``: the weight of ``layer`` (detached) and the gradient ``G`` of the loss on ``x`` in it."""
    w = model.get_submodule(layer).weight
    (g,) = torch.autograd.grad(loss_fn(model(x), y), w)
    return w.detach(), g


def plot_retraction_vs_expmap(ts: Sequence[float], gaps: Sequence[float]) -> Figure:
    """How far the retraction (eq. 8) lands from the exponential map against the step length ``t``
    (:func:`retraction_gaps`, log-log), beside ``t^3/3``: a third-order gap means they agree to second order."""
    import matplotlib.pyplot as plt

    ts = np.asarray(ts)
    fig, ax = plt.subplots(figsize=(5, 4))
    ax.loglog(ts, gaps, "o-", label="dist(retr, expmap)")
    ax.loglog(ts, ts**3 / 3, "k--", label="$t^3/3$")
    ax.set(xlabel="step length t (metric units)", ylabel="distance between the classes",
           title="Retraction vs exponential map")
    ax.legend()
    return fig


def plot_lemma1(sgd: pd.DataFrame) -> Figure:
    """Lemma 1 under SGD, from :func:`track_neurons` with ``measured`` and ``predicted`` increments of
    ``||w(i)||^2``: left, the mean squared norm of the BN layer growing step after step; right, every
    per-neuron increment against ``eta^2 ||G||^2`` (log-log, the diagonal dashed: the lemma holds on it)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(sgd.groupby("step")["sq_after"].mean())
    axes[0].set(xlabel="step", title="SGD: mean $\\|w(i)\\|^2$ of the BN layer")
    axes[1].scatter(sgd["predicted"], sgd["measured"].clip(lower=1e-30), s=3)
    lim = [sgd["predicted"].min(), sgd["predicted"].max()]
    axes[1].plot(lim, lim, "k--")
    axes[1].set(xscale="log", yscale="log", xlabel="predicted", ylabel="measured",
                title="per-neuron increment: $\\eta^2\\|G\\|^2$ vs measured")
    return fig


def plot_effective_lr(eff: dict[str, pd.Series], lr: float) -> Figure:
    """The median effective learning rate on the sphere per step, one line per optimizer of ``eff`` (log
    scale): SGD's ``eta/||w||^2`` shrinks as the norms grow, PSI-SGD's stays at ``eta = lr``."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for k, e in eff.items():
        ax.plot(e.index, e.values, label=k)
    ax.set(yscale="log", xlabel="step", ylabel="turn per unit gradient", title=f"Effective learning rate (eta = {lr})")
    ax.legend()
    return fig


def plot_neuron_path(paths: dict[str, np.ndarray]) -> Figure:
    """One neuron's direction ``w/||w||`` under each optimizer of ``paths`` (:func:`neuron_path`) on the
    unit sphere in 3-D (:func:`plot_sphere_paths`): how far each moves the neuron from the same start."""
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(6, 6))
    ax = fig.add_subplot(projection="3d")
    plot_sphere_paths(ax, paths)
    ax.set_title("Direction of one neuron ($w/\\|w\\|$), unit sphere")
    return fig
