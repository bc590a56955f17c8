"""What every notebook starts with: its seed, threads and plotting style (:func:`setup`), its figures
saved as PNG and SVG (:func:`savefig`), and the checks of its parameters (from :mod:`psi.study.profiles`,
where the grid's command line checks the same ones)."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from psi.study.profiles import ParameterError, check_choice, check_positive

__all__ = ["setup", "savefig", "ParameterError", "check_choice", "check_positive"]


def setup(figures_dir: str, seed: int = 0, threads: int | None = None) -> Path:
    """Seed everything, set the plotting style, make and return the figures folder."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if threads:
        torch.set_num_threads(threads)
    sns.set_theme(context="notebook", style="whitegrid")
    plt.rcParams["figure.dpi"] = 100
    out = Path(figures_dir)
    out.mkdir(parents=True, exist_ok=True)
    return out


def savefig(fig, figures_dir: str | os.PathLike, name: str) -> Path:
    """Save ``fig`` as PNG and SVG under ``figures_dir``; return the PNG's path."""
    d = Path(figures_dir)
    d.mkdir(parents=True, exist_ok=True)
    fig.savefig(d / f"{name}.png", bbox_inches="tight", dpi=120)
    fig.savefig(d / f"{name}.svg", bbox_inches="tight")
    return d / f"{name}.png"
