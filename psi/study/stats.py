"""Paired comparisons of two optimizers over seeds (the same initial weights and batches at a seed): the
difference, its confidence interval, what the design could have detected (:func:`min_detectable`), the
verdict beside the paper's (:func:`judge`), and the refusal to pair runs made under different kernels."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from psi.engine import kernels
from psi.study.results import with_kernels


class MixedKernels(ValueError):
    """The runs of one comparison were made under different CPU kernels (:mod:`psi.engine.kernels`)."""


def check_same_kernels(runs: pd.DataFrame, what: str) -> str:
    """The one kernels label of ``runs`` (``unrecorded`` without a ``kernels`` column); raise
    :class:`MixedKernels`, naming each label and its runs, when they hold several: a difference of
    runs made under other kernels holds the kernels' difference too (issue 16: 30.73 against 29.55
    for the same SGD runs under AVX-512 and AVX2), and runs whose kernels are unrecorded are not
    known to match the others."""
    labels = with_kernels(runs)["kernels"]
    if labels.nunique() > 1:
        counts = "; ".join(f"{k}: {n} runs" for k, n in labels.value_counts().sort_index().items())
        raise MixedKernels(f"{what} pairs runs made under different CPU kernels ({counts}): their difference would "
                           f"hold the kernels' too. Fix: train them again under one (./run_all.sh pins AVX2 for the "
                           f"smoke and quick profiles; --cpu-isa native lifts it), or compare the rows of one "
                           f"kernels label (the kernels column of psi.study.results.load_runs).")
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
