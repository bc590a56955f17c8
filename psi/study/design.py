"""The CPU study's design, chosen by measured spread (issue 8, item 4).

A design is how many training images a run sees (a fixed class-balanced subset) and for how many
epochs. At an equal cost per run (images x epochs), the design whose paired difference
PSI-SGDM - SGD varies least from seed to seed gives the narrowest confidence interval for the same
number of seeds; and a budget fixes how many seeds a design can afford. :func:`measure` trains
each candidate at a few seeds (ordinary runs of :mod:`psi.train`, so the study reuses those of the
design it picks), :func:`spread` gives per design the standard deviations, the paired interval and
the interval a budget buys (:func:`affordable_seeds`). ``python -m psi.study.design`` does both and
writes ``design.csv``.

What this can tell: with ``k`` seeds per design, the standard deviation of the differences has
``k - 1`` degrees of freedom, so its 95% interval spans a factor of about 12 at k = 3 and 5 at
k = 5 (:func:`sd_interval`): only large differences in spread between designs are seen.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from psi.engine import kernels
from psi.engine.config import Config
from psi.engine.dataset import Dataset
from psi.engine.loaders import DATASETS, load_dataset
from psi.engine.rundir import read_metrics
from psi.engine.trainer import sweep
from psi.study.stats import paired

__all__ = ["Design", "design_configs", "measure", "spread", "affordable_seeds", "sd_interval", "main"]


@dataclass(frozen=True)
class Design:
    """``subset`` training images (class-balanced, fixed) for ``epochs`` epochs."""

    subset: int
    epochs: int

    @classmethod
    def parse(cls, text: str) -> Design:
        """``"15000x1"`` -> ``Design(15000, 1)``."""
        try:
            subset, epochs = (int(v) for v in text.lower().split("x"))
        except ValueError:
            raise ValueError(f"a design is IMAGESxEPOCHS, e.g. 15000x1, not {text!r}") from None
        if subset <= 0 or epochs <= 0:
            raise ValueError(f"a design needs positive images and epochs, not {text!r}")
        return cls(subset, epochs)

    def __str__(self) -> str:
        return f"{self.subset}x{self.epochs}"

    @property
    def images(self) -> int:
        """Training images seen per run: its cost, up to the evaluation."""
        return self.subset * self.epochs


def design_configs(designs: list[Design], base: Config, seeds: list[int], optimizers: list[str]) -> list[Config]:
    """Every candidate's runs, seed by seed (so an interrupted measurement has all designs at the
    first seeds), under ``base``'s setting and the setting's learning rates."""
    return [replace(base, subset=d.subset, epochs=d.epochs, optimizer=o, seed=s)
            for s in seeds for d in designs for o in optimizers]


def measure(designs: list[Design], base: Config, seeds: list[int], optimizers: list[str],
            dataset: Dataset | None = None) -> pd.DataFrame:
    """Train (or read back) every candidate's runs; one row per run: design, optimizer, seed,
    final test accuracy (%) and the run's seconds (training plus evaluation, as it recorded them)."""
    cfgs = design_configs(designs, base, seeds, optimizers)
    rows = []
    for cfg, s in zip(cfgs, sweep(cfgs, dataset=dataset), strict=True):
        if "failed" in s or "locked" in s:
            raise RuntimeError(f"{cfg.run_dir().name}: {s.get('failed') or s['locked']}")
        metrics = read_metrics(cfg.run_dir() / "metrics.jsonl")
        rows.append({"design": str(Design(cfg.subset, cfg.epochs)), "images": cfg.subset * cfg.epochs,
                     "optimizer": cfg.optimizer, "seed": cfg.seed, "acc": 100 * s["final_test_acc"],
                     "train_seconds": sum(m["epoch_seconds"] for m in metrics),
                     "eval_seconds": sum(m.get("eval_seconds", math.nan) for m in metrics)})
    return pd.DataFrame(rows)


def sd_interval(sd: float, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The ``1 - alpha`` confidence interval of a standard deviation estimated from ``n`` values
    (chi-square, normal data): how much a measured spread can be trusted."""
    from scipy import stats

    if n < 2 or not np.isfinite(sd):
        return math.nan, math.nan
    df = n - 1
    return (sd * math.sqrt(df / stats.chi2.ppf(1 - alpha / 2, df)),
            sd * math.sqrt(df / stats.chi2.ppf(alpha / 2, df)))


def affordable_seeds(run_seconds: float, runs_per_seed: int, budget_seconds: float, fixed_seconds: float = 0.0) -> int:
    """How many seeds fit ``budget_seconds`` when each seed takes ``runs_per_seed`` runs of
    ``run_seconds`` and the study spends ``fixed_seconds`` besides (its learning-rate selection)."""
    return max(0, int((budget_seconds - fixed_seconds) // (run_seconds * runs_per_seed)))


def spread(runs: pd.DataFrame, a: str = "psi-sgdm", b: str = "sgd", alpha: float = 0.05,
           budget_seconds: float | None = None, runs_per_seed: int = 2, fixed_seconds: float = 0.0) -> pd.DataFrame:
    """Per design: mean and seed-to-seed std of each optimizer's accuracy, the paired difference
    ``a - b`` with its interval (:func:`psi.study.stats.paired`) and the interval of its std; with a
    budget, the seeds it affords at the measured cost per run and the interval half-width those
    seeds would give if the measured std were the true one."""
    from scipy import stats

    rows = []
    for design, grp in runs.groupby("design", sort=False):
        p = paired(grp, a, b, alpha)
        lo, hi = sd_interval(p["sd"], p["n"], alpha)
        row = {"design": design, "images": int(grp["images"].iloc[0]), "seeds": p["n"],
               f"{a}_mean": grp.loc[grp.optimizer == a, "acc"].mean(), f"{a}_sd": grp.loc[grp.optimizer == a, "acc"].std(),
               f"{b}_mean": grp.loc[grp.optimizer == b, "acc"].mean(), f"{b}_sd": grp.loc[grp.optimizer == b, "acc"].std(),
               "diff": p["diff"], "sd_diff": p["sd"], "sd_diff_low": lo, "sd_diff_high": hi,
               "ci_half_width": (p["ci_high"] - p["ci_low"]) / 2,
               "run_seconds": float((grp["train_seconds"] + grp["eval_seconds"].fillna(0)).mean())}
        if budget_seconds is not None:
            n = affordable_seeds(row["run_seconds"], runs_per_seed, budget_seconds, fixed_seconds)
            row["affordable_seeds"] = n
            row["projected_half_width"] = (stats.t.ppf(1 - alpha / 2, n - 1) * p["sd"] / math.sqrt(n)
                                           if n >= 2 and np.isfinite(p["sd"]) else math.nan)
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None, reexec: bool = False) -> pd.DataFrame:
    """The command line; ``reexec`` (``python -m psi.study.design``): start again under the AVX2 pin when this
    process lacks it (its runs are the quick profile's: :mod:`psi.engine.kernels`)."""
    ap = argparse.ArgumentParser(prog="python -m psi.study.design", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--designs", nargs="+", default=["5000x3", "7500x2", "15000x1"], help="IMAGESxEPOCHS each")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--optimizers", nargs=2, default=["psi-sgdm", "sgd"], metavar=("A", "B"),
                    help="the paired difference A - B whose spread is measured")
    ap.add_argument("--dataset", default="cifar10", choices=DATASETS)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--setting", default="table1", choices=("table1", "table2"))
    ap.add_argument("--budget-minutes", type=float, default=45.0, help="the study's budget on this machine")
    ap.add_argument("--runs-per-seed", type=int, default=6,
                    help="final runs per seed in the study (3 optimizers x 2 settings: 6)")
    ap.add_argument("--fixed-minutes", type=float, default=5.0, help="the study's other cost (its lr selection)")
    ap.add_argument("--data-dir", help="dataset folder (default $PSI_DATA, else ./data)")
    ap.add_argument("--out", default="results/quick/runs", help="runs folder (the study's, to reuse the runs)")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cpu-isa", default="avx2", choices=list(kernels.CPU_ISAS),
                    help="avx2 (default): torch's AVX2 kernels on x86-64, as the quick profile it designs "
                         "(psi.engine.kernels); native: the CPU's best")
    a = ap.parse_args(argv)
    if reexec:
        kernels.reexec(kernels.env_for("quick", a.cpu_isa), "psi.study.design", sys.argv[1:] if argv is None else argv)
    if a.threads:
        import torch

        torch.set_num_threads(a.threads)
    designs = [Design.parse(t) for t in a.designs]
    base = Config(dataset=a.dataset, model=a.model, setting=a.setting, eval_every=0, data_dir=a.data_dir, out=a.out,
                  progress=False)
    runs = measure(designs, base, a.seeds, list(a.optimizers), load_dataset(a.dataset, a.data_dir))
    table = spread(runs, *a.optimizers, budget_seconds=60 * a.budget_minutes, runs_per_seed=a.runs_per_seed,
                   fixed_seconds=60 * a.fixed_minutes)
    path = Path(a.out) / "design.csv"
    table.to_csv(path, index=False)
    runs.to_csv(path.with_name("design_runs.csv"), index=False)
    print(table.to_markdown(index=False, floatfmt=".2f"))
    print(f"written: {path}")
    return table


if __name__ == "__main__":
    main(reexec=True)
