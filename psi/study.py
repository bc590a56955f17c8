"""Studies over many runs: learning-rate selection on a validation split, collection of
finished runs, the paper's Table 1 beside ours, Welch t-tests. Used by notebooks 04 and 05.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .optimizers import DEFAULTS
from .train import Config, sweep

__all__ = ["PAPER_TABLE1", "PAPER_EPOCH_SECONDS", "select_lr", "load_runs", "load_metrics", "table1", "welch"]

# Table 1 of the paper: mean (std) test accuracy in %, 5 runs, 200 epochs, official CIFAR files.
_T1_ALGOS = ("sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm")
_T1 = {
    ("cifar10", "resnet20"): (91.14, 0.10, 89.90, 0.17, 91.38, 0.21, 92.25, 0.03, 92.41, 0.12),
    ("cifar10", "resnet32"): (91.32, 0.23, 90.40, 0.32, 92.48, 0.35, 93.56, 0.08, 93.30, 0.14),
    ("cifar10", "resnet44"): (91.95, 0.14, 91.02, 0.18, 92.99, 0.12, 93.90, 0.16, 93.39, 0.11),
    ("cifar10", "resnet56"): (92.19, 0.21, 91.49, 0.12, 93.11, 0.16, 94.08, 0.15, 93.90, 0.16),
    ("cifar100", "resnet20"): (65.53, 0.51, 63.35, 0.06, 68.19, 0.24, 69.11, 0.07, 68.41, 0.21),
    ("cifar100", "resnet32"): (67.41, 0.21, 64.43, 0.11, 70.13, 0.28, 70.81, 0.08, 70.14, 0.13),
    ("cifar100", "resnet44"): (67.72, 0.31, 65.03, 0.38, 71.32, 0.12, 71.94, 0.21, 72.03, 0.14),
    ("cifar100", "resnet56"): (68.02, 0.26, 65.77, 0.13, 71.46, 0.06, 72.88, 0.24, 72.40, 0.16),
}
PAPER_TABLE1 = pd.DataFrame(
    [dict(dataset=d, model=m, optimizer=a, paper_mean=v[2 * i], paper_std=v[2 * i + 1])
     for (d, m), v in _T1.items() for i, a in enumerate(_T1_ALGOS)])
# Section 6.2: seconds per epoch, ResNet-56 on CIFAR-10, one V100.
PAPER_EPOCH_SECONDS = {"sgd": 16.98, "adam": 18.1, "sgdg": 26.6, "psi-sgd": 18.2, "psi-sgdm": 18.5}


def _final(summary: dict[str, Any], split: str) -> float:
    return summary[f"final_{split}_acc"]


def select_lr(base: Config, optimizer: str, grid: list[float], val_size: int, seed: int = 0,
              dataset=None, extend: int = 2) -> tuple[float, pd.DataFrame]:
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
        cfgs = [replace(base, optimizer=optimizer, lr=lr, val_size=val_size, seed=seed) for lr in todo]
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


def load_runs(runs_dir: str | Path) -> pd.DataFrame:
    """One row per finished run folder under ``runs_dir`` (those with a ``summary.json``)."""
    rows = []
    for p in sorted(Path(runs_dir).glob("*/summary.json")):
        s = json.loads(p.read_text())
        c = s["config"]
        lr = c["lr"] if c["lr"] is not None else DEFAULTS[c["optimizer"]]["lr"]
        split = "val" if c.get("val_size") else "test"
        rows.append({"run": p.parent.name, "dataset": c["dataset"], "model": c["model"], "optimizer": c["optimizer"],
                     "seed": c["seed"], "lr": lr, "epochs": c["epochs"], "subset": c["subset"], "split": split,
                     "acc": 100 * _final(s, split), "best_acc": 100 * s[f"best_{split}_acc"],
                     "final_train_loss": s["final_train_loss"], "epoch_seconds": s["mean_epoch_seconds"],
                     "source": s.get("data_source")})
    return pd.DataFrame(rows)


def load_metrics(runs_dir: str | Path, run_names: list[str] | None = None) -> pd.DataFrame:
    """Per-epoch metrics of runs (all finished ones by default), with the run's identity."""
    frames = []
    for p in sorted(Path(runs_dir).glob("*/metrics.jsonl")):
        if run_names is not None and p.parent.name not in run_names:
            continue
        c = json.loads((p.parent / "config.json").read_text())
        rows = [json.loads(x) for x in p.read_text().splitlines() if x.strip()]
        for r in rows:
            layers = r.pop("psi_layers", {})
            if layers:
                r["psi_norm_mean"] = float(np.mean([v["norm_mean"] for v in layers.values()]))
                r["psi_eff_lr"] = float(np.nanmean([v["eff_lr"] for v in layers.values()])) \
                    if not all(np.isnan(v["eff_lr"]) for v in layers.values()) else np.nan
            r.update(run=p.parent.name, optimizer=c["optimizer"], model=c["model"], seed=c["seed"],
                     lr_base=c["lr"] if c["lr"] is not None else DEFAULTS[c["optimizer"]]["lr"])
        frames.append(pd.DataFrame(rows))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def table1(runs: pd.DataFrame) -> pd.DataFrame:
    """Mean and std over seeds of the final test accuracy per dataset, model, optimizer and lr,
    beside the paper's Table 1 (``diff`` = ours - paper)."""
    test = runs[runs["split"] == "test"]
    agg = test.groupby(["dataset", "model", "optimizer", "lr", "epochs", "subset"], dropna=False)["acc"].agg(
        ["mean", "std", "count"]).reset_index()
    out = agg.merge(PAPER_TABLE1, on=["dataset", "model", "optimizer"], how="left")
    out["diff"] = out["mean"] - out["paper_mean"]
    return out


def welch(runs: pd.DataFrame, a: str, b: str = "sgd") -> dict[str, float]:
    """Welch's t-test of the final test accuracies of optimizer ``a`` against ``b`` (rows given)."""
    from scipy import stats

    x = runs.loc[runs["optimizer"] == a, "acc"].to_numpy()
    y = runs.loc[runs["optimizer"] == b, "acc"].to_numpy()
    if len(x) < 2 or len(y) < 2:
        return {"diff": float(np.mean(x) - np.mean(y)) if len(x) and len(y) else np.nan, "t": np.nan, "p": np.nan,
                "n_a": len(x), "n_b": len(y)}
    t, p = stats.ttest_ind(x, y, equal_var=False)
    return {"diff": float(x.mean() - y.mean()), "t": float(t), "p": float(p), "n_a": len(x), "n_b": len(y)}
