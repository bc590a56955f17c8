"""Learning-rate selection: each optimizer's rate chosen on a validation split carved from the training
images (never the test set), the grid extended past an edge when the best rate is there, and the
``selected_lr-*.json`` files that keep the choice in the runs folder."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from psi.engine.config import Config
from psi.engine.trainer import sweep


def selection_config(base: Config, optimizer: str, lr: float, val_size: int, seed: int = 0,
                     subset: int | None = None) -> Config:
    """A run of the selection: ``optimizer`` at ``lr`` under the setting ``tuned``, scored on a
    validation split of ``val_size`` training images (one definition for the study and the grid
    tool); ``subset``, when given, trains it on that many of the other images instead of the
    study's subset (a cheaper selection: same epochs and schedule, fewer images)."""
    return replace(base, optimizer=optimizer, setting="tuned", lr=lr, val_size=val_size, seed=seed,
                   subset=subset or base.subset, eval_every=0)


def final_acc(summary: dict[str, Any], split: str) -> float:
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
            acc[cfg.lr] = final_acc(s, "val") if "failed" not in s else np.nan
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
