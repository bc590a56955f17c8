"""Notebook 04's experiment: the CIFAR (or ImageNet) study of section 6.2, from its settings to its figures.

The notebook holds the claim, the parameters and the reading; this module the steps between, each a
function the notebook calls once: :func:`prepare` (settings, data, the run's kernels), :func:`select`
(each optimizer's learning rate on a validation split), :func:`train` (the seeds and named settings,
this shard's share), :func:`summarize` (the finished runs as a table), :func:`plot_curves` and
:func:`what_we_saw`. Every run goes through :func:`psi.engine.trainer.sweep`, so finished runs are
reused and an interrupted study resumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from psi.engine import kernels
from psi.engine.config import Config
from psi.engine.loaders import load_dataset
from psi.engine.trainer import sweep
from psi.paper.notebook import savefig, setup
from psi.study.plan import base_config, check_settings, distinct, select_lrs, study_configs
from psi.study.profiles import parse_shard, study_settings
from psi.study.results import load_metrics, load_runs

__all__ = ["Study", "prepare", "select", "train", "summarize", "curve_points", "plot_curves", "what_we_saw",
           "CURVES"]

# the curves' panels: column of the metrics, title, log scale
CURVES = (("train_loss", "training loss", True), ("test_acc", "test accuracy", False),
          ("psi_norm_mean", "mean neuron norm (scale-invariant layers)", True),
          ("psi_eff_lr", "effective learning rate", True))


@dataclass
class Study:
    """What the notebook's steps share: the settings, the base run, the data, the figures folder, the shard."""

    settings: dict[str, Any]
    base: Config
    data: Any  # a psi.engine.dataset.Dataset, or an image folder's file lists
    fig_dir: Path
    shard: tuple[int, int]
    pairs: list[tuple[str, Config]] | None = None  # (setting, config) once :func:`train` has run


def prepare(profile: str, overrides: dict[str, Any], runs_dir: str, figures_dir: str, shard: str = "1/1",
            threads: int | None = None, data_dir: str | None = None, **engine: Any) -> Study:
    """The study ``profile`` names with ``overrides`` (the notebook's parameters that are not None),
    checked; its base run on the device and with the engine switches given (``device``, ``amp``, ...);
    the dataset loaded. Prints the data, the settings and the kernels that decide the bits."""
    settings = study_settings(profile, **overrides)
    check_settings(settings)
    k_n = parse_shard(shard)
    fig_dir = setup(figures_dir, 0, threads)
    base = base_config(settings, runs_dir, data_dir=data_dir, **engine)
    ds = load_dataset(settings["dataset"], data_dir)
    print(f"data: {ds.name} from {ds.source}: {len(ds.train_y)} training, {len(ds.test_y)} test images")
    print(json.dumps(settings, indent=None))
    print(kernels.describe(profile if base.device == "cpu" else None))  # what decides the bits
    return Study(settings, base, ds, fig_dir, k_n)


def select(st: Study) -> dict[tuple[str, str], float]:
    """Each (model, optimizer)'s learning rate chosen on the validation split (:func:`psi.study.plan.select_lrs`),
    with the figure and table of every rate tried; ``{}`` when the study has no grid."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    selected, tables = select_lrs(st.settings, st.base, st.data)
    if not tables:
        print("no learning-rate grid: every optimizer runs under the named settings", st.settings["paper_settings"])
        return selected
    grid = pd.concat(tables, ignore_index=True)
    g = sns.relplot(grid, x="lr", y="val_acc", hue="optimizer", col="model", kind="line", marker="o", height=3.5)
    g.set(xscale="log", ylabel="validation accuracy")
    savefig(g.figure, st.fig_dir, "lr_selection")
    plt.show()
    _display(grid.pivot_table(index=["model", "lr"], columns="optimizer", values="val_acc"))
    print("chosen:", {f"{m}/{o}": lr for (m, o), lr in selected.items()})
    return selected


def train(st: Study, selected: dict[tuple[str, str], float]) -> list[dict[str, Any]]:
    """The study's runs (several seeds at the chosen rates, ``tuned``, and the paper's named settings at
    Table 3's), this shard's share of them; says which diverged or were left to another process."""
    st.pairs = study_configs(st.settings, st.base, selected)
    unique = distinct(st.pairs)
    k, n = st.shard
    mine = [c.run_dir().name for i, c in enumerate(unique) if i % n == k - 1]
    print(f"{len(unique)} distinct runs for {len(st.pairs)} (setting, seed) pairs; this shard: {k}/{n}"
          + (f", {len(mine)} runs: {' '.join(mine)}" if n > 1 else ""))
    results = sweep(unique, st.shard, dataset=st.data)
    for r in results:
        if "failed" in r:
            print("diverged:", r["failed"])
        if "locked" in r:
            print("skipped, another process is on it:", r["locked"])
    return results


def summarize(st: Study) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The finished runs of this study (every shard's that is done) as a table per (model, setting,
    optimizer, lr): test accuracy over seeds, training loss, epoch time, effective learning rate at the
    start and end; written to ``summary.csv``. A run made once for two settings (a tuned rate equal to
    Table 3's) counts under both labels. Returns the summary and the per-epoch metrics."""
    if st.pairs is None:
        raise RuntimeError("summarize() needs train() first: it reads the runs of the study train() planned")
    runs_dir = st.base.out
    label = pd.DataFrame([{"run": c.run_dir().name, "label": s} for s, c in st.pairs]).drop_duplicates()
    runs = label.merge(load_runs(runs_dir), on="run").drop(columns="setting").rename(columns={"label": "setting"})
    if runs.empty:
        raise RuntimeError("no run of this study has finished yet (other shards may still be running)")
    metrics = load_metrics(runs_dir, list(runs["run"])).drop(columns="setting").merge(
        label.rename(columns={"label": "setting"}), on="run")
    keys = ["model", "setting", "optimizer"]
    summary = runs.groupby([*keys, "lr"]).agg(
        test_acc_mean=("acc", "mean"), test_acc_std=("acc", "std"), n=("acc", "count"),
        final_train_loss=("final_train_loss", "mean"), epoch_seconds=("epoch_seconds", "mean")).reset_index()
    eff = metrics.groupby(["run"])["psi_eff_lr"].agg(["first", "last"]).rename(
        columns={"first": "eff_lr_start", "last": "eff_lr_end"}).reset_index().merge(runs[["run", *keys]])
    summary = summary.merge(eff.groupby(keys)[["eff_lr_start", "eff_lr_end"]].mean().reset_index())
    summary.to_csv(st.fig_dir / "summary.csv", index=False)
    return summary, metrics


def curve_points(metrics: pd.DataFrame, trace: pd.DataFrame) -> pd.DataFrame:
    """The points of :func:`plot_curves` against the training images seen: a run's in-epoch trace
    (``trace``, :func:`psi.study.results.load_metrics` with ``trace=True``) where it recorded one, its
    epoch rows otherwise, and its test accuracy at the epochs' ends; ``optimizer / setting`` labels them."""
    labels = metrics[["run", "setting"]].drop_duplicates()
    traced = trace.drop(columns="setting", errors="ignore").merge(labels, on="run") if not trace.empty else trace
    untraced = metrics[~metrics["run"].isin(set(traced["run"]) if not traced.empty else set())]
    acc = metrics.dropna(subset=["test_acc"])[["run", "model", "optimizer", "setting", "seed", "images", "test_acc"]]
    points = pd.concat([traced, untraced.drop(columns="test_acc"), acc], ignore_index=True)
    return points.assign(**{"optimizer / setting": points["optimizer"] + " / " + points["setting"]})


def plot_curves(st: Study, metrics: pd.DataFrame) -> None:
    """Per model, the four panels of :data:`CURVES` against the training images seen, one line per
    optimizer and setting (the mean over seeds with seaborn's 95% band): the loss, norm and rate at the
    points the runs traced every few steps (:func:`curve_points`), so a 1-epoch run has a curve too;
    saved as ``curves_<model>``."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    m = curve_points(metrics, load_metrics(st.base.out, list(metrics["run"].unique()), trace=True))
    for model in st.settings["models"]:
        fig, axes = plt.subplots(2, 2, figsize=(12, 8))
        for ax, (col, title, log) in zip(axes.flat, CURVES):
            sub = m[(m["model"] == model)].dropna(subset=[col])
            sns.lineplot(sub, x="images", y=col, hue="optimizer / setting", ax=ax, legend=ax is axes[0, 0],
                         marker="o" if sub["images"].nunique() < 6 else None)
            ax.set(title=title, xlabel="training images seen")
            if log and not sub.empty:
                ax.set_yscale("log")
        fig.suptitle(f"{st.settings['dataset']} {model}: {st.settings['epochs']} epochs, "
                     f"subset {st.settings['subset'] or 'all'}")
        fig.tight_layout()
        savefig(fig, st.fig_dir, f"curves_{model}")
        plt.show()


def what_we_saw(st: Study, summary: pd.DataFrame) -> None:
    """Per model and setting, every optimizer's mean test accuracy, its gap to SGD and its effective
    learning rate from start to end."""
    for (model, setting), grp in summary.groupby(["model", "setting"]):
        sgd = grp[grp.optimizer == "sgd"]
        print(f"{model}, {setting}:")
        for _, r in grp.sort_values("test_acc_mean", ascending=False).iterrows():
            gap = "" if sgd.empty or r.optimizer == "sgd" else f", {r.test_acc_mean - sgd.test_acc_mean.iloc[0]:+.2f} vs sgd"
            print(f"  {r.optimizer:9s} lr {r.lr:<6g} test acc {r.test_acc_mean:.2f} +- {r.test_acc_std:.2f} "
                  f"(n={r.n}){gap}; effective lr {r.eff_lr_start:.3g} -> {r.eff_lr_end:.3g}")
    print(f"(data: {st.data.source}; notebook 05 tests the differences and sets them beside Table 1)")


def _display(table: pd.DataFrame) -> None:
    """A table shown as Jupyter shows a cell's value (printed outside Jupyter)."""
    try:
        from IPython.display import display
    except ImportError:  # pragma: no cover - IPython comes with the notebooks' requirements
        print(table)
    else:
        display(table)

