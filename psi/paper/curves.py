"""Training curves of finished CIFAR runs in the layout of the paper's figures.

Figure 3 (p. 1134) shows each method's training curves on CIFAR-10 and CIFAR-100; the
supplement's Figures 5 and 6 (pp. 18-19) show, per dataset, one row per ResNet depth with the
"first and last two columns ... obtained with or without regularizer": training loss and test
accuracy under ``table2``, then under ``table1``. :func:`curve_grid` draws that layout for any
settings and models the runs hold (mean over seeds, 95% band), from :func:`psi.study.results.load_metrics`.
"""

from __future__ import annotations

import pandas as pd

__all__ = ["FIGURE_OF_DATASET", "design_of", "curve_grid"]

# The supplement's figure for each dataset (Figure 5: CIFAR-10, Figure 6: CIFAR-100)
FIGURE_OF_DATASET = {"cifar10": 5, "cifar100": 6}


def design_of(metrics: pd.DataFrame) -> pd.Series:
    """Each row's design, images x epochs as :class:`psi.study.design.Design` writes it (``15000x1``;
    ``all`` for every training image), from the runs' ``subset`` and ``epochs``."""
    subset = metrics["subset"].fillna(0).astype(int)
    return subset.map(lambda n: str(n) if n else "all") + "x" + metrics["epochs"].astype(int).astype(str)


def curve_grid(metrics: pd.DataFrame, settings: list[str], title: str = ""):
    """One row per model, and for each of ``settings`` two columns: training loss (log) and test
    accuracy, each optimizer a line. ``metrics`` holds one dataset's per-epoch rows (``epoch``
    counted from 1, ``model``, ``setting``, ``optimizer``, ``train_loss``, ``test_acc``; a run
    evaluated only at its end gives one point, drawn as a marker). Where it holds runs of several
    designs (its ``subset`` and ``epochs``, :func:`design_of`) each (optimizer, design) is its own line,
    the design its dash and marker: a mean over different designs would be no run's curve. Returns the figure."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    models = sorted(metrics["model"].unique(), key=lambda m: (len(m), m))
    fig, axes = plt.subplots(len(models), 2 * len(settings), figsize=(4.2 * 2 * len(settings), 3.4 * len(models)),
                             squeeze=False)
    hue_order = sorted(metrics["optimizer"].unique())
    if {"subset", "epochs"} <= set(metrics.columns) and design_of(metrics).nunique() > 1:
        metrics = metrics.assign(design=design_of(metrics))
        style = {"style": "design", "style_order": sorted(metrics["design"].unique(), key=lambda d: d.split("x")[::-1]),
                 "markers": True}
    else:
        style = {}
    for i, model in enumerate(models):
        for j, setting in enumerate(settings):
            m = metrics[(metrics.model == model) & (metrics.setting == setting)]
            loss_ax, acc_ax = axes[i, 2 * j], axes[i, 2 * j + 1]
            legend = i == 0 and j == 0
            if not m.empty:
                few = {} if style else {"marker": "o" if m["epoch"].nunique() < 6 else None}
                sns.lineplot(m, x="epoch", y="train_loss", hue="optimizer", hue_order=hue_order, ax=loss_ax,
                             legend=legend, **style, **few)
                acc = m.dropna(subset=["test_acc"])
                sns.lineplot(acc, x="epoch", y="test_acc", hue="optimizer", hue_order=hue_order, ax=acc_ax,
                             legend=False, **style, **({} if style else {
                                 "marker": "o" if acc["epoch"].nunique() < 6 else None}))
            loss_ax.set(yscale="log" if not m.empty else "linear", title=f"{model}, {setting}: training loss")
            acc_ax.set(title=f"{model}, {setting}: test accuracy")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
