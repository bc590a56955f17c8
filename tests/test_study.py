"""psi.study: the learning-rate selection and its files, the paper's tables, paired comparisons."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from psi.engine.config import Config
from psi.study import selection
from psi.study import stats as psistats
from psi.study.results import PAPER_SOURCES, PAPER_TABLE1, PAPER_TABLE2, PAPER_TABLE_OF, compare, load_runs
from psi.study.selection import read_selected_files, select_lr, write_selected
from psi.study.stats import MixedKernels, judge, min_detectable


def _fake_sweep(peak):
    def sweep(cfgs, shard=(1, 1), dataset=None):
        assert all(c.val_size == 100 for c in cfgs)  # selected on the validation split, never on test
        assert all(c.setting == "tuned" and c.lr is not None for c in cfgs)  # the runs record what they are
        return [{"final_val_acc": 1 - abs(math.log(c.lr / peak))} if c.lr < 5 else {"failed": "diverged"}
                for c in cfgs]
    return sweep


@pytest.mark.parametrize("peak,expected,n", [(0.3, 0.3, 3), (0.01, 0.0111, 5), (2.0, 3.0, 5)])
def test_select_lr_extends_the_grid_at_its_edges(monkeypatch, peak, expected, n):
    monkeypatch.setattr(selection, "sweep", _fake_sweep(peak))
    lr, table = select_lr(Config(), "sgd", [0.1, 0.3, 1.0], val_size=100)
    assert lr == pytest.approx(expected, rel=1e-2) and len(table) == n
    assert table["lr"].is_monotonic_increasing


def test_select_lr_all_diverged(monkeypatch):
    monkeypatch.setattr(selection, "sweep", _fake_sweep(1.0))
    with pytest.raises(RuntimeError, match="diverged"):
        select_lr(Config(), "sgd", [10.0, 30.0], val_size=100, extend=0)


def test_selected_files_round_trip(tmp_path):
    write_selected(tmp_path, "cifar10", "resnet20", {"sgd": 0.03, "psi-sgd": 0.3})
    write_selected(tmp_path, "cifar100", "resnet56", {"psi-sgdm": 0.1})
    assert read_selected_files(tmp_path) == {("cifar10", "resnet20", "sgd"): 0.03,
                                                   ("cifar10", "resnet20", "psi-sgd"): 0.3,
                                                   ("cifar100", "resnet56", "psi-sgdm"): 0.1}
    assert not list(tmp_path.glob("*.tmp"))


def test_the_paper_tables_and_their_pages():
    t1, t2 = PAPER_TABLE1.set_index(["dataset", "model", "optimizer"]), \
        PAPER_TABLE2.set_index(["dataset", "model", "optimizer"])
    assert len(t1) == 55 and len(t2) == 40  # Table 1 has ImageNet's three ResNets too
    assert t1.loc[("imagenet", "resnet50", "psi-sgdm"), "paper_mean"] == 75.11
    assert t1.loc[("cifar10", "resnet20", "psi-sgdm"), "paper_mean"] == 92.41
    assert t1.loc[("cifar100", "resnet56", "sgd"), "paper_std"] == 0.26
    assert t2.loc[("cifar10", "resnet56", "psi-sgd"), "paper_mean"] == 93.98
    assert t2.loc[("cifar100", "resnet20", "psi-sgdm"), "paper_mean"] == 69.64
    assert t2.loc[("cifar10", "resnet56", "sgd"), "elsewhere"] == 93.03 and t2["paper_std"].isna().all()
    assert "p. 1134" in PAPER_SOURCES["Table 1"] and "p. 17" in PAPER_SOURCES["Table 2"]
    assert PAPER_TABLE_OF == {"table1": "Table 1", "tuned": "Table 1", "table2": "Table 2"}


def _runs(setting="table1", a=(92.4, 92.5, 92.3), b=(91.0, 91.2, 91.1), seeds=(0, 1, 2), opt="psi-sgdm"):
    rows = [dict(optimizer=o, seed=s, acc=v) for o, vals in ((opt, a), ("sgd", b)) for s, v in zip(seeds, vals)]
    return pd.DataFrame(rows).assign(dataset="cifar10", model="resnet20", split="test", epochs=200, subset=np.nan,
                                     setting=setting, lr=0.1)


def test_compare_sets_each_setting_beside_its_own_table():
    runs = pd.concat([_runs("table1"), _runs("table2"), _runs("tuned")], ignore_index=True)
    t = compare(runs).set_index(["setting", "optimizer"])
    assert t.loc[("table1", "psi-sgdm"), "paper_mean"] == 92.41 and t.loc[("tuned", "psi-sgdm"), "paper_table"] == \
        "Table 1"
    assert t.loc[("table2", "psi-sgdm"), "paper_mean"] == 92.70 and t.loc[("table2", "sgd"), "paper_mean"] == 92.35
    assert t.loc[("table2", "psi-sgdm"), "diff"] == pytest.approx(92.4 - 92.70)
    assert (t["count"] == 3).all()


def test_paired_differences_pair_by_seed():
    # a seed effect of several points common to both, a difference of about +1: pairing removes the former
    base = np.array([80.0, 86.0, 83.0, 89.0, 84.0])
    gain = np.array([1.1, 0.9, 1.2, 0.8, 1.0])
    runs = _runs(a=base + gain, b=base, seeds=range(5))
    p = psistats.paired(runs, "psi-sgdm")
    ci = stats.ttest_rel(base + gain, base).confidence_interval(0.95)
    assert p["n"] == 5 and p["diff"] == pytest.approx(1.0)
    assert (p["ci_low"], p["ci_high"]) == pytest.approx((ci.low, ci.high))
    assert 0.7 < p["ci_low"] and p["ci_high"] < 1.3  # an unpaired interval would span about +-4 points
    assert p["mde"] == pytest.approx(min_detectable(gain.std(ddof=1), 5))
    shuffled = _runs(a=base + gain, b=base[::-1], seeds=range(5))  # wrong pairs: the seed effect comes back
    assert psistats.paired(shuffled, "psi-sgdm")["ci_low"] < 0
    one_sided = runs[~((runs.optimizer == "sgd") & (runs.seed == 4))]  # a seed only one of them ran: left out
    assert psistats.paired(one_sided, "psi-sgdm")["n"] == 4
    with pytest.raises(ValueError, match="several runs"):
        psistats.paired(pd.concat([runs, runs]), "psi-sgdm")
    assert math.isnan(psistats.paired(runs[runs.seed == 0], "psi-sgdm")["ci_low"])


def test_min_detectable_effect_has_the_power_it_claims():
    n, sd, alpha = 5, 1.0, 0.05
    mde = min_detectable(sd, n, alpha, 0.8)
    rng = np.random.default_rng(0)
    d = rng.normal(mde, sd, size=(40000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert np.mean(np.abs(t) > stats.t.ppf(1 - alpha / 2, n - 1)) == pytest.approx(0.8, abs=0.01)
    assert min_detectable(sd, 400) == pytest.approx(2.80 * sd / 20, rel=0.02)  # the normal approximation
    assert min_detectable(2 * sd, n) == pytest.approx(2 * mde)
    assert math.isnan(min_detectable(sd, 1))


@pytest.mark.parametrize("ci,paper,words", [
    ((0.5, 1.5), 1.1, "better than SGD; the paper's +1.10 lies inside the interval: the paper's claim held"),
    ((-0.3, 0.2), 1.1, "no difference from SGD detected; the paper's +1.10 lies above the interval: not confirmed"),
    ((-0.3, 1.5), 1.1, "no difference from SGD detected; the paper's +1.10 lies inside the interval: inconclusive"),
    ((-1.5, -0.5), 1.1, "worse than SGD; the paper's +1.10 lies above the interval: not confirmed"),
    ((-0.3, 0.2), -0.2, "no difference from SGD detected; the paper's -0.20 lies inside the interval (the paper "
                        "reports no gain"),
    ((-0.3, 0.2), np.nan, "no difference from SGD detected (the paper has no number here)"),
    ((np.nan, np.nan), 1.1, "too few pairs"),
])
def test_judge_says_not_confirmed_only_where_the_numbers_do(ci, paper, words):
    assert judge({"ci_low": ci[0], "ci_high": ci[1], "n": 3}, paper).startswith(words)


def _fake_run(runs_dir, name, optimizer, seed, acc, record=None):
    d = runs_dir / name
    d.mkdir(parents=True)
    config = {"dataset": "cifar10", "model": "resnet20", "optimizer": optimizer, "setting": "table1", "seed": seed,
              "epochs": 1, "subset": 15000, "val_size": 0, "groups": [{"name": "all", "lr": 0.1}]}
    summary = {"final_test_acc": acc, "best_test_acc": acc, "final_train_loss": 1.0, "mean_epoch_seconds": 1.0}
    if record is not None:
        config["kernels"] = summary["kernels"] = record
    (d / "config.json").write_text(json.dumps(config))
    (d / "summary.json").write_text(json.dumps(summary))


AVX2 = {"cpu_capability": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "threads": 2,
        "cpu_model": "AMD EPYC", "machine": "x86_64", "torch": "2.13.0+cpu"}
AVX512 = {**AVX2, "cpu_capability": "AVX512", "ATEN_CPU_CAPABILITY": None, "ONEDNN_MAX_CPU_ISA": None}


def test_load_runs_names_each_runs_kernels_and_old_runs_are_unrecorded(tmp_path):
    _fake_run(tmp_path, "a", "sgd", 0, 0.3, AVX2)
    _fake_run(tmp_path, "b", "sgd", 1, 0.3, AVX512)
    _fake_run(tmp_path, "c", "sgd", 2, 0.3)  # made before runs recorded their kernels (reference/quick's)
    runs = load_runs(tmp_path).set_index("run")
    assert runs.loc["a", "kernels"] == "AVX2/AVX2/2t torch 2.13.0+cpu"
    assert runs.loc["b", "kernels"] == "AVX512/native/2t torch 2.13.0+cpu"
    assert runs.loc["c", "kernels"] == "unrecorded"


def test_runs_under_other_kernels_are_never_paired_nor_averaged(tmp_path):
    for seed in range(3):
        _fake_run(tmp_path, f"sgd{seed}", "sgd", seed, 0.30 + seed / 100, AVX2)
        _fake_run(tmp_path, f"psi{seed}", "psi-sgdm", seed, 0.31 + seed / 100, AVX512 if seed == 2 else AVX2)
    runs = load_runs(tmp_path)
    with pytest.raises(MixedKernels, match=r"AVX2/AVX2/2t torch 2.13.0\+cpu: 5 runs; AVX512/native/2t torch "
                                                 r"2.13.0\+cpu: 1 runs.*--cpu-isa native"):
        psistats.paired(runs, "psi-sgdm")
    same = psistats.paired(runs[runs.kernels.str.startswith("AVX2")], "psi-sgdm")
    assert same["n"] == 2 and same["kernels"] == "AVX2/AVX2/2t torch 2.13.0+cpu"
    assert psistats.paired(_runs(), "psi-sgdm")["kernels"] == "unrecorded"  # rows without the column: one label
    t = compare(runs)
    assert sorted(t.loc[t.optimizer == "psi-sgdm", "count"]) == [1, 2]  # one row per kernels, not one mean
    with pytest.raises(MixedKernels, match="unrecorded: 1 runs"):  # unrecorded: not known to be the same
        psistats.paired(pd.concat([runs, load_runs(tmp_path).assign(kernels=None)[:1]]), "psi-sgdm")
