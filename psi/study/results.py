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
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psi.engine import kernels
from psi.engine.rundir import read_metrics
from psi.study.selection import final_acc

__all__ = ["PAPER_TABLE1", "PAPER_TABLE2", "PAPER_TABLES", "PAPER_SOURCES", "PAPER_TABLE_OF",
           "PAPER_EPOCH_SECONDS", "load_runs", "load_metrics", "label_tuned", "not_run", "compare",
           "with_kernels"]

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
    """The kernels a run was made under (:func:`psi.engine.kernels.label`): the finishing process's record,
    else the starting one's; :data:`psi.engine.kernels.UNRECORDED` for a run made before runs recorded it."""
    return kernels.label(summary.get("kernels") or config.get("kernels"))


def load_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run folder under ``runs_dir`` (those with a ``summary.json``): its
    setting and the named method's learning rate as the run recorded them (``config.json``), never
    today's defaults, and the CPU kernels it ran under (``kernels``, :func:`psi.engine.kernels.label`:
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
                     "acc": 100 * final_acc(s, split), "best_acc": 100 * s[f"best_{split}_acc"],
                     "final_train_loss": s["final_train_loss"], "epoch_seconds": s["mean_epoch_seconds"],
                     "timed_epochs": s.get("epochs", c["epochs"]) - len(s.get("warmup_epoch_seconds", [])),
                     "source": s.get("data_source"), "kernels": _kernels_of(c, s)})
    _warn_unrecorded(unrecorded, runs_dir)
    return pd.DataFrame(rows)


def _trace_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The in-epoch points of a run's rows (:func:`psi.engine.epoch.trace_every`), each with its epoch."""
    return [{"epoch": r["epoch"], **t} for r in rows for t in r.get("trace", [])]


def load_metrics(runs_dir: str | Path, run_names: list[str] | None = None, trace: bool = False) -> pd.DataFrame:
    """Per-epoch metrics of runs (all recorded ones by default), with the run's identity, its recorded
    setting and learning rate (``lr_base``) and ``images``, the training images seen at the epoch's end.
    ``trace``: the points the runs recorded every few steps instead (``epoch``, ``step``, ``images``,
    ``train_loss``, ``psi_norm_mean``, ``psi_eff_lr``; none for runs made before the engine traced)."""
    frames, unrecorded = [], []
    for p in sorted(Path(runs_dir).glob("*/metrics.jsonl")):
        if run_names is not None and p.parent.name not in run_names:
            continue
        c = _recorded(p.parent)
        if c is None:
            unrecorded.append(p.parent.name)
            continue
        rows = read_metrics(p)
        images = 0
        for r in rows:
            images += round(r["images_per_second"] * r["epoch_seconds"]) if "images_per_second" in r else 0
            r["images"] = images
        rows = _trace_rows(rows) if trace else rows
        for r in rows:
            r.pop("trace", None)
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
    again labelled ``tuned``: the study made them once for both (:func:`psi.study.plan.study_configs`).
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
    test = with_kernels(runs[runs["split"] == "test"])
    agg = test.groupby(["setting", "dataset", "model", "optimizer", "lr", "epochs", "subset", "kernels"],
                       dropna=False)["acc"].agg(
        ["mean", "std", "count"]).reset_index()
    agg["paper_table"] = agg["setting"].map(PAPER_TABLE_OF)
    out = agg.merge(PAPER_TABLES, on=["paper_table", "dataset", "model", "optimizer"], how="left")
    out["diff"] = out["mean"] - out["paper_mean"]
    return out


def with_kernels(runs: pd.DataFrame) -> pd.DataFrame:
    """``runs`` with a ``kernels`` column (``unrecorded`` where it has none: rows made by hand, old tables)."""
    if "kernels" not in runs:
        return runs.assign(kernels=kernels.UNRECORDED)
    return runs.assign(kernels=runs["kernels"].fillna(kernels.UNRECORDED))


