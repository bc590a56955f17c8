"""Notebook 05's analysis: every finished run beside its paper table, paired differences against SGD,
the curves, epoch times and a verdict written from the numbers. The notebook calls these in order;
each writes its file to the figures folder. Runs made under different CPU kernels (:mod:`psi.engine.kernels`)
are kept apart everywhere: a table row, a pair and a verdict line each hold one kernels label."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psi.paper.curves import FIGURE_OF_DATASET, curve_grid
from psi.study.results import (
    PAPER_EPOCH_SECONDS,
    PAPER_TABLE_OF,
    PAPER_TABLES,
    compare,
    label_tuned,
    load_metrics,
    load_runs,
    not_run,
)
from psi.study.selection import read_selected_files
from psi.study.stats import judge, paired

__all__ = ["load", "summary_line", "table", "paired_tests", "figures", "epoch_times", "cost_text", "verdict",
           "copy_to"]
_ORDER = ["sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm", "sgdp"]


def load(runs_dir: str | os.PathLike, alpha: float = 0.05,
         power: float = 0.8) -> tuple[pd.DataFrame, pd.DataFrame, dict[tuple[str, str, str], float]]:
    """Every finished run under ``runs_dir`` (:func:`psi.study.results.load_runs`), those scored on the test
    set with the ``table1`` runs a selection chose again labelled ``tuned`` (:func:`label_tuned`),
    and the rates the selection chose. Checks the notebook's parameters."""
    if not 0 < alpha < 1:
        raise ValueError(f"parameter alpha={alpha!r} must be between 0 and 1")
    if not 0 < power < 1:
        raise ValueError(f"parameter power={power!r} must be between 0 and 1")
    runs = load_runs(runs_dir)
    if runs.empty:
        raise FileNotFoundError(f"no finished run under {Path(runs_dir).resolve()}: run notebook 04 (or python -m "
                                f"psi.train --out {runs_dir}) first, or pass runs_dir")
    runs["subset"] = runs["subset"].fillna(0).astype(int)  # 0: every training image
    chosen = read_selected_files(runs_dir)
    # a tuned rate equal to Table 3's: the study made those runs once, for table1 and tuned alike
    return runs, label_tuned(runs[runs.split == "test"], chosen), chosen


def summary_line(runs: pd.DataFrame, test: pd.DataFrame, chosen: dict[tuple[str, str, str], float]) -> str:
    """What was read: the rates chosen, the runs, their data and the CPU kernels they ran under."""
    rates = ("learning rates the selection chose (setting tuned): "
             + str({f"{d}/{m}/{o}": lr for (d, m, o), lr in chosen.items()}) + "\n") if chosen else ""
    return (rates + f"{len(runs)} finished runs ({(runs.split == 'test').sum()} scored on the test set) from "
            f"{sorted(set(runs.source))}; settings: {sorted(set(test.setting))}; {test.shared.sum()} table1 runs count "
            f"as tuned too; CPU kernels: {dict(runs.kernels.value_counts().sort_index())}")


def _cell(r: pd.Series) -> str:
    ours = f"{r['mean']:.2f} ± {0 if np.isnan(r['std']) else r['std']:.2f} (n={r['count']}, lr {r.lr:g})"
    paper = "" if np.isnan(r.paper_mean) else f"; paper {r.paper_mean:.2f} ({r['diff']:+.2f})"
    return ours + paper


def _gap(models: pd.DataFrame) -> str:  # a model with none of its cells run, or the methods missing for it
    return ", ".join(m if len(o) == 5 else f"{m} ({', '.join(sorted(o))})"
                     for m, o in sorted(models.groupby("model").optimizer, key=lambda kv: (len(kv[0]), kv[0])))


def table(test: pd.DataFrame, fig_dir: str | os.PathLike) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Our runs beside the paper's table for each setting (:func:`psi.study.results.compare`), in Table 1's
    layout, one row per CPU kernels label too; writes ``table1.csv``, ``table1.md`` and ``not_run.csv``
    (the paper's cells no run covers). Returns the long table, the layout and the lines of cells not run."""
    fig_dir = Path(fig_dir)
    t = compare(test)
    t["cell"] = t.apply(_cell, axis=1)
    layout = t.pivot_table(index=["dataset", "setting", "paper_table", "epochs", "subset", "model", "kernels"],
                           columns="optimizer", values="cell", aggfunc="first")
    layout = layout[[o for o in _ORDER if o in layout.columns]]
    layout.to_csv(fig_dir / "table1.csv")
    missing = not_run(test)  # ImageNet's unless the imagenet profile ran
    missing.to_csv(fig_dir / "not_run.csv", index=False)
    gaps = [f"- {k[0]}, {k[1]}: {_gap(g)} (not run)" for k, g in missing.groupby(["paper_table", "dataset"])]
    (fig_dir / "table1.md").write_text(layout.reset_index().to_markdown(index=False)
                                       + "\n\nThe paper's rows not run here:\n" + "\n".join(gaps) + "\n")
    return t, layout, gaps


def _paper_diff(setting: str, dataset: str, model: str, a: str, b: str = "sgd") -> float:
    paper = PAPER_TABLES.set_index(["paper_table", "dataset", "model", "optimizer"])["paper_mean"]
    keys = [(PAPER_TABLE_OF[setting], dataset, model, o) for o in (a, b)]
    return paper[keys[0]] - paper[keys[1]] if all(k in paper.index for k in keys) else np.nan


def paired_tests(test: pd.DataFrame, alpha: float = 0.05, power: float = 0.8,
                 fig_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Each method minus SGD at the same seed (:func:`psi.study.stats.paired`) per dataset, model, setting,
    length, subset and CPU kernels (pairs never span two kernels), beside the paper's difference and a
    verdict (:func:`psi.study.stats.judge`); written to ``paired.csv`` when there is any."""
    rows = []
    keys = ["dataset", "model", "setting", "epochs", "subset", "kernels"]
    for (dataset, model, st, epochs, subset, _), grp in test.groupby(keys):
        for opt in [o for o in _ORDER[1:] if o in set(grp.optimizer)]:
            if "sgd" in set(grp.optimizer):
                p = paired(grp, opt, "sgd", alpha, power)
                gap = _paper_diff(st, dataset, model, opt)
                rows.append({"dataset": dataset, "model": model, "setting": st, "epochs": epochs, "subset": subset,
                             "optimizer": opt, **p, "paper_diff": gap, "verdict": judge(p, gap)})
    tests = pd.DataFrame(rows)
    if fig_dir is not None and not tests.empty:
        tests.to_csv(Path(fig_dir) / "paired.csv", index=False)
    return tests


def figures(runs_dir: str | os.PathLike, test: pd.DataFrame) -> list[tuple[str, Any]]:
    """Figure 3 (each method without a regularizer: ``table1``, ``tuned``) and the supplement's Figures
    5-6 (``table2``, then ``table1``) per dataset, as ``(name, figure)``."""
    metrics = load_metrics(runs_dir, list(test.run)).drop(columns=["setting", "epochs", "subset"], errors="ignore").merge(
        test[["run", "dataset", "setting", "epochs", "subset"]], on="run")  # a shared run under each label it has
    metrics["epoch"] += 1
    out = []
    for dataset, md in metrics.groupby("dataset"):
        present = set(md.setting)
        settings = [s for s in ("table1", "tuned") if s in present]
        if settings:
            out.append((f"figure3_{dataset}", curve_grid(md, settings, f"Figure 3, {dataset}: rates as each run "
                                                                         f"recorded")))
        if "table2" in present and dataset in FIGURE_OF_DATASET:
            n = FIGURE_OF_DATASET[dataset]
            out.append((f"figure{n}_{dataset}", curve_grid(md, [s for s in ("table2", "table1") if s in present],
                                                           f"Figure {n}, {dataset}")))
    return out


MIN_TIMED_EPOCHS = 2  # a run's timed epochs (warm-up left out) below which its epoch time is not trusted
MIN_SEEDS = 2  # paired seeds below which a ratio has no spread to show


def cost_text(ratios: pd.Series | np.ndarray | list[float], timed_epochs: int) -> str:
    """A method's epoch time over SGD's, from the ratios of its seeds (each the method's run over SGD's run
    at the same seed and setting): ``median (min-max over n seeds)``. The rule: fewer than
    :data:`MIN_TIMED_EPOCHS` timed epochs in the shortest run, or fewer than :data:`MIN_SEEDS` seeds, is
    "too short to time"; a min-max range that holds 1 (the spread larger than the effect) is said to be
    no measurable difference."""
    r = np.asarray(ratios, dtype=float)
    if timed_epochs < MIN_TIMED_EPOCHS or len(r) < MIN_SEEDS:
        return (f"too short to time ({timed_epochs} timed epoch{'s' * (timed_epochs != 1)} per run, {len(r)} "
                f"seed{'s' * (len(r) != 1)}; needs {MIN_TIMED_EPOCHS} and {MIN_SEEDS})")
    lo, hi = r.min(), r.max()
    text = f"{np.median(r):.3f}x SGD's epoch time (range {lo:.3f}-{hi:.3f} over {len(r)} seeds)"
    return text + ("; the range holds 1: no measurable difference" if lo <= 1 <= hi else "")


def epoch_times(test: pd.DataFrame, fig_dir: str | os.PathLike | None = None) -> pd.DataFrame:
    """Per dataset, model, design (epochs, subset), CPU kernels and method: the median seconds per training
    epoch, the ratios to SGD's run at the same seed and setting (median, min, max, seeds, :func:`cost_text`)
    and the paper's ratio (section 6.2, ResNet-56, V100); written to ``epoch_times.csv``."""
    keys = ["dataset", "model", "epochs", "subset", "kernels"]
    t = test.assign(timed_epochs=test["timed_epochs"] if "timed_epochs" in test else test["epochs"])
    sgd = t[t.optimizer == "sgd"][[*keys, "setting", "seed", "run", "epoch_seconds"]]
    pairs = t.merge(sgd, on=[*keys, "setting", "seed"], suffixes=("", "_sgd"))
    pairs = pairs.drop_duplicates(["run", "run_sgd"])  # a run shared by table1 and tuned counts once
    pairs["ratio"] = pairs.epoch_seconds / pairs.epoch_seconds_sgd
    rows = []
    for k, g in pairs.groupby([*keys, "optimizer"]):
        timed = int(min(g.timed_epochs.min(), t[(t.optimizer == "sgd") & (t.run.isin(g.run_sgd))].timed_epochs.min()))
        rows.append({**dict(zip([*keys, "optimizer"], k)), "epoch_seconds": g.epoch_seconds.median(),
                     "seeds": len(g), "timed_epochs": timed, "ratio to sgd": g.ratio.median(),
                     "ratio min": g.ratio.min(), "ratio max": g.ratio.max(), "cost": cost_text(g.ratio, timed)})
    times = pd.DataFrame(rows, columns=[*keys, "optimizer", "epoch_seconds", "seeds", "timed_epochs",
                                        "ratio to sgd", "ratio min", "ratio max", "cost"])
    times["paper ratio (ResNet-56, V100)"] = times.optimizer.map(
        lambda o: PAPER_EPOCH_SECONDS.get(o, np.nan) / PAPER_EPOCH_SECONDS["sgd"])
    if fig_dir is not None:
        times.to_csv(Path(fig_dir) / "epoch_times.csv", index=False)
    return times


def verdict(test: pd.DataFrame, tests: pd.DataFrame, t: pd.DataFrame, times: pd.DataFrame, alpha: float = 0.05,
            power: float = 0.8) -> str:
    """The verdict, one line per scale, paired difference, cell beside the paper and cost."""
    lines = []
    scale = test.groupby(["dataset", "model", "epochs", "subset"]).agg(
        seeds=("seed", "nunique"), kernels=("kernels", lambda k: ", ".join(sorted(set(k))))).reset_index()
    for _, s in scale.iterrows():
        epochs, seeds = (100, 3) if s.dataset == "imagenet" else (200, 5)  # section 6.2 and Table 1's caption
        lines.append(f"- Scale of {s.dataset} {s.model}: {s.epochs} epochs (the paper: {epochs}), "
                     f"{s.subset or 'all'} training images, up to {s.seeds} seeds (the paper: {seeds}); CPU kernels: "
                     f"{s.kernels}.")
    for _, r in tests.iterrows():
        lines.append(f"- {r.optimizer} vs SGD on {r.dataset} {r.model} ({r.setting}, {r.epochs} epochs of "
                     f"{r.subset or 'all'} images, beside the paper's {PAPER_TABLE_OF[r.setting]}): "
                     f"{r['diff']:+.2f} points, {1 - alpha:.0%} CI [{r.ci_low:+.2f}, "
                     f"{r.ci_high:+.2f}] over {r.n} paired seeds; the smallest effect this design detects at "
                     f"{power:.0%} power is {r.mde:.2f} points; {r.verdict}.")
    for _, r in t[t.paper_mean.notna()].iterrows():
        lines.append(f"- {r.optimizer} on {r.dataset} {r.model} ({r.setting}): {r['mean']:.2f} against the paper's "
                     f"{r.paper_mean:.2f} in its {r.paper_table} ({r['diff']:+.2f}; {r.epochs} epochs, subset "
                     f"{r.subset or 'all'}).")
    for _, r in times[times.optimizer.isin(["psi-sgd", "psi-sgdm"])].iterrows():
        lines.append(f"- Cost: {r.optimizer} on {r.dataset} {r.model} ({r.epochs} epochs of {r.subset or 'all'} "
                     f"images): {r.cost} (paper: {r['paper ratio (ResNet-56, V100)']:.3f}x).")
    return "\n".join(lines)


def copy_to(fig_dir: str | os.PathLike, reference_dir: str | os.PathLike) -> Path:
    """Copy the tables, tests, figures (PNG) and verdict to ``reference_dir`` (e.g. reference/quick)."""
    ref = Path(reference_dir)
    ref.mkdir(parents=True, exist_ok=True)
    for f in Path(fig_dir).iterdir():
        if f.suffix != ".svg":  # PNG is enough for the record
            shutil.copy(f, ref / f.name)
    return ref
