"""The study's design and coverage: psi.study.design (spread, seeds a budget buys), evaluation only where
asked, a tuned rate equal to Table 3's made once, the paper's cells not run, the figure layout."""

import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from psi.engine import cifar, trainer
from psi.engine.config import Config
from psi.engine.optimizers import LR
from psi.study import design
from psi.study.plan import base_config, check_settings, distinct, selection_configs, study_configs
from psi.study.profiles import PAPER_GRIDS, PROFILE_DATASETS, PROFILES, STUDY_PRESETS, ParameterError, study_settings
from psi.study.results import PAPER_TABLE2, PAPER_TABLES, label_tuned, not_run


def test_design_parse_and_cost():
    d = design.Design.parse("15000x1")
    assert (d.subset, d.epochs, d.images, str(d)) == (15000, 1, 15000, "15000x1")
    for bad in ("15000", "x3", "0x2", "a x b"):
        with pytest.raises(ValueError, match="IMAGESxEPOCHS|positive"):
            design.Design.parse(bad)


def _design_runs(sd_by_design, n=4, seed=0):
    """Fabricated runs: sgd at 50 +- 3 (shared by both), psi-sgdm = sgd + 1 + noise of the given sd."""
    rng = np.random.default_rng(seed)
    rows = []
    for name, sd in sd_by_design.items():
        common = rng.normal(50, 3, n)
        noise = rng.normal(0, 1, n)
        noise = (noise - noise.mean()) / noise.std(ddof=1) * sd  # exactly this sd
        for s in range(n):
            rows.append(dict(design=name, images=15000, optimizer="sgd", seed=s, acc=common[s],
                             train_seconds=60.0, eval_seconds=20.0))
            rows.append(dict(design=name, images=15000, optimizer="psi-sgdm", seed=s, acc=common[s] + 1 + noise[s],
                             train_seconds=60.0, eval_seconds=20.0))
    return pd.DataFrame(rows)


def test_spread_is_the_paired_sd_and_its_interval():
    runs = _design_runs({"5000x3": 2.0, "15000x1": 0.5})
    t = design.spread(runs, budget_seconds=2400, runs_per_seed=6, fixed_seconds=0).set_index("design")
    # the common seed effect (sd 3) cancels in the pairs: only the noise's sd remains
    assert t.loc["5000x3", "sd_diff"] == pytest.approx(2.0) and t.loc["15000x1", "sd_diff"] == pytest.approx(0.5)
    assert t.loc["15000x1", "ci_half_width"] == pytest.approx(stats.t.ppf(0.975, 3) * 0.5 / 2)
    assert t.loc["15000x1", "run_seconds"] == 80.0
    assert t.loc["15000x1", "affordable_seeds"] == 5  # 2400 s / (6 runs x 80 s)
    assert t.loc["15000x1", "projected_half_width"] == pytest.approx(stats.t.ppf(0.975, 4) * 0.5 / math.sqrt(5))
    lo, hi = t.loc["5000x3", ["sd_diff_low", "sd_diff_high"]]
    assert lo < 2.0 < hi and hi / lo > 3  # 3 degrees of freedom: a wide interval for a spread


def test_sd_interval_covers_the_true_sd_at_its_level():
    rng = np.random.default_rng(1)
    hits = 0
    for _ in range(2000):
        x = rng.normal(0, 2.0, 4)
        lo, hi = design.sd_interval(x.std(ddof=1), 4)
        hits += lo <= 2.0 <= hi
    assert 0.93 < hits / 2000 < 0.97


def test_affordable_seeds():
    assert design.affordable_seeds(80, 6, 2700, 300) == 5
    assert design.affordable_seeds(80, 6, 200) == 0


def test_measure_runs_each_design_at_each_seed(tmp_path):
    ds = cifar.synthetic(n_train=300, n_test=100)
    base = Config(dataset="synthetic", model="smallcnn", batch_size=50, eval_every=0, out=str(tmp_path),
                        progress=False)
    runs = design.measure([design.Design(100, 2), design.Design(200, 1)], base, [0, 1], ["psi-sgdm", "sgd"], ds)
    assert len(runs) == 8 and set(runs.design) == {"100x2", "200x1"} and set(runs.images) == {200}
    assert (runs.eval_seconds > 0).all() and (runs.train_seconds > 0).all()
    t = design.spread(runs)
    assert list(t.seeds) == [2, 2]


def test_eval_every_evaluates_where_asked_and_keeps_the_key(tmp_path):
    ds = cifar.synthetic(n_train=300, n_test=100)
    cfg = Config(dataset="synthetic", model="smallcnn", optimizer="psi-sgdm", epochs=3, batch_size=50,
                       subset=200, eval_every=2, out=str(tmp_path), progress=False)
    s = trainer.run(cfg, ds)
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["test_acc"] is not None for r in rows] == [False, True, True]  # epoch 2, and the last
    assert s["final_test_acc"] == rows[-1]["test_acc"] and s["best_test_acc"] == max(rows[1]["test_acc"],
                                                                                     rows[2]["test_acc"])
    assert rows[0]["eval_seconds"] < rows[1]["eval_seconds"]
    from dataclasses import replace
    assert replace(cfg, eval_every=0).run_dir() == cfg.run_dir()  # how often it is scored is not what it is
    with pytest.raises(ValueError, match="eval_every"):
        replace(cfg, eval_every=-1).validate()


def _settings(**kw):
    s = study_settings("smoke", **kw)
    check_settings(s)
    return s


def test_a_tuned_rate_equal_to_table3s_is_one_run_for_both(tmp_path):
    s = _settings(seeds=[0, 1])
    base = base_config(s, tmp_path)
    pairs = study_configs(s, base, {("smallcnn", "sgd"): LR["sgd"], ("smallcnn", "psi-sgd"): 0.3})
    by = {}
    for label, c in pairs:
        by.setdefault((label, c.optimizer), set()).add(c.run_dir())
    assert by[("tuned", "sgd")] == by[("table1", "sgd")]  # 0.1 is Table 3's: the same runs
    assert not by[("tuned", "psi-sgd")] & by[("table1", "psi-sgd")]  # 0.3 is not
    assert len(distinct(pairs)) == len(pairs) - 2
    shared = next(c for label, c in pairs if label == "tuned" and c.optimizer == "sgd")
    assert shared.setting == "table1" and shared.lr is None  # it records the setting it ran under


def test_label_tuned_counts_a_shared_run_under_both_settings():
    runs = pd.DataFrame([dict(dataset="cifar10", model="resnet20", optimizer=o, setting="table1", seed=0, lr=lr,
                              split="test", acc=50.0) for o, lr in (("sgd", 0.1), ("psi-sgd", 1.0))])
    out = label_tuned(runs, {("cifar10", "resnet20", "sgd"): 0.1, ("cifar10", "resnet20", "psi-sgd"): 0.3})
    tuned = out[out.setting == "tuned"]
    assert list(tuned.optimizer) == ["sgd"] and tuned.shared.all() and not out[out.setting == "table1"].shared.any()
    own = pd.concat([runs, runs.iloc[:1].assign(setting="tuned")], ignore_index=True)  # a tuned run of its own
    assert (label_tuned(own, {("cifar10", "resnet20", "sgd"): 0.1}).setting == "tuned").sum() == 1


def test_not_run_lists_imagenet_always_and_what_the_runs_miss():
    runs = pd.DataFrame([dict(dataset="cifar10", model="resnet20", optimizer=o, setting=s, split="test")
                         for o in ("sgd", "psi-sgdm") for s in ("table1", "tuned")])
    missing = not_run(runs)
    keys = set(zip(missing.paper_table, missing.dataset, missing.model, missing.optimizer))
    assert ("Table 1", "cifar10", "resnet20", "sgd") not in keys and ("Table 1", "cifar10", "resnet20", "adam") in keys
    assert ("Table 2", "cifar10", "resnet20", "sgd") in keys  # table2 was not run
    assert {m for t, d, m, o in keys if d == "imagenet"} == {"resnet18", "resnet34", "resnet50"}
    assert len(missing) == len(PAPER_TABLES) - 2


def test_the_paper_profile_covers_tables_1_and_2_whole():
    p = STUDY_PRESETS["paper"]
    assert PROFILE_DATASETS["paper"] == ["cifar10", "cifar100"] and set(PROFILE_DATASETS) == set(PROFILES)
    assert p["models"] == ["resnet20", "resnet32", "resnet44", "resnet56"] and p["epochs"] == 200
    assert p["optimizers"] == ["sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm"] and len(p["seeds"]) == 5
    assert p["paper_settings"] == ["table1", "table2"] and p["subset"] is None
    assert p["lr_grids"] == PAPER_GRIDS == {"sgd": [0.01, 0.1, 1.0], "adam": [1e-4, 1e-3, 1e-2]}
    assert p["lr_extend"] == 0  # the paper searched those grids only
    cells = {(d, m, o) for d in PROFILE_DATASETS["paper"] for m in p["models"] for o in p["optimizers"]}
    assert cells == set(zip(PAPER_TABLE2.dataset, PAPER_TABLE2.model, PAPER_TABLE2.optimizer))


@pytest.mark.parametrize("name,value", [("lr_extend", -1), ("eval_every", 1.5), ("select_subset", 0)])
def test_bad_study_settings_name_themselves(name, value):
    with pytest.raises(ParameterError, match=name):
        _settings(**{name: value})


def test_the_selection_trains_on_its_own_subset(tmp_path):
    s = _settings(select_subset=100)
    base = base_config(s, tmp_path)
    cfgs = selection_configs(s, base)
    assert {c.subset for c in cfgs} == {100} and {c.val_size for c in cfgs} == {200} and base.subset == 500
    assert {c.eval_every for c in cfgs} == {0}


def test_curve_grid_has_the_supplements_layout():
    import matplotlib
    matplotlib.use("Agg")
    rows = [dict(model=m, setting=s, optimizer=o, epoch=e, train_loss=1.0 / e, test_acc=50.0 + e if e == 3 else np.nan)
            for m in ("resnet20", "resnet110", "resnet32") for s in ("table2", "table1") for o in ("sgd", "psi-sgd")
            for e in (1, 2, 3)]
    from psi.paper.curves import curve_grid
    fig = curve_grid(pd.DataFrame(rows), ["table2", "table1"], "Figure 5")
    axes = np.array(fig.axes).reshape(3, 4)
    assert [a.get_title() for a in axes[0]] == ["resnet20, table2: training loss", "resnet20, table2: test accuracy",
                                                "resnet20, table1: training loss", "resnet20, table1: test accuracy"]
    assert axes[2, 0].get_title().startswith("resnet110")  # depth order, not string order
    assert len(axes[0, 1].lines[0].get_xdata()) == 1  # one evaluation: one point
