"""The experiment modules of notebooks 01-03: the loop, the toy problems, Figure 4's measures, the rates,
the symmetry and geometry experiments, and the notebooks' figures. Each test names what would make it fail."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import psi
from psi.core import manifold as M
from psi.engine.models import BNMLP
from psi.paper import figure4 as F4
from psi.paper import geometry as G
from psi.paper import symmetry as S
from psi.paper.loop import batch_indices, steps_per_epoch, train_steps
from psi.paper.rates import describe_fit, min_sq_upto, plot_rates, psi_sgd_min_sq, psi_sgd_rate, slope_ci
from psi.paper.toy import METHODS, euclid_grad_norm, make_optimizer, toy_regression, train_full_batch, vg_grad_norm


def _data(n=96, d=6, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64), torch.randint(classes, (n,), generator=g)


# -- psi.paper.loop -------------------------------------------------------------------------------------

def test_batches_reshuffle_every_epoch_and_cover_it_without_repeats():
    stream = batch_indices(10, 3, torch.Generator().manual_seed(0))
    epochs = [[next(stream) for _ in range(steps_per_epoch(10, 3))] for _ in range(2)]
    for ep in epochs:  # 3 batches of 3: 9 distinct indices, the last batch closes the epoch
        idx = torch.cat([i for i, _ in ep])
        assert len(idx) == 9 and len(set(idx.tolist())) == 9
        assert [end for _, end in ep] == [False, False, True]
    assert torch.cat([i for i, _ in epochs[0]]).tolist() != torch.cat([i for i, _ in epochs[1]]).tolist()


def test_full_batch_is_the_whole_data_every_step():
    stream = batch_indices(10, None, torch.Generator())
    assert [next(stream) for _ in range(3)] == [(None, True)] * 3 and steps_per_epoch(10, 64) == 1


def test_two_runs_with_the_same_seed_see_the_same_batches_whatever_the_model():
    x, y = _data()
    seen = []
    for width in (4, 9):  # different models and optimizers must not change the batch order
        torch.manual_seed(width)
        model = BNMLP(6, [width], 3).double()
        batches: list[torch.Tensor] = []
        model.register_forward_pre_hook(lambda m, a, seen=batches: seen.append(a[0][:, 0].clone()))
        for _ in train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 5, 16, seed=3):
            pass
        seen.append(torch.cat(batches))
    assert torch.equal(seen[0], seen[1])


def test_before_step_sees_the_gradient_before_the_step_and_steps_are_taken():
    x, y = _data()
    torch.manual_seed(0)
    model = BNMLP(6, [4], 3).double()
    w = model.first_linear.weight
    seen = []
    start = w.detach().clone()
    steps = list(train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 3, None,
                             before_step=lambda loss: seen.append((w.detach().clone(), w.grad.clone()))))
    assert [s.index for s in steps] == [1, 2, 3] and len(seen) == 3
    assert torch.equal(seen[0][0], start)  # read before the first step
    assert torch.allclose(seen[1][0], start - 0.1 * seen[0][1])  # the step used the gradient the hook saw


def test_a_non_finite_loss_ends_the_loop_without_a_step():
    x, y = _data()
    model = BNMLP(6, [4], 3).double()
    before = [p.detach().clone() for p in model.parameters()]
    steps = list(train_steps(model, torch.optim.SGD(model.parameters(), lr=0.1), x, y, 5, None,
                             loss_fn=lambda out, t: out.sum() * float("nan")))
    assert len(steps) == 1 and math.isnan(steps[0].loss)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


# -- psi.paper.toy -------------------------------------------------------------------------------------

def test_toy_regression_noise_only_scales_the_noise():
    x0, y0 = toy_regression(noise=0.0)
    x1, y1 = toy_regression(noise=1.0)
    assert torch.equal(x0, x1) and x0.shape == (1000, 10)
    b = torch.linalg.lstsq(x0, y0.unsqueeze(1)).solution.squeeze(1)
    assert float((x0 @ b - y0).abs().max()) < 1e-10  # noise-free targets are exactly linear
    assert 0.9 < float((y1 - y0).std()) < 1.1


def test_theorems_gradient_norm_is_the_same_at_equivalent_points_and_the_euclidean_one_is_not():
    x, y = toy_regression(n=200)
    model = F4.toy_model(F4.AS_STATED)
    S.set_bn_eps(model, 1e-30)
    twin = S.rescaled(model, "hidden", M.random_scales(100, 0.1, 10.0))
    norms = []
    for m in (model, twin):
        m.zero_grad()
        F.mse_loss(m(x), y).backward()
        norms.append((vg_grad_norm(psi.param_groups(m, x)), euclid_grad_norm(m)))
    assert norms[0][0] == pytest.approx(norms[1][0], rel=1e-10)
    assert abs(norms[0][1] - norms[1][1]) > 1e-3 * norms[0][1]


@pytest.mark.parametrize("method", METHODS)
def test_every_method_takes_a_finite_step(method):
    x, y = toy_regression(n=100)
    h = train_full_batch(F4.toy_model(F4.AS_STATED), method, x, y, 3, 0.01)
    assert len(h["loss"]) == len(h["grad_norm"]) == len(h["egrad_norm"]) == 3
    assert all(map(math.isfinite, h["loss"])) and h["loss"][-1] < h["loss"][0]


def test_an_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="psi-gdm"):
        make_optimizer("sgd", [], 0.1)


def test_a_diverged_run_is_cut_where_it_diverged():
    x, y = toy_regression(n=100)
    h = train_full_batch(F4.toy_model(F4.AS_STATED), "gd", x, y, 50, 1e6)
    assert 0 < len(h["loss"]) < 50 and all(map(math.isfinite, h["loss"]))


# -- psi.paper.figure4 ---------------------------------------------------------------------------------

def test_fall_reads_a_geometric_sequence_and_a_stall():
    t = np.arange(200)
    geo = F4.fall(10 * 0.9**t)
    assert geo["slope"] == pytest.approx(100 * math.log10(0.9)) and geo["decades"] == pytest.approx(-199 * math.log10(0.9))
    assert F4.fall(np.full(200, 0.05))["slope"] == pytest.approx(0, abs=1e-12)
    assert math.isnan(F4.fall([1.0, float("nan"), 1.0, 1.0])["slope"])


def test_the_control_falls_at_the_rate_its_eigenvalues_predict():
    x, y = toy_regression()
    measured, predicted = F4.linear_control(x, y, 200, lr=0.05)
    assert measured["slope"] == pytest.approx(predicted, rel=0.05)
    assert measured["slope"] <= F4.GEOMETRIC_SLOPE  # the criterion sees a geometric fall where there is one


def test_noise_floor_is_the_least_squares_residual():
    x, y = toy_regression()
    assert 0.9 < F4.noise_floor(x, y) < 1.1
    assert F4.noise_floor(*toy_regression(noise=0.0)) < 1e-20


def test_neighbours_in_the_grid():
    assert F4.neighbours([0.3, 0.01, 0.1, 0.03], 0.1) == [0.03, 0.1, 0.3]
    assert F4.neighbours([0.01, 0.1], 0.01) == [0.01, 0.1]


def test_toy_model_readings():
    plain, affine, none = (F4.toy_model(F4.Setup("s", bn=b)) for b in ("plain", "affine", "none"))
    assert torch.equal(plain.hidden.weight, affine.hidden.weight) and torch.equal(plain.out.weight, none.out.weight)
    assert affine.bn.affine and not plain.bn.affine and isinstance(none.bn, nn.Identity)
    scaled = F4.toy_model(F4.Setup("s", hidden_scale=0.5, out_scale=30.0))
    assert torch.allclose(scaled.hidden.weight, 0.5 * plain.hidden.weight)
    assert torch.allclose(scaled.out.weight, 30 * plain.out.weight) and scaled.out.weight.dtype == torch.float64
    assert psi.find_scale_invariant(none, torch.randn(32, 10, dtype=torch.float64)) == []
    with pytest.raises(ValueError, match="plain, affine, none"):
        F4.Setup("s", bn="layer")


def test_sweep_keeps_the_rate_with_the_smallest_final_norm_and_skips_diverged_rates():
    setup = F4.Setup("tiny", hidden=8, methods=("gd", "psi-gd"))
    table, curves = F4.sweep([setup], 15, [1e6, 0.01, 0.1])
    assert list(table["method"]) == ["gd", "psi-gd"] and set(table["lr"]) <= {0.01, 0.1}
    x, y = toy_regression()
    for _, row in table.iterrows():
        other = 0.01 if row.lr == 0.1 else 0.1
        h = train_full_batch(F4.toy_model(setup), row.method, x, y, 15, other)
        assert row.end <= h["grad_norm"][-1]
    assert (table["geometric"] == (table["slope"] <= F4.GEOMETRIC_SLOPE)).all()
    assert len(curves) == 2 * 15


def _table(slopes, setup="as stated"):
    return pd.DataFrame([{"setup": setup, "method": m, "lr": 0.1, "epochs": 200, "start": 10.0, "end": 0.05, "slope": s,
                          "final_loss": 0.95, "geometric": s <= F4.GEOMETRIC_SLOPE} for m, s in slopes.items()])


def test_the_verdict_on_figure4_follows_the_numbers():
    table = _table({m: -0.1 for m in METHODS})
    good = {"slope": -4.0}
    stalled = F4.findings(table, table, good, -4.0, 1.0)
    assert stalled[-1] == "Verdict on Figure 4: no reading we ran reproduces it."
    assert "6 of 6 methods end under" in stalled[1]
    steep = pd.concat([table, _table({"psi-gd": -4.2}, setup="some reading")], ignore_index=True)
    assert "1 reading(s) give a fall" in F4.findings(table, steep, good, -4.0, 1.0)[-1]
    assert "do not trust" in F4.findings(table, table, {"slope": -0.1}, -4.0, 1.0)[-1]
    short = table.assign(epochs=40)
    assert "runs of 40 epochs, not the figure's 200" in F4.findings(short, short, good, -4.0, 1.0)[-1]
    far = pd.concat([table, _table({"gd": -0.2}, setup="w1 x 30").assign(start=400.0)], ignore_index=True)
    assert any("nearest the figure's 10^2.6 is 'w1 x 30'" in line for line in F4.findings(table, far, good, -4.0, 1.0))


# -- psi.paper.rates -----------------------------------------------------------------------------------

def test_slope_ci_recovers_a_power_law():
    T = np.array([10, 20, 40, 80, 160])
    s, lo, hi = slope_ci(T, 3.0 / T)
    assert s == pytest.approx(-1) and hi - lo < 1e-9
    s, lo, hi = slope_ci(T, T**-0.5 * np.exp(np.random.default_rng(0).normal(0, 0.1, 5)))
    assert lo < -0.5 < hi


def test_min_sq_upto_counts_missing_iterates_as_infinite():
    assert min_sq_upto([3.0, 1.0, 2.0], [1, 2, 3]) == [9.0, 1.0, 1.0]
    assert min_sq_upto([3.0, float("nan")], [1, 2, 5]) == [9.0, 9.0, 9.0]


def test_describe_fit_places_the_bound():
    assert "inside" in describe_fit("x", (-1.0, -1.2, -0.8), -1.0)
    assert "slower fall" in describe_fit("x", (-0.6, -0.7, -0.5), -1.0)
    assert "faster fall" in describe_fit("x", (-1.5, -1.7, -1.3), -1.0)


def test_psi_sgd_min_sq_is_the_best_full_batch_iterate():
    x, y = toy_regression(n=200)
    first = psi_sgd_min_sq(lambda: F4.toy_model(F4.AS_STATED), x, y, 1, 0.1, 50, [0])  # iterate 0 only
    model = F4.toy_model(F4.AS_STATED)
    model.zero_grad()
    F.mse_loss(model(x), y).backward()
    assert first[0] == pytest.approx(vg_grad_norm(psi.param_groups(model, x)) ** 2)
    more = psi_sgd_min_sq(lambda: F4.toy_model(F4.AS_STATED), x, y, 30, 0.1, 50, [0, 1])
    assert len(more) == 2 and all(v < first[0] for v in more)


# -- psi.paper.symmetry --------------------------------------------------------------------------------

def _pair(eps=1e-30, low=1e-2, high=1e2):
    x, y = _data()
    torch.manual_seed(0)
    net = S.set_bn_eps(BNMLP(6, [8], 3).double(), eps)
    a = M.random_scales(8, low, high)
    return net, S.rescaled(net, "net.1", a), a, x, y


def test_invariance_holds_to_rounding_with_a_tiny_eps_and_not_with_the_default():
    net, twin, _, x, y = _pair(1e-30)
    assert S.invariance_gap(net, twin, x, y)["gap"] < 1e-12
    net, twin, _, x, y = _pair(1e-5, 1e-4, 1e-3)
    assert S.invariance_gap(net, twin, x, y)["gap"] > 1e-3


def test_gradient_ratio_is_one_over_a():
    net, twin, a, x, y = _pair()
    assert torch.allclose(S.gradient_ratio(net, twin, "net.1", x, y), 1 / a.double(), rtol=1e-8)


def test_drift_is_zero_for_psi_sgd_and_not_for_sgd():
    net, twin, _, x, y = _pair(low=0.1, high=10.0)
    d_psi = S.drift(net, twin, lambda m: psi.PSISGD(psi.param_groups(m, x[:32]), lr=0.1), "net.1", x, y, 10, 16)
    net, twin, _, x, y = _pair(low=0.1, high=10.0)
    d_sgd = S.drift(net, twin, lambda m: torch.optim.SGD(m.parameters(), lr=0.1), "net.1", x, y, 10, 16)
    assert len(d_psi) == len(d_sgd) == 10 and max(d_psi) < 1e-10 and d_sgd[-1] > 1e-3


def test_eps_breaks_the_symmetry_below_the_threshold_only():
    x, y = _data()
    torch.manual_seed(0)
    net = BNMLP(6, [8], 3).double()
    std, s_star = S.eps_threshold(net, "net.1", x, eps=1e-5)
    assert s_star == pytest.approx(math.sqrt(1e-5) / std)
    df = S.eps_sweep(net, "net.1", x, y, [s_star / 100, s_star * 100])
    small, large = df["relative change of the loss"]
    assert small > 1e-3 and large < 1e-4 and small > 100 * large


def test_figure1_readings():
    for r in ("A", "B"):
        m = S.figure1_model(r, 6, 8, 3)
        norms = M.sqnorms(m.first_linear.weight.detach()).sqrt()
        torch.manual_seed(0)
        base = M.sqnorms(BNMLP(6, [8], 3).first_linear.weight.detach()).sqrt()
        expected = torch.tensor([1e4, 1e4, 1e-4, 1e-4] if r == "A" else [1e4] * 4).repeat_interleave(2)
        assert torch.allclose(norms / base, expected, rtol=1e-5)
    c = S.figure1_model("C", 6, 8, 3)
    assert psi.find_scale_invariant(c, torch.randn(16, 6)) == ["1", "4"]  # the drawing: both layers invariant
    d = S.figure1_model("D", 6, 8, 3)
    assert [m.eps for m in d if isinstance(m, nn.BatchNorm1d)] == [1e-30, 1e-30]
    assert torch.equal(d[4].weight, c[4].weight)
    with pytest.raises(ValueError, match="A, B, C, D"):
        S.figure1_model("E", 6, 8, 3)


def test_epoch_losses_one_per_epoch():
    x, y = _data(n=100)
    m = S.figure1_model("B", 6, 8, 3).double()
    losses = S.epoch_losses(m, torch.optim.SGD(m.parameters(), lr=0.1), x, y, 3, batch_size=32)
    assert len(losses) == 3 and losses[-1] < losses[0]


def test_figure1_findings_say_whether_it_is_the_papers_picture():
    idx = pd.MultiIndex.from_tuples([("A", 0.1), ("A", 1.0), ("C", 0.1)], names=["reading", "lr"])
    final = pd.DataFrame({"SGD": [2.30, 2.25, 0.5], "PSI-SGD": [0.05, 0.2, 2.3]}, index=idx)
    a, c = S.figure1_findings(final, 10)
    assert "SGD stalls" in a and "PSI-SGD trains" in a and a.endswith("the paper's picture.")
    assert "SGD 2.25 to 2.3 (best at lr 1)" in a and "PSI-SGD's best is lower" in a  # the rates' span, the best named
    assert c.endswith("not the paper's picture.")


# -- psi.paper.geometry --------------------------------------------------------------------------------

def test_retraction_and_expmap_agree_to_second_order():
    torch.manual_seed(0)
    W = torch.randn(5, 7, dtype=torch.float64)
    X = M.proju(W, torch.randn_like(W))
    X = X / M.norm(W, X)
    gaps = G.retraction_gaps(W, X, [1e-2, 2e-2])
    assert gaps[1] / gaps[0] == pytest.approx(8, rel=1e-2)  # t^3


def test_curve_lengths_agree_and_a_radial_curve_has_none():
    torch.manual_seed(0)
    A, B = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 3, dtype=torch.float64)
    q, s = G.curve_lengths(lambda t: (A + B * t) * (1 + 3 * t), n=400)
    assert q == pytest.approx(s, rel=1e-5) and q > 0.1
    q, s = G.curve_lengths(lambda t: A * (1 + 3 * t), n=50)
    assert q < 1e-10 and s < 1e-10


def test_track_neurons_lemma1_and_effective_learning_rates():
    x, y = _data()
    rates = {}
    for name in ("sgd", "psi"):
        torch.manual_seed(0)
        net = S.set_bn_eps(BNMLP(6, [8], 3).double(), 1e-30)
        opt = (torch.optim.SGD(net.parameters(), lr=0.05) if name == "sgd"
               else psi.PSISGD(psi.param_groups(net, x[:32]), lr=0.05))
        d = G.track_neurons(net, opt, "net.1", x, y, 5, 16)
        assert len(d) == 5 * 8
        rates[name] = d.angle / np.sqrt(d.sq_before * d.grad_sq)
        if name == "sgd":  # Lemma 1 exactly (eps 1e-30): the increment is lr^2 ||G||^2
            assert np.allclose(d.sq_after - d.sq_before, 0.05**2 * d.grad_sq, rtol=1e-6)
            assert np.allclose(rates[name], 0.05 / d.sq_before, rtol=1e-2)
    assert np.allclose(rates["psi"], 0.05, rtol=1e-2)


def test_arc_length_is_exact_for_tiny_angles():
    for step in (1e-9, 0.01):
        t = np.arange(101) * step
        pts = np.stack([np.cos(t), np.sin(t), np.zeros_like(t)], 1)
        assert G.arc_length(pts) == pytest.approx(100 * step, rel=1e-6)


def test_neuron_path_starts_where_the_neuron_points():
    x, y = _data(d=64, classes=10)
    net = G.sphere_net(seed=0)
    start = M.canonical(net[3].weight.detach())[0].numpy()
    p = G.neuron_path(net, torch.optim.SGD(net.parameters(), lr=0.1), "3", x, y, 4, batch_size=32)
    assert p.shape == (5, 3) and np.allclose(p[0], start) and np.allclose(np.linalg.norm(p, axis=1), 1)


def test_geometry_findings_report_a_failed_lemma():
    sgd = pd.DataFrame({"measured": [1e-3, -1e-6], "predicted": [1e-3, 1e-6]})
    eff = {"SGD": pd.Series([0.3, 0.2]), "PSI-SGD": pd.Series([0.1, 0.1])}
    common = dict(metric=(1.0, 1.0), radial=0.0, vertical={1e-30: 1e-17, 1e-5: 1e-6}, riemannian=[(1.0, 1.0)],
                  order=3.0, kept=0.0, lengths=(1.0, 1.0, 0.5), median_gap=0.0, eff=eff, lr=0.1,
                  arcs={"SGD": 1.0, "PSI-SGD": 2.0})
    out = G.findings(sgd=sgd, **common)
    assert "flat up to rounding" in out[1] and "Lemma 1 failed on 1 increments" in out[5] and "x0.67" in out[6]
    ok = G.findings(sgd=sgd.abs(), **common | {"vertical": {1e-30: 1e-3, 1e-5: 1e-3}})
    assert "The norms grew at every step." in ok[5] and "NOT flat" in ok[1]


def test_symmetry_findings_report_a_failed_theorem():
    gap = {1e-30: {"gap": 1e-15, "out_max": 3.0}, 1e-5: {"gap": 1e-2, "out_max": 3.0}}
    sweep = pd.DataFrame({"s": [1e-6, 1e-4, 1e-2, 1.0], "relative change of the loss": [0.5, 0.1, 1e-4, 1e-9]})
    ok = S.findings(gap, -1.0, {"SGD": [0.1, 2.0], "PSI-SGD": [0.0, 1e-15]}, 5e-3, sweep)
    assert "it holds" in ok[0] and "holds." in ok[1] and ok[2].endswith("held.") and "sits below" in ok[3]
    bad = S.findings(gap, -0.9, {"SGD": [0.1, 2.0], "PSI-SGD": [0.0, 1e-3]}, 5e-3, sweep)
    assert "does not hold" in bad[1] and bad[2].endswith("FAILED.")


# -- the experiments the notebooks call in one line ------------------------------------------------

def test_sgd_and_psi_sgd_make_the_two_optimizers_at_one_rate():
    x, _ = _data()
    opts = S.sgd_and_psi_sgd(0.05, x[:32])
    assert list(opts) == ["SGD", "PSI-SGD"]
    net = BNMLP(6, [8], 3).double()
    sgd, psi_sgd = opts["SGD"](net), opts["PSI-SGD"](net)
    assert type(sgd) is torch.optim.SGD and isinstance(psi_sgd, psi.PSISGD)
    assert {g["lr"] for g in sgd.param_groups} == {g["lr"] for g in psi_sgd.param_groups} == {0.05}
    assert [g.get("name") for g in psi_sgd.param_groups if g.get("psi")] == ["net.1"]  # the BN layer takes PSI-SGD


def test_figure1_runs_one_row_per_reading_optimizer_rate_and_epoch():
    x, y = _data(n=64)
    runs = S.figure1_runs(x.float(), y, 8, 3, [0.01, 0.1], 2)
    assert len(runs) == len(S.READINGS) * 2 * 2 * 2
    assert list(runs.columns) == ["reading", "optimizer", "lr", "epoch", "train loss"]
    assert list(dict.fromkeys(runs["reading"])) == list(S.READINGS) and set(runs["epoch"]) == {1, 2}
    model = S.figure1_model("B", 6, 8, 3)  # one cell of the grid, run by hand: the same losses
    alone = S.epoch_losses(model, psi.PSISGD(psi.param_groups(model, x.float()[:64]), lr=0.1), x.float(), y, 2)
    cell = runs[(runs.reading == "B") & (runs.optimizer == "PSI-SGD") & (runs.lr == 0.1)]
    assert cell["train loss"].tolist() == alone


def test_bn_net_and_layer_gradient():
    x, y = _data(d=64, classes=10)
    torch.manual_seed(3)
    ref = BNMLP(64, [32], 10).double()
    net = G.bn_net(seed=3)
    assert torch.equal(net.net[1].weight, ref.net[1].weight) and net.net[2].eps == 1e-5
    assert G.bn_net(seed=3, eps=1e-30).net[2].eps == 1e-30
    w, g = G.layer_gradient(net, "net.1", x, y)
    F.cross_entropy(ref(x), y).backward()
    assert torch.equal(w, ref.net[1].weight.detach()) and torch.allclose(g, ref.net[1].weight.grad)
    w, g = G.layer_gradient(G.bn_net(seed=3, eps=1e-30), "net.1", x, y)
    assert abs(float((g * w).sum())) < 1e-10 * float(g.norm() * w.norm())  # exactly scale-invariant: G orthogonal to W


def test_psi_sgd_rate_shrinks_the_step_as_one_over_sqrt_T():
    x, y = toy_regression(n=200)
    make = lambda: F4.toy_model(F4.Setup("s", hidden=8))  # noqa: E731
    got = psi_sgd_rate(make, x, y, [4, 16], 0.1, 50, [0, 1])
    assert got[0] == pytest.approx(np.mean(psi_sgd_min_sq(make, x, y, 4, 0.1, 50, [0, 1])))
    assert got[1] == pytest.approx(np.mean(psi_sgd_min_sq(make, x, y, 16, 0.05, 50, [0, 1])))  # 0.1 * sqrt(4/16)


def test_initial_scale_runs_gd_and_psi_gd_at_every_scale():
    x, y = toy_regression(n=200)
    curves, falls = F4.initial_scale_runs(x, y, [0.1, 10.0], 6, {"gd": 0.01, "psi-gd": 0.1})
    assert len(curves) == 2 * 2 * 6 and set(curves["scale"]) == {"x 0.1", "x 10"}
    assert list(falls["method"]) == ["GD", "GD", "PSI-GD", "PSI-GD"] and list(falls["scale"]) == [0.1, 10.0, 0.1, 10.0]
    h = train_full_batch(F4.toy_model(F4.Setup("scaled", hidden_scale=10.0)), "psi-gd", x, y, 6, 0.1)
    assert falls["final loss"].iloc[3] == h["loss"][-1] and {"start", "end", "slope"} <= set(falls.columns)


# -- the notebooks' figures (Agg backend) -----------------------------------------------------------

@pytest.fixture
def plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    yield pyplot
    pyplot.close("all")


def _data_lines(ax):
    return [line for line in ax.lines if len(line.get_xdata())]


def test_symmetry_figures(plt):
    a = np.array([0.1, 1.0, 10.0])
    fig = S.plot_gradient_scaling(a, 1 / a)
    (ax,) = fig.axes
    assert ax.get_title() == "Gradient at $T_a(W)$ vs at $W$" and ax.get_xscale() == ax.get_yscale() == "log"
    assert len(ax.collections[0].get_offsets()) == 3 and [t.get_text() for t in ax.get_legend().get_texts()] == [
        "neurons", "eq. (5): $1/a$"]
    fig = S.plot_drift({"SGD": [0.1, 0.2, 0.3], "PSI-SGD": [0.0, 0.0, 0.0]})
    lines = fig.axes[0].lines
    assert [line.get_label() for line in lines] == ["SGD", "PSI-SGD"] and list(lines[0].get_xdata()) == [1, 2, 3]
    sweep = pd.DataFrame({"s": [1e-6, 1e-4, 1e-2, 1.0], "relative change of the loss": [0.5, 0.1, 1e-4, 1e-9]})
    ax = S.plot_eps_breaks_symmetry(sweep, 3e-3).axes[0]
    assert [list(line.get_xdata()) for line in ax.lines[1:]] == [[3e-3, 3e-3], [1e-4, 1e-4]]  # s* and Figure 1's 1e-4
    assert len(ax.lines[0].get_xdata()) == 4 and ax.get_title() == r"Symmetry broken by $\epsilon = 10^{-5}$"
    runs = pd.DataFrame([{"reading": r, "optimizer": o, "lr": 0.1, "epoch": e, "train loss": 1 / e}
                         for r in "ABC" for o in ("SGD", "PSI-SGD") for e in (1, 2)])
    fig = S.plot_figure1(runs, "digits")
    assert [ax.get_title() for ax in fig.axes] == ["reading A", "reading B", "reading C"]
    assert fig._suptitle.get_text().startswith("Figure 1 on digits") and fig.axes[0].get_yscale() == "log"
    assert all(len(_data_lines(ax)) == 2 for ax in fig.axes)  # SGD and PSI-SGD in each panel


def test_geometry_figures(plt):
    ts = np.logspace(-3, 0, 4)
    ax = G.plot_retraction_vs_expmap(ts, ts**3 / 3).axes[0]
    assert [line.get_label() for line in ax.lines] == ["dist(retr, expmap)", "$t^3/3$"] and ax.get_yscale() == "log"
    sgd = pd.DataFrame({"step": [1, 1, 2, 2, 3, 3], "sq_after": [1.0, 2.0, 1.5, 2.5, 2.0, 3.0],
                        "measured": [1e-3, 2e-3, 1e-3, 0.0, 1e-3, 1e-3], "predicted": [1e-3, 2e-3, 1e-3, 1e-3, 1e-3, 1e-3]})
    left, right = G.plot_lemma1(sgd).axes
    assert list(left.lines[0].get_ydata()) == [1.5, 2.0, 2.5]  # the mean over neurons per step
    assert len(right.collections[0].get_offsets()) == 6 and right.get_title().startswith("per-neuron increment")
    eff = {"SGD": pd.Series([0.3, 0.2], index=[1, 2]), "PSI-SGD": pd.Series([0.1, 0.1], index=[1, 2])}
    ax = G.plot_effective_lr(eff, 0.1).axes[0]
    assert [line.get_label() for line in ax.lines] == ["SGD", "PSI-SGD"] and ax.get_title().endswith("(eta = 0.1)")
    t = np.linspace(0, 0.5, 6)
    paths = {"SGD": np.stack([np.cos(t), np.sin(t), 0 * t], 1), "PSI-SGD": np.stack([np.cos(t), 0 * t, np.sin(t)], 1)}
    (ax,) = G.plot_neuron_path(paths).axes
    assert ax.name == "3d" and ax.get_title().startswith("Direction of one neuron")
    assert [x.get_text() for x in ax.get_legend().get_texts()] == ["SGD: 0.500 rad", "PSI-SGD: 0.500 rad", "start"]


def _curves(methods=("gd", "psi-gd", "adam"), epochs=5):
    return pd.DataFrame([{"setup": "as stated", "method": m, "epoch": e, "grad_norm": 10.0 / (e + 1),
                          "egrad_norm": 20.0 / (e + 1), "loss": 1.0 / (e + 1)} for m in methods for e in range(epochs)])


def test_figure4_figures(plt):
    curves = _curves()
    ours, euclid = F4.plot_figure4(curves).axes
    assert ours.get_title() == "Gradient norm of the theorems (dashed: the figure)"
    assert euclid.get_title() == "The same runs, Euclidean gradient norm"
    assert len(ours.lines) == 3 + len(F4.PAPER_FIGURE4["end"]) and len(euclid.lines) == 3  # dashed: the figure's five
    assert list(euclid.lines[0].get_ydata()) == list(curves["egrad_norm"][:5])
    ax = F4.plot_loss_vs_noise_floor(curves, 0.9).axes[0]
    assert len(ax.lines) == 4 and list(ax.lines[-1].get_ydata()) == [0.9, 0.9] and ax.get_ylabel() == "loss"
    readings = _table({"gd": -0.1, "psi-gd": -4.2})
    ax = F4.plot_readings_slopes(readings, {"slope": -3.0}).axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["as stated", "control: GD, linear least squares"]
    scale = pd.DataFrame([{"method": m, "scale": f"x {s:g}", "epoch": e, "loss": 1.0 / (e + 1)}
                          for m in ("GD", "PSI-GD") for s in (0.1, 1.0, 10.0) for e in range(4)])
    fig = F4.plot_initial_scale(scale)
    assert [ax.get_title() for ax in fig.axes] == ["method = GD", "method = PSI-GD"]
    assert all(len(_data_lines(ax)) == 3 for ax in fig.axes)  # one line per initial scale


def test_rates_figure(plt):
    rates = pd.DataFrame({"T": [10, 20, 40], "PSI-GD": [1.0, 0.5, 0.25], "PSI-SGD": [1.0, 0.7, 0.5]})
    (ax,) = plot_rates(rates).axes
    assert len(_data_lines(ax)) == 2 and [t.get_text() for t in ax.get_legend().get_texts()] == ["PSI-GD", "PSI-SGD"]
    assert ax.get_xscale() == ax.get_yscale() == "log" and "squared gradient norm" in ax.get_title()


def _shown_labels(fig, axis):
    """The drawn, non-empty tick labels of ``axis`` (major and minor) with their boxes on the canvas."""
    fig.canvas.draw()
    ticks = axis.get_majorticklabels() + axis.get_minorticklabels()
    return [(t.get_text(), t.get_window_extent()) for t in ticks if t.get_visible() and t.get_text()]


@pytest.mark.parametrize("T, values", [([25, 50, 100, 200, 400, 800], [5.5, 2.4, 0.93, 0.38, 0.19, 0.12]),
                                       ([25, 50, 100], [0.30, 0.28, 0.25])])  # notebook 03's horizons; a short span
def test_rates_figure_labels_do_not_overlap_and_the_subscript_sits_on_the_line(plt, T, values):
    rates = pd.DataFrame({"T": T, "PSI-GD": values, "GD": [v / 100 for v in values]})
    fig = plot_rates(rates)
    (ax,) = fig.axes
    for axis in (ax.xaxis, ax.yaxis):
        shown = _shown_labels(fig, axis)
        assert len(shown) >= 2, shown
        for i, (a, box) in enumerate(shown):
            assert not any(box.overlaps(other) for _, other in shown[i + 1:]), (a, [s for s, _ in shown])
    assert [t for t, _ in _shown_labels(fig, ax.xaxis)] == [str(t) for t in T]  # the horizons, as numbers
    # mathtext sets \min's subscript as a limit, under the word (below the title's line): \mathrm{min} keeps it inline
    assert "\\min" not in ax.get_title() + ax.get_ylabel() and "_{t<T}" in ax.get_title()
