"""The symmetry and what it does to training (notebook 01): invariance, eq. 5, Theorem 1, BN's eps, Figure 1.

Each function measures one claim of section 3-4 of the paper on a small BN network, with the
scale-invariant layer named by its module path (``"net.1"`` in :class:`psi.engine.models.BNMLP`).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psi.core import manifold as M
from psi.core.discovery import param_groups
from psi.core.psisgd import PSISGD
from psi.engine.models import BNMLP
from psi.paper.loop import steps_per_epoch, train_steps

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["set_bn_eps", "rescaled", "invariance_gap", "gradient_ratio", "drift", "eps_sweep", "eps_threshold",
           "sgd_and_psi_sgd", "READINGS", "figure1_model", "epoch_losses", "figure1_runs", "findings",
           "figure1_findings", "plot_gradient_scaling", "plot_drift", "plot_eps_breaks_symmetry",
           "plot_figure1"]


def set_bn_eps(model: nn.Module, eps: float) -> nn.Module:
    """Every BatchNorm of ``model`` with this ``eps`` (1e-30: the exact symmetry; 1e-5: torch's default)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = eps
    return model


def rescaled(model: nn.Module, layer: str, a: Tensor) -> nn.Module:
    """A copy of ``model`` at ``T_a(W)``: neuron ``i`` of ``layer``'s weight multiplied by ``a[i]``."""
    twin = copy.deepcopy(model)
    w = twin.get_submodule(layer).weight
    with torch.no_grad():
        w.copy_(M.rescale(w, a.to(w.dtype)))
    return twin


def invariance_gap(model: nn.Module, twin: nn.Module, x: Tensor, y: Tensor,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> dict[str, float]:
    """How far apart two networks' outputs and losses are on ``x`` (train mode, batch statistics)."""
    with torch.no_grad():
        out, out_t = model.train()(x), twin.train()(x)
        return {"gap": float((out - out_t).abs().max()), "out_max": float(out.abs().max()),
                "loss": float(loss_fn(out, y)), "loss_twin": float(loss_fn(out_t, y))}


def gradient_ratio(model: nn.Module, twin: nn.Module, layer: str, x: Tensor, y: Tensor,
                   loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> Tensor:
    """Per neuron of ``layer``: ``||grad at the twin|| / ||grad at the model||`` (eq. 5: ``1/a(i)``)."""
    norms = []
    for m in (model, twin):
        m.zero_grad()
        loss_fn(m.train()(x), y).backward()
        norms.append(m.get_submodule(layer).weight.grad.flatten(1).norm(dim=1))
    return (norms[1] / norms[0]).detach()


def drift(model: nn.Module, twin: nn.Module, make_opt: Callable[[nn.Module], torch.optim.Optimizer], layer: str,
          x: Tensor, y: Tensor, steps: int, batch_size: int = 64, seed: int = 0,
          loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> list[float]:
    """Train both on the same batches; after each step the geodesic distance between the classes of
    their ``layer`` weights (:func:`psi.manifold.dist`, radians). Theorem 1: 0 for PSI-SGD."""
    runs = [train_steps(m, make_opt(m), x, y, steps, batch_size, loss_fn, seed=seed) for m in (model, twin)]
    wa, wb = model.get_submodule(layer).weight, twin.get_submodule(layer).weight
    return [float(M.dist(wa.detach(), wb.detach())) for _ in zip(*runs)]


def eps_sweep(model: nn.Module, layer: str, x: Tensor, y: Tensor, factors: Sequence[float],
              loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy) -> pd.DataFrame:
    """The relative change of the loss when the whole ``layer`` is multiplied by each factor ``s``
    (with BN's own ``eps``): 0 where the symmetry holds."""
    base = invariance_gap(model, model, x, y, loss_fn)["loss"]
    rows = []
    for s in factors:
        twin = rescaled(model, layer, torch.full((model.get_submodule(layer).weight.shape[0],), float(s)))
        rows.append({"s": float(s), "relative change of the loss":
                     abs(invariance_gap(model, twin, x, y, loss_fn)["loss_twin"] - base) / base})
    return pd.DataFrame(rows)


def eps_threshold(model: nn.Module, layer: str, x: Tensor, eps: float = 1e-5) -> tuple[float, float]:
    """``(median pre-activation std of layer's neurons on x, s*)``: scaling the layer by ``s*`` brings
    that variance down to ``eps``, where BN's ``sqrt(var + eps)`` stops following the scale."""
    with torch.no_grad():
        std = float((x @ model.get_submodule(layer).weight.T).std(0).median())
    return std, float(np.sqrt(eps) / std)


def sgd_and_psi_sgd(lr: float, probe: Tensor) -> dict[str, Callable[[nn.Module], torch.optim.Optimizer]]:
    """The two optimizers the notebooks compare, as ``{"SGD": make, "PSI-SGD": make}`` with ``make(model)``
    an optimizer at rate ``lr``: plain SGD on every parameter, and PSI-SGD (eq. 10) on the groups of
    :func:`psi.param_groups` (found with the batch ``probe``)."""
    return {"SGD": lambda m: torch.optim.SGD(m.parameters(), lr=lr),
            "PSI-SGD": lambda m: PSISGD(param_groups(m, probe), lr=lr)}


# Figure 1 (main paper p. 2; text p. 3): "a simple two-layer neural network with BN on MNIST" from T_a(W),
# a = (1e4, 1e4, 1e-4, 1e-4). How the four factors map onto the network is not stated; three readings:
READINGS = {
    "A": "hidden neurons in four groups x (1e4, 1e4, 1e-4, 1e-4)",
    "B": "every hidden neuron x 1e4",
    "C": "the drawing: first layer x 1e4, second layer (BN after it) x 1e-4",
    "D": "the drawing with BN eps 1e-30: exactly scale-invariant",
}


def figure1_model(reading: str, d_in: int, hidden: int, classes: int, seed: int = 0) -> nn.Module:
    """The network of a Figure 1 reading. A and B: Linear-BN-ReLU-Linear (:class:`BNMLP`) with the
    hidden layer rescaled. C: the drawing (p. 2), where all four neurons of a two-layer network are
    rescaled, the hidden ones by 1e4 and the output ones by 1e-4; the output neurons are
    scale-invariant only with a BN after them, so C is Linear-BN-ReLU-Linear-BN. D is C with BN's eps
    at 1e-30: at 1e-5 the 1e-4 output neurons are far from invariant (their variance is under eps)."""
    torch.manual_seed(seed)
    if reading in ("A", "B"):
        model = BNMLP(d_in, [hidden], classes)
        scales = (1e4, 1e4, 1e-4, 1e-4) if reading == "A" else (1e4,) * 4
        a = torch.tensor(scales).repeat_interleave(-(-hidden // 4))[:hidden]
        with torch.no_grad():
            model.first_linear.weight.copy_(M.rescale(model.first_linear.weight, a))
        return model
    if reading in ("C", "D"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(d_in, hidden, bias=False), nn.BatchNorm1d(hidden), nn.ReLU(),
                              nn.Linear(hidden, classes, bias=False), nn.BatchNorm1d(classes))
        with torch.no_grad():
            model[1].weight.mul_(1e4)
            model[4].weight.mul_(1e-4)
        return set_bn_eps(model, 1e-30) if reading == "D" else model
    raise ValueError(f"unknown reading {reading!r}; valid: {', '.join(READINGS)}")


def epoch_losses(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, epochs: int,
                 batch_size: int = 64, seed: int = 0) -> list[float]:
    """Minibatch training; the cross-entropy on the whole training set (train mode) after every epoch."""
    out = []
    for step in train_steps(model, opt, x, y, epochs * steps_per_epoch(len(x), batch_size), batch_size, seed=seed):
        if step.epoch_end:
            with torch.no_grad():
                out.append(float(F.cross_entropy(model(x), y)))
    return out


def figure1_runs(x: Tensor, y: Tensor, hidden: int, classes: int, lrs: Sequence[float], epochs: int,
                 seed: int = 0) -> pd.DataFrame:
    """Figure 1's experiment: every reading of :data:`READINGS`, SGD and PSI-SGD (:func:`sgd_and_psi_sgd`,
    batch 64) at each rate of ``lrs``, each from the same start; one row per (reading, optimizer, lr,
    epoch) with the ``train loss`` of :func:`epoch_losses` (epochs counted from 1)."""
    rows = []
    for reading in READINGS:
        for name in ("SGD", "PSI-SGD"):
            for lr in lrs:
                model = figure1_model(reading, x.shape[1], hidden, classes, seed)
                opt = sgd_and_psi_sgd(lr, x[:64])[name](model)
                rows += [{"reading": reading, "optimizer": name, "lr": lr, "epoch": e, "train loss": v}
                         for e, v in enumerate(epoch_losses(model, opt, x, y, epochs, seed=seed), 1)]
    return pd.DataFrame(rows)


def findings(gap: dict[float, dict[str, float]], slope: float, dist: dict[str, list[float]], s_star: float,
             sweep: pd.DataFrame) -> list[str]:
    """Notebook 01's sections 1-4 as sentences computed from the numbers, each with the test it passed or
    failed: ``gap`` (:func:`invariance_gap` per BN eps, 1e-30 and 1e-5), ``slope`` (eq. 5's log-log fit),
    ``dist`` (:func:`drift` of ``"SGD"`` and ``"PSI-SGD"``), ``s_star`` (:func:`eps_threshold`) and
    ``sweep`` (:func:`eps_sweep`)."""
    exact = gap[1e-30]["gap"] <= 1e-9 * gap[1e-30]["out_max"]
    held = max(dist["PSI-SGD"]) < 1e-6
    change = sweep.set_index("s")["relative change of the loss"]
    above = float(change[change.index >= 10 * s_star].max())
    at_1e4 = float(np.interp(-4, np.log10(change.index), change.values))
    return [
        f"Invariance: rescaling neurons by factors across 4 orders of magnitude moved the outputs by "
        f"{gap[1e-30]['gap']:.1e} with eps = 1e-30 ({'rounding: it holds' if exact else 'more than rounding'}) and by "
        f"{gap[1e-5]['gap']:.1e} with the default eps = 1e-5.",
        f"Eq. (5): the gradient ratio against a(i) has slope {slope:.4f} on log-log axes (theory -1): it "
        f"{'holds' if abs(slope + 1) < 1e-3 else 'does not hold'}.",
        f"Theorem 1: after {len(dist['SGD'])} steps SGD's two copies are {dist['SGD'][-1]:.3f} rad apart on the PSI "
        f"manifold, PSI-SGD's at most {max(dist['PSI-SGD']):.1e} rad over the run: the theorem "
        + ("held." if held else "FAILED."),
        f"With eps = 1e-5 the loss moves by at most {above:.1e} (relative) for scales above 10 s* = {10 * s_star:.0e}, and "
        f"by {at_1e4:.1e} at Figure 1's 1e-4, which sits {'below' if 1e-4 < s_star else 'above'} s* = {s_star:.0e}.",
    ]


def figure1_findings(final: pd.DataFrame, classes: int) -> list[str]:
    """One sentence per reading from the final training losses (``final``: index ``(reading, lr)``,
    columns ``SGD`` and ``PSI-SGD``). The paper's picture (p. 2) is SGD flat at chance, ``ln(classes)``,
    while PSI-SGD trains: here, SGD's best rate ends above 90% of chance and PSI-SGD's best under 10%."""
    chance = float(np.log(classes))
    out = []
    for reading, df in final.groupby(level=0, sort=False):
        best = {o: (float(df[o].min()), df[o].idxmin()[1]) for o in ("SGD", "PSI-SGD")}
        span = {o: f"{df[o].min():.3g} to {df[o].max():.3g} (best at lr {best[o][1]:g})" for o in best}
        sgd_stalls, psi_trains = best["SGD"][0] > 0.9 * chance, best["PSI-SGD"][0] < 0.1 * chance
        lower = "PSI-SGD" if best["PSI-SGD"][0] < best["SGD"][0] else "SGD"
        out.append(f"Figure 1, reading {reading} ({READINGS.get(reading, reading)}): final loss over the rates SGD "
                   f"{span['SGD']}, PSI-SGD {span['PSI-SGD']}; chance {chance:.3f}. SGD "
                   f"{'stalls' if sgd_stalls else 'trains'} at its best rate, PSI-SGD "
                   f"{'trains' if psi_trains else 'does not get under 10% of chance'}, {lower}'s best is lower: "
                   f"{'the paper' if sgd_stalls and psi_trains else 'not the paper'}'s picture.")
    return out


def plot_gradient_scaling(a: np.ndarray, ratio: np.ndarray) -> Figure:
    """Eq. (5) seen per neuron: the gradient-norm ratio at ``T_a(W)`` over ``W`` against ``a(i)`` on
    log-log axes, beside the predicted ``1/a`` line (slope -1 through the origin)."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(5, 4))
    sns.scatterplot(x=a, y=ratio, ax=ax, label="neurons")
    ax.plot(np.logspace(-2, 2), 1 / np.logspace(-2, 2), "k--", label="eq. (5): $1/a$")
    ax.set(xscale="log", yscale="log", xlabel="$a(i)$", ylabel="gradient norm ratio", title="Gradient at $T_a(W)$ vs at $W$")
    ax.legend()
    return fig


def plot_drift(dist: dict[str, Sequence[float]]) -> Figure:
    """Theorem 1 seen step by step: the geodesic distance between two equivalent starts trained on the
    same batches, one line per optimizer of ``dist`` (:func:`drift`); PSI-SGD's should stay at 0."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, d in dist.items():
        ax.plot(np.arange(1, len(d) + 1), d, label=name)
    ax.set(xlabel="step", ylabel="dist([W_t], [W'_t])  (radians)", title="Two equivalent starts, same batches")
    ax.legend()
    return fig


def plot_eps_breaks_symmetry(sweep: pd.DataFrame, s_star: float) -> Figure:
    """Where BN's eps breaks the symmetry: the relative change of the loss against the common scale ``s``
    (:func:`eps_sweep`, log-log), with the threshold ``s*`` of :func:`eps_threshold` and Figure 1's 1e-4
    marked, to show on which side of the threshold Figure 1's start sits."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(sweep, x="s", y="relative change of the loss", marker="o", ax=ax)
    ax.axvline(s_star, color="k", ls="--", label=r"$s^2\,\mathrm{Var}[w^\top x] = \epsilon$")
    ax.axvline(1e-4, color="C3", ls=":", label="Figure 1's $10^{-4}$")
    ax.set(xscale="log", yscale="log", title=r"Symmetry broken by $\epsilon = 10^{-5}$")
    ax.legend()
    return fig


def plot_figure1(runs: pd.DataFrame, dataset: str) -> Figure:
    """Figure 1 reproduced: the training loss per epoch of :func:`figure1_runs`, one panel per reading,
    SGD and PSI-SGD in color, the rate as line style, log scale (the paper shows SGD flat near chance)."""
    import seaborn as sns

    g = sns.relplot(runs, x="epoch", y="train loss", hue="optimizer", style="lr", col="reading", col_wrap=2, kind="line",
                    height=3.2, aspect=1.3)
    g.set(yscale="log")
    g.set_titles("reading {col_name}")
    g.figure.suptitle(f"Figure 1 on {dataset}: unbalanced start, four readings", y=1.02)
    return g.figure
