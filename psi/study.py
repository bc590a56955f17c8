"""Studies over many runs: learning-rate selection on a validation split and its files, collection of
finished runs by what they recorded, the paper's Tables 1 and 2 as data, paired comparisons.
Used by notebooks 04 and 05 and :mod:`psi.grid`.

Paired, not unpaired: at a given seed every optimizer starts from the same initial weights (SGDG's
scaled to unit norm: the same network under BN) and sees the same batches and augmentations
(``tests/test_settings.py`` checks it: with every learning rate near zero all optimizers give the
same training losses), so seed-to-seed variation common to both cancels in the difference.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import kernels
from .train import Config, read_metrics, sweep

__all__ = ["PAPER_TABLE1", "PAPER_TABLE2", "PAPER_TABLES", "PAPER_SOURCES", "PAPER_TABLE_OF", "PAPER_EPOCH_SECONDS",
           "selection_config", "select_lr", "write_selected", "read_selected_files", "load_runs", "load_metrics",
           "label_tuned", "not_run", "compare", "paired", "min_detectable", "judge", "MixedKernels",
           "check_same_kernels"]

_ALGOS = ("sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm")
# Table 1 (p. 1134 of the proceedings, page 7 of the PDF): mean and std of the test accuracy in %,
# 5 runs (ImageNet: 3), 200 epochs (ImageNet: 100), no regularizer. ImageNet's rows are data here
# but not run by this project's studies (notebook 05 lists them as "not run").
_T1 = {
    ("cifar10", "resnet20"): (91.14, 0.10, 89.90, 0.17, 91.38, 0.21, 92.25, 0.03, 92.41, 0.12),
    ("cifar10", "resnet32"): (91.32, 0.23, 90.40, 0.32, 92.48, 0.35, 93.56, 0.08, 93.30, 0.14),
    ("cifar10", "resnet44"): (91.95, 0.14, 91.02, 0.18, 92.99, 0.12, 93.90, 0.16, 93.39, 0.11),
    ("cifar10", "resnet56"): (92.19, 0.21, 91.49, 0.12, 93.11, 0.16, 94.08, 0.15, 93.90, 0.16),
    ("cifar100", "resnet20"): (65.53, 0.51, 63.35, 0.06, 68.19, 0.24, 69.11, 0.07, 68.41, 0.21),
    ("cifar100", "resnet32"): (67.41, 0.21, 64.43, 0.11, 70.13, 0.28, 70.81, 0.08, 70.14, 0.13),
    ("cifar100", "resnet44"): (67.72, 0.31, 65.03, 0.38, 71.32, 0.12, 71.94, 0.21, 72.03, 0.14),
    ("cifar100", "resnet56"): (68.02, 0.26, 65.77, 0.13, 71.46, 0.06, 72.88, 0.24, 72.40, 0.16),
    ("imagenet", "resnet18"): (67.72, 0.12, 68.16, 0.13, 68.97, 0.05, 70.38, 0.06, 69.42, 0.06),
    ("imagenet", "resnet34"): (71.30, 0.08, 70.68, 0.05, 72.40, 0.12, 73.31, 0.08, 72.88, 0.12),
    ("imagenet", "resnet50"): (73.46, 0.14, 74.00, 0.16, 74.67, 0.14, 74.67, 0.12, 75.11, 0.05),
}
# Table 2 (supplement p. 17): test accuracy in % with the L2 regularizer, means only (no std is
# printed); ``elsewhere`` is the number it gives in parentheses for SGD, from He et al. 2016
# (CIFAR-10) and Huang et al. 2017 (CIFAR-100).
_T2 = {
    ("cifar10", "resnet20"): (92.35, 90.89, 91.99, 92.49, 92.70, 91.25),
    ("cifar10", "resnet32"): (93.64, 91.83, 92.53, 93.75, 93.80, 92.49),
    ("cifar10", "resnet44"): (93.74, 91.85, 93.30, 94.15, 93.92, 92.83),
    ("cifar10", "resnet56"): (94.19, 91.78, 93.37, 93.98, 93.99, 93.03),
    ("cifar100", "resnet20"): (68.62, 65.66, 68.67, 69.62, 69.64, 67.72),
    ("cifar100", "resnet32"): (70.67, 67.72, 70.49, 71.21, 71.07, 69.38),
    ("cifar100", "resnet44"): (71.31, 68.24, 71.49, 72.03, 72.00, 70.05),
    ("cifar100", "resnet56"): (72.44, 68.78, 71.56, 73.05, 72.62, 70.93),
}
PAPER_TABLE1 = pd.DataFrame(
    [dict(paper_table="Table 1", dataset=d, model=m, optimizer=a, paper_mean=v[2 * i], paper_std=v[2 * i + 1])
     for (d, m), v in _T1.items() for i, a in enumerate(_ALGOS)])
PAPER_TABLE2 = pd.DataFrame(
    [dict(paper_table="Table 2", dataset=d, model=m, optimizer=a, paper_mean=v[i], paper_std=np.nan,
          elsewhere=v[5] if a == "sgd" else np.nan)
     for (d, m), v in _T2.items() for i, a in enumerate(_ALGOS)])
PAPER_TABLES = pd.concat([PAPER_TABLE1, PAPER_TABLE2], ignore_index=True)
PAPER_SOURCES = {
    "Table 1": "Yi 2022, Table 1, p. 1134 (page 7 of the PDF): no regularizer; mean ± std of 5 runs, 200 epochs "
               "(ImageNet: 3 runs, 100 epochs)",
    "Table 2": "Yi 2022, supplement Table 2, p. 17: L2 regularizer in the loss (SGDG: Cho and Lee's); means only",
}
PAPER_TABLE_OF = {"table1": "Table 1", "tuned": "Table 1", "table2": "Table 2"}  # each setting's own table
# Section 6.2 (p. 1135): seconds per epoch, ResNet-56 on CIFAR-10, one V100.
PAPER_EPOCH_SECONDS = {"sgd": 16.98, "adam": 18.1, "sgdg": 26.6, "psi-sgd": 18.2, "psi-sgdm": 18.5}


# -- learning-rate selection and its files ----------------------------------------------------

def selection_config(base: Config, optimizer: str, lr: float, val_size: int, seed: int = 0,
                     subset: int | None = None) -> Config:
    """A run of the selection: ``optimizer`` at ``lr`` under the setting ``tuned``, scored on a
    validation split of ``val_size`` training images (one definition for the study and the grid
    tool); ``subset``, when given, trains it on that many of the other images instead of the
    study's subset (a cheaper selection: same epochs and schedule, fewer images)."""
    return replace(base, optimizer=optimizer, setting="tuned", lr=lr, val_size=val_size, seed=seed,
                   subset=subset or base.subset, eval_every=0)


def _final(summary: dict[str, Any], split: str) -> float:
    return summary[f"final_{split}_acc"]


def select_lr(base: Config, optimizer: str, grid: list[float], val_size: int, seed: int = 0,
              dataset=None, extend: int = 2, subset: int | None = None) -> tuple[float, pd.DataFrame]:
    """Train ``optimizer`` at every ``lr`` of ``grid`` on the training images minus a
    class-balanced validation split of ``val_size``; return the lr with the best final
    validation accuracy (the test set is not looked at) and the table of all.

    When the best rate is at an end of the grid, the grid is extended beyond that end by its
    own ratio (3x for ``[0.1, 0.3, 1]``), at most ``extend`` times: a best rate at the edge says
    the optimum may lie outside."""
    grid = sorted(grid)
    ratio = grid[1] / grid[0] if len(grid) > 1 else 3.0
    acc: dict[float, float] = {}
    while True:
        todo = [lr for lr in grid if lr not in acc]
        cfgs = [selection_config(base, optimizer, lr, val_size, seed, subset) for lr in todo]
        for cfg, s in zip(cfgs, sweep(cfgs, dataset=dataset), strict=True):
            acc[cfg.lr] = _final(s, "val") if "failed" not in s else np.nan
        finite = {lr: a for lr, a in acc.items() if not np.isnan(a)}
        if not finite:
            raise RuntimeError(f"{optimizer}: every learning rate of {grid} diverged; extend the grid downwards")
        best = max(finite, key=finite.get)
        if extend and best == grid[0]:
            grid.insert(0, float(f"{grid[0] / ratio:.3g}"))
        elif extend and best == grid[-1]:
            grid.append(float(f"{grid[-1] * ratio:.3g}"))
        else:
            break
        extend -= 1
    table = pd.DataFrame([{"optimizer": optimizer, "lr": lr, "val_acc": acc[lr], "diverged": np.isnan(acc[lr])}
                          for lr in grid])
    return best, table


def _selected_path(runs_dir: str | os.PathLike, dataset: str, model: str) -> Path:
    return Path(runs_dir) / f"selected_lr-{dataset}-{model}.json"


def write_selected(runs_dir: str | os.PathLike, dataset: str, model: str, chosen: dict[str, float]) -> Path:
    """Record the rates a selection chose, ``{optimizer: lr}``, as ``selected_lr-<dataset>-<model>.json``
    in the runs folder (atomically: a concurrent reader sees the old file or the new one)."""
    path = _selected_path(runs_dir, dataset, model)
    tmp = path.with_suffix(f".json.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(chosen, indent=1))
    os.replace(tmp, path)
    return path


def read_selected_files(runs_dir: str | os.PathLike) -> dict[tuple[str, str, str], float]:
    """Every rate the selection files of ``runs_dir`` hold: ``{(dataset, model, optimizer): lr}``
    (dataset and model names hold no ``-``)."""
    out = {}
    for p in sorted(Path(runs_dir).glob("selected_lr-*.json")):
        _, dataset, model = p.stem.split("-", 2)
        for opt, lr in json.loads(p.read_text()).items():
            out[(dataset, model, opt)] = float(lr)
    return out


# -- finished runs, read from what they recorded ----------------------------------------------

def _recorded(run_dir: Path) -> dict[str, Any] | None:
    """A run's ``config.json`` when it records its setting and groups, else None."""
    path = run_dir / "config.json"
    c = json.loads(path.read_text()) if path.is_file() else {}
    return c if "setting" in c and "groups" in c else None


def _method_group(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """The group the named method updates (``all`` for SGD/SGDP, else ``psi``)."""
    return next(g for g in groups if g.get("name") in ("all", "psi"))


def _warn_unrecorded(names: list[str], runs_dir: str | os.PathLike) -> None:
    if names:
        warnings.warn(f"{len(names)} finished runs under {runs_dir} do not record their setting and optimizer groups "
                      f"(made before runs did), e.g. {names[0]}: left out; train them again to include them",
                      stacklevel=3)


def _kernels_of(config: dict[str, Any], summary: dict[str, Any]) -> str:
    """The kernels a run was made under (:func:`psi.kernels.label`): the finishing process's record,
    else the starting one's; :data:`psi.kernels.UNRECORDED` for a run made before runs recorded it."""
    return kernels.label(summary.get("kernels") or config.get("kernels"))


def load_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run folder under ``runs_dir`` (those with a ``summary.json``): its
    setting and the named method's learning rate as the run recorded them (``config.json``), never
    today's defaults, and the CPU kernels it ran under (``kernels``, :func:`psi.kernels.label`:
    ``unrecorded`` for runs made before runs recorded them). Runs that record neither setting nor
    groups are left out, with a warning."""
    rows, unrecorded = [], []
    for p in sorted(Path(runs_dir).glob("*/summary.json")):
        c = _recorded(p.parent)
        if c is None:
            unrecorded.append(p.parent.name)
            continue
        s = json.loads(p.read_text())
        split = "val" if c.get("val_size") else "test"
        rows.append({"run": p.parent.name, "dataset": c["dataset"], "model": c["model"], "optimizer": c["optimizer"],
                     "setting": c["setting"], "seed": c["seed"], "lr": _method_group(c["groups"])["lr"],
                     "epochs": c["epochs"], "subset": c["subset"], "split": split,
                     "acc": 100 * _final(s, split), "best_acc": 100 * s[f"best_{split}_acc"],
                     "final_train_loss": s["final_train_loss"], "epoch_seconds": s["mean_epoch_seconds"],
                     "source": s.get("data_source"), "kernels": _kernels_of(c, s)})
    _warn_unrecorded(unrecorded, runs_dir)
    return pd.DataFrame(rows)


def load_metrics(runs_dir: str | Path, run_names: list[str] | None = None) -> pd.DataFrame:
    """Per-epoch metrics of runs (all recorded ones by default), with the run's identity and its
    recorded setting and learning rate (``lr_base``)."""
    frames, unrecorded = [], []
    for p in sorted(Path(runs_dir).glob("*/metrics.jsonl")):
        if run_names is not None and p.parent.name not in run_names:
            continue
        c = _recorded(p.parent)
        if c is None:
            unrecorded.append(p.parent.name)
            continue
        rows = read_metrics(p)
        for r in rows:
            layers = r.pop("psi_layers", {})
            if layers:
                r["psi_norm_mean"] = float(np.mean([v["norm_mean"] for v in layers.values()]))
                r["psi_eff_lr"] = float(np.nanmean([v["eff_lr"] for v in layers.values()])) \
                    if not all(np.isnan(v["eff_lr"]) for v in layers.values()) else np.nan
            r.update(run=p.parent.name, optimizer=c["optimizer"], model=c["model"], seed=c["seed"],
                     setting=c["setting"], lr_base=_method_group(c["groups"])["lr"])
        frames.append(pd.DataFrame(rows))
    _warn_unrecorded(unrecorded, runs_dir)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def label_tuned(runs: pd.DataFrame, chosen: dict[tuple[str, str, str], float]) -> pd.DataFrame:
    """``runs`` plus, for every ``(dataset, model, optimizer)`` whose chosen rate (``chosen``, as
    :func:`read_selected_files` gives it) equals the rate its ``table1`` runs recorded, those runs
    again labelled ``tuned``: the study made them once for both (:func:`psi.grid.study_configs`).
    Where runs of the setting ``tuned`` exist for that rate they are the tuned ones and nothing is
    added (``shared`` says which rows are copies)."""
    runs = runs.assign(shared=False)
    extra = []
    for (dataset, model, opt), lr in chosen.items():
        same = (runs.dataset == dataset) & (runs.model == model) & (runs.optimizer == opt) & (runs.lr == lr)
        if not (same & (runs.setting == "tuned")).any():
            extra.append(runs[same & (runs.setting == "table1")].assign(setting="tuned", shared=True))
    return pd.concat([runs, *extra], ignore_index=True)


def not_run(runs: pd.DataFrame) -> pd.DataFrame:
    """The paper's cells (table, dataset, model, optimizer) that no run of ``runs`` scored on the
    test set covers, whatever its setting or length: what a reader must not look for in our tables
    (ImageNet's rows unless ImageNet runs exist; every CIFAR cell of a profile that did not run it)."""
    test = runs[runs["split"] == "test"] if "split" in runs else runs
    done = {(PAPER_TABLE_OF[s], d, m, o) for s, d, m, o in zip(test.setting, test.dataset, test.model, test.optimizer)}
    keys = zip(PAPER_TABLES.paper_table, PAPER_TABLES.dataset, PAPER_TABLES.model, PAPER_TABLES.optimizer)
    return PAPER_TABLES[[k not in done for k in keys]].reset_index(drop=True)


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean, std and count over seeds of the final test accuracy per setting, dataset, model,
    optimizer, lr and CPU kernels (runs under other kernels are other rows, never one mean), beside
    the paper's table *for that setting* (``PAPER_TABLE_OF``: Table 1 for ``table1`` and ``tuned``,
    Table 2 for ``table2``); ``diff`` = ours - paper."""
    test = _with_kernels(runs[runs["split"] == "test"])
    agg = test.groupby(["setting", "dataset", "model", "optimizer", "lr", "epochs", "subset", "kernels"],
                       dropna=False)["acc"].agg(
        ["mean", "std", "count"]).reset_index()
    agg["paper_table"] = agg["setting"].map(PAPER_TABLE_OF)
    out = agg.merge(PAPER_TABLES, on=["paper_table", "dataset", "model", "optimizer"], how="left")
    out["diff"] = out["mean"] - out["paper_mean"]
    return out


def _with_kernels(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``kernels`` column (``unrecorded`` where it has none: rows made by hand, old tables)."""
    if "kernels" not in runs:
        return runs.assign(kernels=kernels.UNRECORDED)
    return runs.assign(kernels=runs["kernels"].fillna(kernels.UNRECORDED))


# -- paired comparisons ------------------------------------------------------------------------

class MixedKernels(ValueError):
    """The runs of one comparison were made under different CPU kernels (:mod:`psi.kernels`)."""


def check_same_kernels(runs: pd.DataFrame, what: str) -> str:
    """The one kernels label of ``runs`` (``unrecorded`` without a ``kernels`` column); raise
    :class:`MixedKernels`, naming each label and its runs, when they hold several: a difference of
    runs made under other kernels holds the kernels' difference too (issue 16: 30.73 against 29.55
    for the same SGD runs under AVX-512 and AVX2), and runs whose kernels are unrecorded are not
    known to match the others."""
    labels = _with_kernels(runs)["kernels"]
    if labels.nunique() > 1:
        counts = "; ".join(f"{k}: {n} runs" for k, n in labels.value_counts().sort_index().items())
        raise MixedKernels(f"{what} pairs runs made under different CPU kernels ({counts}): their difference would "
                           f"hold the kernels' too. Fix: train them again under one (./run_all.sh pins AVX2 for the "
                           f"smoke and quick profiles; --cpu-isa native lifts it), or compare the rows of one "
                           f"kernels label (the kernels column of psi.study.load_runs).")
    return labels.iloc[0] if len(labels) else kernels.UNRECORDED


def min_detectable(sd: float, n: int, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true mean difference that a two-sided paired t-test at level ``alpha`` finds
    with probability ``power``, for ``n`` pairs whose differences have standard deviation ``sd``
    (the noncentral t distribution; ``sd`` is the observed one, taken as the true one)."""
    from scipy import optimize, stats

    if n < 2 or not np.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    df, scale = n - 1, math.sqrt(n) / sd
    tc = stats.t.ppf(1 - alpha / 2, df)

    def detect(delta: float) -> float:
        wrong_side = stats.nct.cdf(-tc, df, delta * scale)  # below 1e-20 once it matters not; scipy may give NaN
        return stats.nct.sf(tc, df, delta * scale) + np.nan_to_num(wrong_side) - power

    hi = sd
    while detect(hi) < 0:
        hi *= 2
    return float(optimize.brentq(detect, 0.0, hi, xtol=1e-10))


def paired(runs: pd.DataFrame, a: str, b: str = "sgd", alpha: float = 0.05, power: float = 0.8) -> dict[str, float]:
    """Final accuracy of ``a`` minus ``b``, paired by seed, over the rows given (one dataset, model,
    setting, length and subset: at a seed both start from the same weights and see the same
    batches). Returns the mean difference ``diff``, its ``1 - alpha`` confidence interval
    (``ci_low``, ``ci_high``: t), ``n`` pairs, ``sd`` of the differences, the paired t-test's
    ``p`` and ``mde``, the smallest effect this design detects with probability ``power``
    (:func:`min_detectable`), and the runs' ``kernels``. Seeds run by only one of the two are left out.
    Runs of ``a`` and ``b`` made under different CPU kernels are refused (:func:`check_same_kernels`)."""
    from scipy import stats

    label = check_same_kernels(runs[runs["optimizer"].isin([a, b])], f"the comparison {a} - {b}")
    x = runs.loc[runs["optimizer"] == a].set_index("seed")["acc"]
    y = runs.loc[runs["optimizer"] == b].set_index("seed")["acc"]
    if x.index.has_duplicates or y.index.has_duplicates:
        raise ValueError(f"several runs of {a} or {b} at one seed: pass the rows of one dataset, model, setting, "
                         f"number of epochs and subset")
    seeds = x.index.intersection(y.index)
    d = (x[seeds] - y[seeds]).to_numpy(dtype=float)
    n = len(d)
    out = {"diff": float(d.mean()) if n else math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n,
           "sd": math.nan, "p": math.nan, "mde": math.nan, "kernels": label}
    if n < 2:
        return out
    sd = float(d.std(ddof=1))
    half = stats.t.ppf(1 - alpha / 2, n - 1) * sd / math.sqrt(n)
    p = float(stats.ttest_rel(x[seeds], y[seeds]).pvalue) if sd > 0 else math.nan
    out.update(ci_low=out["diff"] - half, ci_high=out["diff"] + half, sd=sd, p=p,
               mde=min_detectable(sd, n, alpha, power))
    return out


def judge(p: dict[str, float], paper_diff: float | None, b: str = "SGD") -> str:
    """What a paired comparison :func:`paired` says, in words, beside the paper's difference for the
    same cell (``paper_diff``; None or NaN where the paper has none). "not confirmed at this scale"
    only when the interval excludes the paper's improvement and shows none; when it holds both 0 and
    the paper's difference the comparison is "inconclusive at this scale"."""
    lo, hi = p["ci_low"], p["ci_high"]
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return f"too few pairs for an interval (n = {p['n']})"
    sign = f"better than {b}" if lo > 0 else f"worse than {b}" if hi < 0 else f"no difference from {b} detected"
    if paper_diff is None or not np.isfinite(paper_diff):
        return f"{sign} (the paper has no number here)"
    where = "inside" if lo <= paper_diff <= hi else "above" if paper_diff > hi else "below"
    words = f"{sign}; the paper's {paper_diff:+.2f} lies {where} the interval"
    if paper_diff <= 0:
        return words + f" (the paper reports no gain over {b} here)"
    if lo > 0:
        return words + ": the paper's claim held at this scale"
    if hi < paper_diff:
        return words + ": not confirmed at this scale"
    return words + ": inconclusive at this scale"
