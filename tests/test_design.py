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


def _timed_runs(epochs, seeds, psi_seconds):
    """Fabricated finished runs: sgd at 10 s per epoch, psi-sgd at ``psi_seconds[seed]``, one per seed."""
    return pd.DataFrame([dict(run=f"{o}-{s}-{epochs}", dataset="cifar10", model="resnet20", optimizer=o, setting="table1",
                              seed=s, epochs=epochs, subset=5000, kernels="k", timed_epochs=epochs - 1,
                              epoch_seconds=10.0 if o == "sgd" else psi_seconds[s], acc=50.0)
                         for s in range(seeds) for o in ("sgd", "psi-sgd")])


@pytest.mark.parametrize("epochs, seeds, seconds, says", [
    (1, 3, [7.3, 7.0, 8.0], "too short to time"),  # one epoch: its only epoch is the warm-up
    (3, 1, [7.3], "too short to time"),  # one seed: no spread
    (3, 3, [7.0, 8.0, 7.5], "0.750x SGD's epoch time (range 0.700-0.800 over 3 seeds)"),
    (3, 3, [9.0, 11.0, 10.5], "the range holds 1: no measurable difference")])
def test_the_cost_line_gives_the_seeds_spread_or_says_it_is_too_short(epochs, seeds, seconds, says):
    from psi.paper.analysis import epoch_times, verdict
    test = _timed_runs(epochs, seeds, seconds)
    times = epoch_times(test)
    line = verdict(test, pd.DataFrame(), pd.DataFrame({"paper_mean": []}), times).splitlines()[-1]
    assert line.startswith("- Cost: psi-sgd") and says in line, line
    if "too short" not in says:
        assert times.set_index("optimizer").loc["psi-sgd", "seeds"] == 3


def test_epoch_times_keep_designs_apart():
    from psi.paper.analysis import epoch_times
    test = pd.concat([_timed_runs(3, 2, [7.0, 7.0]), _timed_runs(5, 2, [12.0, 12.0]).assign(subset=3000)])
    psi = epoch_times(test).query("optimizer == 'psi-sgd'")
    assert sorted(psi["ratio to sgd"]) == [0.7, 1.2]  # one row per design, never a mean over both


@pytest.fixture
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def _design_metrics():
    """Per-epoch rows of table1 runs in the quick profile's three designs, two seeds, two optimizers."""
    return pd.DataFrame([dict(run=f"{o}-{n}-{s}", dataset="cifar10", model="resnet20", setting="table1", optimizer=o,
                              seed=s, subset=n, epochs=e, epoch=k, train_loss=2.0 / k, test_acc=10.0 * k)
                         for n, e in ((15000, 1), (7500, 2), (5000, 3)) for o in ("sgd", "psi-sgd") for s in (0, 1)
                         for k in range(1, e + 1)])


def test_curve_grid_draws_one_line_per_optimizer_and_design(plt):
    from psi.paper.curves import curve_grid
    fig = curve_grid(_design_metrics(), ["table1"])
    loss_ax, acc_ax = fig.axes
    for ax in (loss_ax, acc_ax):
        lines = [ln for ln in ax.lines if len(ln.get_xdata())]
        # 2 optimizers x 3 designs, each line one design's epochs: never 1-3 joined across designs
        assert sorted(len(ln.get_xdata()) for ln in lines) == [1, 1, 2, 2, 3, 3], [ln.get_xdata() for ln in lines]
        one_epoch = [ln for ln in lines if len(ln.get_xdata()) == 1]
        assert all(ln.get_marker() not in (None, "", "None") for ln in one_epoch)  # a 1-epoch run is seen
    labels = [t.get_text() for t in loss_ax.get_legend().get_texts()]
    assert {"15000x1", "7500x2", "5000x3", "sgd", "psi-sgd"} <= set(labels)


def test_figure3_reads_each_runs_design(plt, monkeypatch):
    from psi.paper import analysis
    metrics = _design_metrics()
    test = metrics.drop_duplicates("run")[["run", "dataset", "setting", "epochs", "subset"]]
    recorded = metrics.drop(columns=["dataset", "epochs", "subset"])  # what load_metrics gives: no design
    monkeypatch.setattr(analysis, "load_metrics", lambda runs_dir, runs: recorded)
    ((name, fig),) = analysis.figures("unused", test)
    assert name == "figure3_cifar10"
    assert len([ln for ln in fig.axes[0].lines if len(ln.get_xdata())]) == 6


def test_notebook04_curves_of_one_epoch_runs_have_points_within_the_epoch(plt, tmp_path, monkeypatch):
    from psi.paper import cifar as paper_cifar
    epoch_rows = pd.DataFrame([dict(run=f"{o}-{s}", model="resnet20", optimizer=o, setting="table1", seed=s, epoch=0,
                                    images=800, train_loss=2.0, test_acc=30.0, psi_norm_mean=1.0, psi_eff_lr=0.1)
                               for o in ("sgd", "psi-sgd") for s in (0, 1)])
    points = pd.DataFrame([dict(run=f"{o}-{s}", model="resnet20", optimizer=o, setting="table1", seed=s, epoch=0,
                                step=k, images=100 * k, train_loss=2.3 - 0.05 * k + 0.01 * s, psi_norm_mean=1 + 0.01 * k,
                               psi_eff_lr=0.1 / k) for o in ("sgd", "psi-sgd") for s in (0, 1) for k in range(1, 9)])
    monkeypatch.setattr(paper_cifar, "load_metrics", lambda out, runs, trace=False: points if trace else epoch_rows)
    monkeypatch.setattr(paper_cifar, "savefig", lambda fig, d, name: None)
    monkeypatch.setattr(plt, "show", lambda: None)
    st = paper_cifar.Study({"models": ["resnet20"], "dataset": "cifar10", "epochs": 1, "subset": 800},
                           Config(dataset="synthetic", model="smallcnn", optimizer="sgd", out=str(tmp_path)),
                           None, tmp_path, (1, 1))
    paper_cifar.plot_curves(st, epoch_rows)
    fig = plt.gcf()
    loss, acc, norm, eff = fig.axes
    for ax in (loss, norm, eff):  # a line per optimizer over the epoch's 8 points, the seeds' band around it
        assert sorted(len(ln.get_xdata()) for ln in ax.lines if len(ln.get_xdata())) == [8, 8]
        assert ax.get_xlabel() == "training images seen" and ax.collections  # the band
    assert [len(ln.get_xdata()) for ln in acc.lines if len(ln.get_xdata())] == [1, 1]  # evaluated once: a marker
    assert all(ln.get_marker() not in (None, "", "None") for ln in acc.lines if len(ln.get_xdata()))
