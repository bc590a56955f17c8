"""Small helpers the notebooks share: parameter checks that say what is valid, the three
profiles, seeding, and saving figures next to the executed notebook."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["PROFILES", "check_choice", "check_positive", "setup", "savefig"]

PROFILES = ("smoke", "quick", "paper")


class ParameterError(ValueError):
    """A notebook parameter is wrong; the message names it, the valid values and how to pass them."""


def check_choice(name: str, value: Any, valid: tuple | list) -> Any:
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in valid]
    if bad:
        raise ParameterError(f"parameter {name}={value!r}: {bad} not valid; valid: {', '.join(map(str, valid))}. "
                             f"Pass it with papermill -p {name} ... (or ./run_all.sh options).")
    return value


def check_positive(name: str, value: Any, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ParameterError(f"parameter {name}={value!r} must be {kind}.")
    return value


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
