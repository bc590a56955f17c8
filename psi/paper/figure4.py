"""Figure 4 of the paper (section 6.1, main paper p. 7-8): the toy regression, and why it does not reproduce.

The paper states the data (1000 samples of ``N(0, I_10)``, ``y = mu^T x + eps``), the network
(``f(x) = w1^T ELU(W2 x)``, ``w1 in R^100``, ``W2 in R^{100x10}``), the MSE loss and, in the
figure, 200 epochs and the methods. It does not state the learning rates, the initialization, how
``mu`` is drawn, the batch size, or where batch normalization sits (the formula has none, but the
PSI methods need one after ``W2 x``). A :class:`Setup` is one reading of what it leaves out;
:func:`sweep` trains every method of a list of setups, each at the rate of a small grid with the
smallest final gradient norm, and :func:`fall` measures what the figure shows: how far and how
fast (geometrically: a straight line on its log axis) the gradient norm falls.

:data:`PAPER_FIGURE4` holds what the figure shows, read off its pixels (log10 of the gradient
norm at epoch 0 and 200, slope of a straight-line fit over epochs 100-200).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn

from psi.engine.models import ToyNet
from psi.paper.toy import LABELS, METHODS, toy_regression, train_full_batch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["PAPER_FIGURE4", "FIGURE4_EPOCHS", "GEOMETRIC_SLOPE", "Setup", "AS_STATED", "VARIANTS", "toy_model",
           "fall", "noise_floor", "neighbours", "best_run", "sweep", "compare_with_paper", "findings",
           "linear_control", "initial_scale_runs", "plot_curves", "plot_readings", "plot_slopes",
           "paper_segments", "plot_figure4", "plot_loss_vs_noise_floor", "plot_readings_slopes",
           "plot_initial_scale"]

# Read off Figure 4 (main paper p. 7) by the pixels of its curves: log10 gradient norm; slope in decades per
# 100 epochs of a straight line fitted over epochs 100-200. All five curves start together near 10^2.6.
PAPER_FIGURE4: dict[str, dict[str, float]] = {
    "start": {"gd": 2.6, "psi-gd": 2.6, "psi-gdm": 2.6, "gdg": 2.6, "adam": 2.6},
    "end": {"gd": -2.5, "psi-gd": -6.3, "psi-gdm": -7.1, "gdg": -5.8, "adam": -2.1},
    "slope": {"gd": -3.6, "psi-gd": -3.9, "psi-gdm": -4.4, "gdg": -4.6, "adam": -0.8},
}
FIGURE4_EPOCHS = 200  # the figure's x-axis
# A run "falls geometrically like the figure" when its second-half slope is at least half as steep as the
# slowest of the paper's three manifold methods (PSI-GD, -3.9 decades per 100 epochs).
GEOMETRIC_SLOPE = 0.5 * max(PAPER_FIGURE4["slope"][m] for m in ("psi-gd", "psi-gdm", "gdg"))


@dataclass(frozen=True)
class Setup:
    """One reading of section 6.1. The defaults are the statement read literally, with BN (no affine
    parameters) after ``W2 x``; ``bn``: ``"plain"``, ``"affine"`` or ``"none"`` (the formula as
    printed: no BN, so no scale-invariant weights and the PSI methods are plain GD); the initial
    ``W2`` and ``w1`` (torch's default init) are multiplied by ``hidden_scale`` and ``out_scale``;
    :func:`sweep` multiplies its rates by ``lr_scale`` (a wider ``w1`` has a larger curvature)."""

    name: str
    noise: float = 1.0
    hidden: int = 100
    bn: str = "plain"
    hidden_scale: float = 1.0
    out_scale: float = 1.0
    lr_scale: float = 1.0
    methods: tuple[str, ...] = field(default=METHODS)

    def __post_init__(self) -> None:
        if self.bn not in ("plain", "affine", "none"):
            raise ValueError(f"Setup.bn={self.bn!r}; valid: plain, affine, none")
        bad = [m for m in self.methods if m not in METHODS]
        if bad:
            raise ValueError(f"Setup.methods: {bad} not valid; valid: {', '.join(METHODS)}")


AS_STATED = Setup("as stated")
# What the paper leaves open, one change at a time (each against AS_STATED).
VARIANTS = (
    Setup("noise-free targets", noise=0.0),  # eps ~ N(0, 1) is stated (p. 7); without it the targets are linear
    Setup("affine BN", bn="affine"),  # BN's place and form are not stated
    Setup("width 10", hidden=10),  # the width is stated (w1 in R^100, p. 8): other widths test its role
    Setup("width 1000", hidden=1000, lr_scale=0.1, methods=("gd", "psi-gd", "psi-gdm")),  # 10x the cost: 3 methods
    Setup("w1 x 30", out_scale=30.0),  # the initialization is not stated; this one starts near the figure's 10^2.6
    Setup("no BN (formula as printed)", bn="none", methods=("gd", "gdm", "adam")),
)


def toy_model(setup: Setup, seed: int = 0, d_in: int = 10) -> nn.Module:
    """The float64 network of ``setup``; the same seed gives the same ``W2`` and ``w1`` whatever the BN."""
    torch.manual_seed(seed)
    model = ToyNet(d_in, setup.hidden)
    if setup.bn == "affine":
        model.bn = nn.BatchNorm1d(setup.hidden, affine=True)
    elif setup.bn == "none":
        model.bn = nn.Identity()
    with torch.no_grad():
        model.hidden.weight.mul_(setup.hidden_scale)
        model.out.weight.mul_(setup.out_scale)
    return model.double()


def fall(norms: Sequence[float]) -> dict[str, float]:
    """What Figure 4 shows of one curve: ``start`` and ``end`` values, ``decades`` fallen from start to
    end, and ``slope``: decades per 100 epochs of a least-squares line through log10 of the second
    half (a geometric fall is a straight, steep line; a stall is a flat one)."""
    g = np.log10(np.maximum(np.asarray(norms, dtype=float), 1e-300))
    if len(g) < 4 or not np.isfinite(g).all():
        return {"start": math.nan, "end": math.nan, "decades": math.nan, "slope": math.nan}
    half = np.arange(len(g) // 2, len(g))
    return {"start": 10 ** g[0], "end": 10 ** g[-1], "decades": g[0] - g[-1],
            "slope": 100 * np.polyfit(half, g[half], 1)[0]}


def noise_floor(x: Tensor, y: Tensor) -> float:
    """The training MSE of the best linear fit ``y ~ b^T x`` on the same data: the targets are linear
    plus noise, so a loss under it means the network is fitting the noise."""
    b = torch.linalg.lstsq(x, y.unsqueeze(1)).solution.squeeze(1)
    return float((x @ b - y).square().mean())


def neighbours(grid: Sequence[float], chosen: float, k: int = 1) -> list[float]:
    """``chosen`` and up to ``k`` values of the sorted ``grid`` on each side of it."""
    g = sorted(grid)
    i = min(range(len(g)), key=lambda j: abs(math.log(g[j] / chosen)))
    return g[max(0, i - k):i + k + 1]


def best_run(setup: Setup, method: str, x: Tensor, y: Tensor, epochs: int, lrs: Sequence[float],
             seed: int = 0) -> tuple[float, dict[str, list[float]] | None]:
    """Train ``method`` at each rate of ``lrs``; the rate and history with the smallest final gradient
    norm among the runs that finished every epoch with a finite norm, or ``(nan, None)``."""
    best: tuple[float, dict[str, list[float]] | None] = (math.nan, None)
    for lr in lrs:
        h = train_full_batch(toy_model(setup, seed, x.shape[1]), method, x, y, epochs, lr)
        if len(h["grad_norm"]) < epochs or not math.isfinite(h["grad_norm"][-1]):
            continue
        if best[1] is None or h["grad_norm"][-1] < best[1]["grad_norm"][-1]:
            best = (lr, h)
    return best


def sweep(setups: Sequence[Setup], epochs: int, lrs: Sequence[float] | Mapping[str, Sequence[float]],
          seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Every method of every setup at its best rate of ``lrs`` (one grid, or one per method).

    Returns a table, one row per (setup, method): ``lr``, the :func:`fall` of the gradient norm of the
    theorems (``start``, ``end``, ``decades``, ``slope``) and of the Euclidean one (``e_`` prefix),
    ``final_loss``, the data's :func:`noise_floor`, ``epochs`` and ``geometric`` (``slope <= GEOMETRIC_SLOPE``);
    and the curves, one row per (setup, method, epoch)."""
    rows, curves = [], []
    for s in setups:
        x, y = toy_regression(seed=seed, noise=s.noise)
        floor = noise_floor(x, y)
        for m in s.methods:
            grid = [s.lr_scale * lr for lr in (lrs[m] if isinstance(lrs, Mapping) else lrs)]
            lr, h = best_run(s, m, x, y, epochs, grid, seed)
            row = {"setup": s.name, "method": m, "lr": lr, "epochs": epochs, **fall(h["grad_norm"] if h else []),
                   **{f"e_{k}": v for k, v in fall(h["egrad_norm"] if h else []).items()},
                   "final_loss": h["loss"][-1] if h else math.nan, "noise_floor": floor}
            rows.append(row | {"geometric": bool(row["slope"] <= GEOMETRIC_SLOPE)})
            if h:
                curves.append(pd.DataFrame({"setup": s.name, "method": m, "epoch": np.arange(len(h["loss"])),
                                            "grad_norm": h["grad_norm"], "egrad_norm": h["egrad_norm"],
                                            "loss": h["loss"]}))
    return pd.DataFrame(rows), pd.concat(curves, ignore_index=True) if curves else pd.DataFrame()


def compare_with_paper(table: pd.DataFrame) -> pd.DataFrame:
    """Per method of a :func:`sweep` table (one setup): our start, end and slope beside the figure's."""
    t = table.set_index("method")
    paper = pd.DataFrame(PAPER_FIGURE4).rename(columns=lambda c: f"paper {c}")
    ours = pd.DataFrame({"start": np.log10(t["start"]), "end": np.log10(t["end"]), "slope": t["slope"]})
    return ours.join(paper).rename(index=LABELS)[["start", "paper start", "end", "paper end", "slope", "paper slope"]]


def findings(table: pd.DataFrame, readings: pd.DataFrame, control: Mapping[str, float], predicted: float,
             floor: float) -> list[str]:
    """The conclusions of notebook 03's sections 1-3 as sentences computed from the numbers: ``table``
    the as-stated :func:`sweep`, ``readings`` every run of every reading (``table`` included), the
    :func:`linear_control` and the :func:`noise_floor`. The last sentence is the verdict on Figure 4."""
    ours, P = compare_with_paper(table), PAPER_FIGURE4
    t = table.set_index("method")
    under = int((table["final_loss"] < floor).sum())
    ok = bool(control["slope"] <= GEOMETRIC_SLOPE)
    geo = readings[readings["geometric"]]
    steep = readings.loc[readings["slope"].idxmin()]
    manifold = [P["slope"][m] for m in ("psi-gd", "psi-gdm", "gdg")]
    out = [
        f"As stated, the gradient norm starts at 10^{ours['start'].min():.1f} (the figure: 10^{P['start']['psi-gd']}) "
        f"and ends between 10^{ours['end'].min():.1f} and 10^{ours['end'].max():.1f} (the figure: "
        f"10^{min(P['end'].values())} to 10^{max(P['end'].values())}); second-half slopes {ours['slope'].min():.2f} to "
        f"{ours['slope'].max():.2f} decades per 100 epochs (the figure's manifold methods: {max(manifold)} to "
        f"{min(manifold)}).",
        f"{under} of {len(table)} methods end under the linear least-squares floor {floor:.3f} (final losses "
        f"{table['final_loss'].min():.3f} to {table['final_loss'].max():.3f}).",
        f"Control: GD on linear least squares falls {control['slope']:.2f} decades per 100 epochs (its slowest "
        f"eigen-direction predicts {predicted:.2f}): the measure {'counts' if ok else 'does NOT count'} it as geometric.",
        f"{len(geo)} of {len(readings)} runs in {readings['setup'].nunique()} readings fall at least "
        f"{-GEOMETRIC_SLOPE:.2f} decades per 100 epochs" + (": " + ", ".join(geo["setup"] + " / " + geo["method"])
                                                            if len(geo) else "") +
        f"; the steepest second-half slope is {steep['slope']:.2f} ({steep['setup']}, {LABELS[steep['method']]}).",
    ]
    starts = readings.groupby("setup", sort=False)["start"].median().dropna()
    if len(starts):
        near = (np.log10(starts) - P["start"]["psi-gd"]).abs().idxmin()
        out.append(f"The reading that starts nearest the figure's 10^{P['start']['psi-gd']} is '{near}' "
                   f"(10^{np.log10(starts[near]):.2f}); its steepest second-half slope is "
                   f"{readings.loc[readings['setup'] == near, 'slope'].min():.2f}.")
    if {"gd", "gdm"} <= set(t.index):
        out.append(f"The text's baseline, GD with momentum (rate {t.loc['gdm', 'lr']:g}), ends at {t.loc['gdm', 'end']:.1e} "
                   f"with slope {t.loc['gdm', 'slope']:.2f}; the legend's GD (rate {t.loc['gd', 'lr']:g}) at "
                   f"{t.loc['gd', 'end']:.1e} with slope {t.loc['gd', 'slope']:.2f}.")
    verdict = ("no reading we ran reproduces it" if geo.empty else
               f"{geo['setup'].nunique()} reading(s) give a fall as steep as half the figure's")
    caveats = [] if ok else ["the control failed: do not trust this verdict"]
    if "epochs" in table and int(table["epochs"].max()) != FIGURE4_EPOCHS:
        caveats.append(f"runs of {int(table['epochs'].max())} epochs, not the figure's {FIGURE4_EPOCHS}: "
                       f"their second halves are not the figure's")
    out.append(f"Verdict on Figure 4: {verdict}" + (f" ({'; '.join(caveats)})" if caveats else "") + ".")
    return out


def linear_control(x: Tensor, y: Tensor, epochs: int, lr: float) -> tuple[dict[str, float], float]:
    """A check that :func:`fall` sees a geometric fall where there is one: GD on linear least squares
    (the same data), whose gradient shrinks by ``max_i |1 - lr lambda_i|`` per step (``lambda`` the
    eigenvalues of the Hessian ``2 x^T x / n``). Returns the measured :func:`fall` and the slope
    that the eigenvalues predict (decades per 100 epochs)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(x.shape[1], 1, bias=False), nn.Flatten(0)).to(x.dtype)
    h = train_full_batch(model, "gd", x, y, epochs, lr)
    lam = torch.linalg.eigvalsh(2 * x.T @ x / len(x))
    return fall(h["grad_norm"]), float(100 * torch.log10((1 - lr * lam).abs().max()))


def paper_segments(epochs: int = 200) -> pd.DataFrame:
    """The figure's curves reduced to straight lines from their start to their end (for a dashed overlay)."""
    return pd.DataFrame([{"method": m, "epoch": e, "grad_norm": 10 ** PAPER_FIGURE4[k][m]}
                         for m in PAPER_FIGURE4["end"] for k, e in (("start", 0), ("end", epochs))])


def plot_curves(curves: pd.DataFrame, ax, value: str = "grad_norm", paper: bool = False, title: str = "") -> None:
    """Log-scale curves of ``value`` per method, one color per method (the same in every figure);
    ``paper=True`` overlays :func:`paper_segments` dashed in the same colors."""
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    for m, df in curves.groupby("method", sort=False):
        ax.plot(df["epoch"], df[value], color=colors[m], label=LABELS[m], lw=1.2)
    if paper:
        for m, df in paper_segments(int(curves["epoch"].max()) + 1).groupby("method", sort=False):
            ax.plot(df["epoch"], df["grad_norm"], color=colors[m], ls="--", lw=0.9, alpha=0.8)
    ax.set(yscale="log", xlabel="epoch", ylabel=value.replace("_", " "), title=title)


def plot_readings(curves: pd.DataFrame, value: str = "grad_norm", col_wrap: int = 4):
    """Small multiples of :func:`sweep` curves, one panel per setup (its own epochs), the colors of
    :func:`plot_curves`, log scale; returns seaborn's FacetGrid."""
    import seaborn as sns

    df = curves.assign(method=curves["method"].map(LABELS))
    palette = {LABELS[m]: f"C{i}" for i, m in enumerate(METHODS)}
    g = sns.relplot(df, x="epoch", y=value, hue="method", col="setup", col_wrap=col_wrap, kind="line", height=2.6,
                    estimator=None, palette=palette, hue_order=[LABELS[m] for m in METHODS],
                    facet_kws={"sharex": False, "sharey": False})
    g.set(yscale="log")
    g.set_titles("{col_name}")
    return g


def plot_slopes(table: pd.DataFrame, ax) -> None:
    """Second-half slope (decades per 100 epochs) of every (setup, method) of a :func:`sweep` table, one
    row per setup, beside the band of the figure's manifold methods and the :data:`GEOMETRIC_SLOPE` line."""
    colors = {m: f"C{i}" for i, m in enumerate(METHODS)}
    setups = list(dict.fromkeys(table["setup"]))
    manifold = [PAPER_FIGURE4["slope"][m] for m in ("psi-gd", "psi-gdm", "gdg")]
    ax.axvspan(min(manifold), max(manifold), color="0.85", label="Figure 4: PSI-GD, PSI-GDM, GDG")
    ax.axvline(GEOMETRIC_SLOPE, color="k", ls=":", label="half the figure's slope")
    for k, m in enumerate(METHODS):
        t = table[table["method"] == m]
        ax.scatter(t["slope"], [setups.index(s) + 0.1 * (k - 2.5) for s in t["setup"]], color=colors[m], s=18,
                   label=LABELS[m])
    ax.set_yticks(range(len(setups)), setups)
    ax.invert_yaxis()
    ax.set(xlabel="slope of log10 gradient norm over the second half (decades per 100 epochs)")


def initial_scale_runs(x: Tensor, y: Tensor, scales: Sequence[float], epochs: int, lrs: Mapping[str, float],
                       seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Theorem 1 on the toy regression: GD and PSI-GD, each at its rate of ``lrs``, from the as-stated
    network with ``W2`` multiplied by each of ``scales``. Returns the loss curves (``method``, ``scale``
    as ``"x s"``, ``epoch``, ``loss``) and one row per run: ``final loss`` and the :func:`fall` of the
    gradient norm."""
    rows, falls = [], []
    for method in ("gd", "psi-gd"):
        for s in scales:
            h = train_full_batch(toy_model(Setup("scaled", hidden_scale=s), seed), method, x, y, epochs, lrs[method])
            rows += [{"method": LABELS[method], "scale": f"x {s:g}", "epoch": e, "loss": v} for e, v in enumerate(h["loss"])]
            falls.append({"method": LABELS[method], "scale": s, "final loss": h["loss"][-1], **fall(h["grad_norm"])})
    return pd.DataFrame(rows), pd.DataFrame(falls)


def plot_figure4(curves: pd.DataFrame) -> Figure:
    """Figure 4 as stated: left, the gradient norm of the theorems per method (:func:`sweep` curves) with
    the figure's own curves dashed (:func:`paper_segments`), to compare start, end and slope; right, the
    same runs with the Euclidean gradient norm, to show how much the choice of norm changes the picture."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    plot_curves(curves, axes[0], paper=True, title="Gradient norm of the theorems (dashed: the figure)")
    plot_curves(curves, axes[1], value="egrad_norm", title="The same runs, Euclidean gradient norm")
    axes[0].legend(fontsize=8)
    return fig


def plot_loss_vs_noise_floor(curves: pd.DataFrame, floor: float) -> Figure:
    """The training loss of the :func:`sweep` curves beside the :func:`noise_floor` (dotted): under it a
    run fits the noise of its targets, the phase in which the gradient norms stall."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    plot_curves(curves, ax, value="loss", title="Training loss (MSE) of the runs of section 1")
    ax.axhline(floor, color="k", ls=":", label=f"linear least squares on the same data: {floor:.3f}")
    ax.legend(fontsize=8)
    return fig


def plot_readings_slopes(readings: pd.DataFrame, control: Mapping[str, float]) -> Figure:
    """:func:`plot_slopes` of every reading plus a last row for the :func:`linear_control` (GD on linear
    least squares): which readings, if any, fall as steeply as the figure, next to a fall the measure must see."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5))
    plot_slopes(pd.concat([readings, pd.DataFrame([{"setup": "control: GD, linear least squares", "method": "gd",
                                                    **control}])], ignore_index=True), ax)
    ax.legend(fontsize=7, loc="lower left")
    return fig


def plot_initial_scale(curves: pd.DataFrame) -> Figure:
    """The loss curves of :func:`initial_scale_runs`, one panel per method, one color per initial scale
    (log scale): GD's curve moves with the scale, PSI-GD's should not (Theorem 1)."""
    import seaborn as sns

    g = sns.relplot(curves, x="epoch", y="loss", hue="scale", col="method", kind="line", palette="viridis",
                    height=3.6, aspect=1.2)
    g.set(yscale="log")
    return g.figure
