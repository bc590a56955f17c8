"""The rates of section 5 measured on the toy regression (notebook 03).

Theorem 2 (PSI-GD, steps ``1/L~``): ``min_{t<T} ||grad_{V,g} L||^2 <= 2 L~ (L(W0) - L*) / T``.
Theorem 3 (PSI-SGD, steps ``1/(L~ sqrt T)``): the expected minimum is ``O(1/sqrt T)``.
Both are upper bounds on the best iterate so far, so what is measured is ``min_{t<T}`` of the
full-batch squared gradient norm (the one of the theorems) for several horizons ``T``, and the
slope of its log against ``log T``, with a confidence interval.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch.nn.functional as F
from scipy import stats
from torch import Tensor, nn

from psi.core.discovery import param_groups
from psi.paper.loop import train_steps
from psi.paper.toy import make_optimizer, vg_grad_norm

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["describe_fit", "slope_ci", "min_sq_upto", "full_batch_grad_norm", "psi_sgd_min_sq", "psi_sgd_rate",
           "plot_rates"]


def slope_ci(T: Sequence[float], v: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """Least-squares slope of ``log v`` on ``log T`` and its ``level`` confidence interval (t distribution)."""
    fit = stats.linregress(np.log(np.asarray(T, dtype=float)), np.log(np.asarray(v, dtype=float)))
    half = stats.t.ppf(0.5 + level / 2, len(T) - 2) * fit.stderr
    return float(fit.slope), float(fit.slope - half), float(fit.slope + half)


def min_sq_upto(norms: Sequence[float], horizons: Sequence[int]) -> list[float]:
    """``min_{t<T} norms[t]^2`` for each ``T`` of ``horizons`` (one run read at many horizons). A run
    that diverged has fewer norms than the horizon: its missing iterates count as infinite."""
    sq = np.square(np.asarray(norms, dtype=float))
    sq = np.where(np.isfinite(sq), sq, np.inf)
    return [float(sq[:T].min()) if T <= len(sq) and T > 0 else float(np.min(sq, initial=np.inf)) for T in horizons]


def full_batch_grad_norm(model: nn.Module, groups: list[dict], x: Tensor, y: Tensor,
                         loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss) -> float:
    """:func:`psi.paper.toy.vg_grad_norm` of the whole data's loss at the current weights (overwrites ``.grad``)."""
    model.zero_grad()
    loss_fn(model(x), y).backward()
    return vg_grad_norm(groups)


def psi_sgd_min_sq(make_model: Callable[[], nn.Module], x: Tensor, y: Tensor, T: int, lr: float, batch_size: int,
                   seeds: Sequence[int], loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss) -> list[float]:
    """PSI-SGD for ``T`` minibatch steps at rate ``lr``, once per minibatch order of ``seeds``:
    ``min_{t<T}`` of the full-batch squared gradient norm of each run (iterates 0 to T-1)."""
    out = []
    for s in seeds:
        model = make_model()
        groups = param_groups(model, x)
        opt = make_optimizer("psi-gd", groups, lr)
        norms = [full_batch_grad_norm(model, groups, x, y, loss_fn)]
        for step in train_steps(model, opt, x, y, T, batch_size, loss_fn, seed=s):
            if step.index < T:
                norms.append(full_batch_grad_norm(model, groups, x, y, loss_fn))
        out.append(min(np.square(norms)) if len(norms) == T else float("inf"))
    return out


def describe_fit(name: str, fit: tuple[float, float, float], bound: float) -> str:
    """One sentence: the fitted slope and interval of ``name`` against the slope of its theorem's bound.
    The theorems are upper bounds: a faster fall agrees; a slower one, if it lasted, would break them."""
    s, lo, hi = fit
    where = ("inside the interval" if lo <= bound <= hi else "under the interval: a slower fall than the bound's over "
             "these horizons" if lo > bound else "above the interval: a faster fall, in agreement")
    return f"{name}: slope {s:.2f} [{lo:.2f}, {hi:.2f}]; the theorem's {bound:g} is {where}."


def psi_sgd_rate(make_model: Callable[[], nn.Module], x: Tensor, y: Tensor, horizons: Sequence[int], lr0: float,
                 batch_size: int, seeds: Sequence[int],
                 loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss) -> list[float]:
    """Theorem 3's experiment: for each horizon ``T`` a fresh PSI-SGD run of ``T`` minibatch steps at the
    rate ``lr0 * sqrt(T0 / T)`` (``T0`` the first horizon), the theorem's ``1/(L~ sqrt T)`` with ``L~``
    unknown; the :func:`psi_sgd_min_sq` averaged over the minibatch orders of ``seeds``."""
    return [float(np.mean(psi_sgd_min_sq(make_model, x, y, T, lr0 * (horizons[0] / T) ** 0.5, batch_size, seeds,
                                         loss_fn))) for T in horizons]


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis from ``lo`` to ``hi``: the powers of ten in it, else (under two of them) the
    1-2-5 steps, else every digit, else four steps
    between the ends: at least two labelled ticks, and never a label on each minor tick."""
    k = np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
    for digits in ((1,), (1, 2, 5), tuple(range(1, 10))):
        ticks = [float(f"{d * 10.0 ** e:.3g}") for e in k for d in digits if lo <= d * 10.0 ** e <= hi]
        if len(ticks) >= 2:
            return ticks
    return sorted({float(f"{v:.2g}") for v in np.geomspace(lo, hi, 6)[1:-1]})  # a span under one digit step


def plot_rates(rates: pd.DataFrame) -> Figure:
    """Theorems 2-3 seen on log-log axes: ``min_{t<T}`` of the squared gradient norm against the horizon
    ``T``, one line per column of ``rates`` (column ``T`` the horizons); the bounds are lines of slope
    -1 (GD, PSI-GD) and -1/2 (PSI-SGD). The horizons are the x ticks, labelled as numbers; the y axis is
    labelled at :func:`_log_ticks` only (matplotlib labels every minor tick of a short log axis, on top
    of each other)."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    from matplotlib.ticker import FixedFormatter, FixedLocator, NullFormatter, NullLocator

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    sns.lineplot(rates.melt("T", var_name="method", value_name="min squared gradient norm"), x="T",
                 y="min squared gradient norm", hue="method", marker="o", ax=ax)
    # \mathrm{min}, not \min: mathtext sets \min's subscript under it, as a limit, below the title's line
    ax.set(xscale="log", yscale="log", ylabel="$\\mathrm{min}_{t<T}$ squared gradient norm",
           title="Best iterate so far: $\\mathrm{min}_{t<T}$ squared gradient norm")
    horizons = sorted(rates["T"].unique())
    ax.xaxis.set_major_locator(FixedLocator(horizons))
    ax.xaxis.set_major_formatter(FixedFormatter([f"{t:g}" for t in horizons]))
    ax.xaxis.set_minor_locator(NullLocator())
    ylim = ax.get_ylim()
    yticks = _log_ticks(*ylim)
    ax.yaxis.set_major_locator(FixedLocator(yticks))
    ax.yaxis.set_major_formatter(FixedFormatter([f"{v:g}" for v in yticks]))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(ylim)
    return fig
