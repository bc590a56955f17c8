"""PSISGD: Theorem 1, the step against eq. 10 / Algorithm 1, torch SGD on the rest, state."""

import copy
import importlib.util
import math

import pytest
import torch
from torch import nn

import psi
from psi.core import manifold as M
from tests.nets import DenseSE, Mixed


def _exact_bn(model: nn.Module) -> nn.Module:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = 1e-30  # BN's eps breaks the symmetry at tiny scales; Theorem 1 is about the exact one
    return model.double()


def _batches(n, shape=(8, 3, 16, 16), classes=5):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(shape, generator=g, dtype=torch.float64), torch.randint(classes, (shape[0],), generator=g))
            for _ in range(n)]


def _train(model, opt, batches):
    torch.manual_seed(2)  # the same dropout masks for every copy
    for x, y in batches:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()


def _rescaled_copy(model, groups):
    twin = copy.deepcopy(model)
    mods = dict(twin.named_modules())
    with torch.no_grad():
        for g in groups:
            if g["psi"]:
                layer = mods[g["name"]]
                a = M.random_scales(layer.weight.shape[0], 1e-3, 1e3, dtype=torch.float64)
                for p in [layer.weight] + ([layer.bias] if len(g["params"]) == 2 else []):
                    p.copy_(M.rescale(p, a))
    return twin


def _psi_weights(model, groups):
    mods = dict(model.named_modules())
    return [mods[g["name"]].weight for g in groups if g["psi"]]


@pytest.mark.parametrize("kw", [
    dict(momentum=0.9, weight_decay=5e-4),
    dict(momentum=0.9, nesterov=True, max_norm=50.0),  # the safeguard fires on the rescaled copy
    dict(momentum=0.0),
], ids=["sgdm-wd", "nesterov-maxnorm", "sgd"])
@pytest.mark.parametrize("foreach", [False, True])
def test_theorem1_equivariance(kw, foreach, net=Mixed):
    torch.manual_seed(0)
    model = _exact_bn(net())
    x0 = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    groups = psi.param_groups(model, x0)
    start = [w.detach().clone() for w in _psi_weights(model, groups)]
    twin = _rescaled_copy(model, groups)
    assert M.dist(_psi_weights(model, groups), _psi_weights(twin, groups)) < 1e-12
    assert max((a - b).abs().max() for a, b in zip(_psi_weights(model, groups), _psi_weights(twin, groups))) > 1.0
    batches = _batches(50)
    for m in (model, twin):
        _train(m, psi.PSISGD(psi.param_groups(m, x0), lr=0.05, foreach=foreach, **kw), batches)
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(3)
        out = model(x0)
        torch.manual_seed(3)
        torch.testing.assert_close(twin(x0), out, rtol=1e-9, atol=1e-9)
    for a, b in zip(_psi_weights(model, groups), _psi_weights(twin, groups)):
        torch.testing.assert_close(M.canonical(b), M.canonical(a), rtol=1e-9, atol=1e-9)
    assert M.dist(_psi_weights(model, groups), start) > 0.1  # it did train: the classes moved from the start


def test_theorem1_on_concatenation_and_inverted_residuals():
    test_theorem1_equivariance(dict(momentum=0.9, weight_decay=5e-4, max_norm=50.0), True, net=DenseSE)


def test_theorem1_fails_for_sgd():
    torch.manual_seed(0)
    model = _exact_bn(Mixed())
    x0 = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    groups = psi.param_groups(model, x0)
    twin = _rescaled_copy(model, groups)
    batches = _batches(50)
    for m in (model, twin):
        _train(m, torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9), batches)
    gap = M.dist(_psi_weights(model, groups), _psi_weights(twin, groups))
    assert gap > 0.1
    with torch.no_grad():
        assert (twin(x0) - model(x0)).abs().max() > 1e-3


def _reference_step(w, u, G, lr, rho):
    """Algorithm 1 written from the paper, neuron by neuron: u <- rho u - lr ||w||^2 G; w <- w + u."""
    w, u = w.clone(), u.clone()
    for i in range(w.shape[0]):
        u[i] = rho * u[i] - lr * w[i].flatten().dot(w[i].flatten()) * G[i]
        w[i] = w[i] + u[i]
    return w, u


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_step_matches_eq10_and_algorithm1(foreach, rho):
    shapes = [(6, 3, 3, 3), (4, 7)]
    ws = [torch.randn(s, dtype=torch.float64) * 3 for s in shapes]
    params = [w.clone().requires_grad_() for w in ws]
    opt = psi.PSISGD([{"params": params, "psi": True}], lr=0.1, momentum=rho, foreach=foreach, max_norm=None)
    us = [torch.zeros_like(w) for w in ws]
    for _ in range(4):
        Gs = [torch.randn_like(w) for w in ws]
        for p, G in zip(params, Gs):
            p.grad = G.clone()
        opt.step()
        for k, G in enumerate(Gs):
            ws[k], us[k] = _reference_step(ws[k], us[k], G, 0.1, rho)
            assert torch.equal(params[k].grad, G)  # .grad is never modified
        for p, w in zip(params, ws):
            torch.testing.assert_close(p.detach(), w, rtol=1e-12, atol=1e-12)


def test_weight_and_bias_share_their_neurons():
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    opt = psi.PSISGD([{"params": [w, b], "psi": True}], lr=0.1)
    w.grad, b.grad = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    sq = (w * w).sum(1) + b * b
    ew, eb = w.detach() - 0.1 * sq[:, None] * w.grad, b.detach() - 0.1 * sq * b.grad
    opt.step()
    torch.testing.assert_close(w.detach(), ew)
    torch.testing.assert_close(b.detach(), eb)


def test_signature_is_torch_sgds_with_max_norm_keyword_only():
    """Issue 16: an SGD call means the same to PSISGD (order, defaults, keyword-only flags)."""
    import inspect

    sgd = list(inspect.signature(torch.optim.SGD).parameters.values())
    ours = list(inspect.signature(psi.PSISGD).parameters.values())
    assert [(p.name, p.kind, p.default) for p in ours[:-1]] == [(p.name, p.kind, p.default) for p in sgd]
    assert (ours[-1].name, ours[-1].kind, ours[-1].default) == ("max_norm", inspect.Parameter.KEYWORD_ONLY, psi.MAX_NORM)
    w = torch.randn(3, 2, requires_grad=True)
    g = psi.PSISGD([w], 0.1, 0.9, 0, 5e-4).param_groups[0]
    assert (g["lr"], g["momentum"], g["dampening"], g["weight_decay"], g["nesterov"]) == (0.1, 0.9, 0, 5e-4, False)
    assert psi.PSISGD([w]).param_groups[0]["lr"] == 1e-3


def test_state_dicts_without_new_keys_load_and_step():
    """Issue 16: a state dict saved by torch's SGD (no psi, max_norm) or an older torch/psi (no foreach,
    maximize, differentiable, fused) loads; a psi group stays psi, and a plain PSISGD loading an SGD
    checkpoint continues as SGD continues, to the bit."""
    torch.manual_seed(0)
    a = Mixed()
    batches = [(x.float(), y) for x, y in _batches(6)]
    sgd = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    _train(a, sgd, batches[:3])
    b = copy.deepcopy(a)
    opt = psi.PSISGD(b.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
    sd = copy.deepcopy(sgd.state_dict())
    for g in sd["param_groups"]:
        for k in ("foreach", "maximize", "differentiable", "fused"):
            del g[k]
    opt.load_state_dict(sd)
    _train(a, sgd, batches[3:])
    _train(b, opt, batches[3:])
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))

    x0 = torch.randn(8, 3, 16, 16)
    ref, old = Mixed(), Mixed()
    old.load_state_dict(ref.state_dict())
    opts = [psi.PSISGD(psi.param_groups(m, x0), lr=0.05, momentum=0.9) for m in (ref, old)]
    _train(ref, opts[0], batches[:2])
    old.load_state_dict(ref.state_dict())
    sd = copy.deepcopy(opts[0].state_dict())
    for g in sd["param_groups"]:
        for k in ("psi", "max_norm", "foreach", "maximize", "differentiable", "fused"):
            g.pop(k, None)
    opts[1].load_state_dict(sd)
    assert [g["psi"] for g in opts[1].param_groups] == [g["psi"] for g in opts[0].param_groups]
    _train(ref, opts[0], batches[2:])
    _train(old, opts[1], batches[2:])
    assert all(torch.equal(p, q) for p, q in zip(ref.parameters(), old.parameters(), strict=True))


@pytest.mark.parametrize("shape", [(), (1,), (1, 1)])
def test_tensor_lr_of_any_one_element_shape_on_psi_groups(shape):
    """Issue 16: a 1-element tensor lr steps a psi group as the float does (a [1, 1] one broke the step)."""
    out = []
    for lr in (0.1, torch.full(shape, 0.1)):
        w = torch.linspace(-1, 1, 12).reshape(4, 3).requires_grad_()
        opt = psi.PSISGD([{"params": [w], "psi": True}], lr=lr, momentum=0.9)
        for _ in range(2):
            w.grad = torch.linspace(0, 1, 12).reshape(4, 3)
            opt.step()
        out.append(w.detach())
    assert torch.equal(out[0], out[1])
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        psi.PSISGD([{"params": [w], "psi": True}], lr=torch.tensor([0.1, 0.1]))


@pytest.mark.parametrize("foreach", [False, True])
def test_maximize_with_weight_decay_is_minimizing_minus_loss(foreach):
    """Issue 16: maximize flips the gradient before weight decay is added (torch's order), so maximizing
    L with decay is minimizing -L with decay, to the bit."""
    out = []
    for maximize in (True, False):
        torch.manual_seed(0)
        lin = nn.Linear(4, 5).double()
        x = torch.randn(8, 4, dtype=torch.float64)
        opt = psi.PSISGD([{"params": [lin.weight, lin.bias], "psi": True, "weight_decay": 0.1}], lr=0.1,
                         momentum=0.9, maximize=maximize, foreach=foreach)
        for _ in range(3):
            opt.zero_grad()
            loss = lin(x).tanh().sum()
            (loss if maximize else -loss).backward()
            opt.step()
        out.append([lin.weight.detach(), lin.bias.detach()])
    assert all(torch.equal(p, q) for p, q in zip(*out, strict=True))


@pytest.mark.parametrize("foreach", [False, True])
def test_a_frozen_weight_still_counts_in_its_biases_neuron_norm(foreach):
    """Issue 16: a weight without a gradient this step (frozen) does not move, and its bias steps with eq. 7's
    norm of the whole neuron, ||w_i||^2 + b_i^2, not with b_i^2 alone (see PSISGD's doc for why)."""
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)  # another psi layer, stepping as usual
    opt = psi.PSISGD([{"params": [w, b], "psi": True}, {"params": [v], "psi": True}], lr=0.1, foreach=foreach)
    b.grad, v.grad = torch.randn(5, dtype=torch.float64), torch.randn(3, 2, dtype=torch.float64)
    w0 = w.detach().clone()
    eb = b.detach() - 0.1 * ((w * w).sum(1) + b * b).detach() * b.grad
    ev = v.detach() - 0.1 * (v * v).sum(1, keepdim=True).detach() * v.grad
    opt.step()
    assert torch.equal(w.detach(), w0)
    torch.testing.assert_close(b.detach(), eb, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(v.detach(), ev, rtol=1e-14, atol=1e-14)


def test_max_norm_rescales_weight_and_buffer_together():
    w = torch.tensor([[300.0, 400.0], [0.3, 0.4]], dtype=torch.float64, requires_grad=True)
    opt = psi.PSISGD([{"params": [w], "psi": True}], lr=1e-9, momentum=0.9, max_norm=100.0)
    w.grad = torch.tensor([[4.0, -3.0], [4.0, -3.0]], dtype=torch.float64)
    opt.step()
    buf = opt.state[w]["momentum_buffer"]
    torch.testing.assert_close(w.norm(dim=1), torch.tensor([1.0, 0.5], dtype=torch.float64), rtol=1e-6, atol=0)
    # Algorithm 1's u = -lr ||w||^2 G, then rescaled with its neuron (norm 500 > 100: by 1/500)
    torch.testing.assert_close(buf[0], -1e-9 * 500.0**2 * w.grad[0] / 500.0)
    torch.testing.assert_close(buf[1], -1e-9 * 0.5**2 * w.grad[1])


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("kw", [dict(), dict(momentum=0.9, weight_decay=1e-3), dict(momentum=0.9, nesterov=True),
                                dict(momentum=0.5, dampening=0.3, maximize=True)])
def test_non_psi_groups_are_torch_sgd_to_the_bit(foreach, kw):
    torch.manual_seed(0)
    a = Mixed()
    b = copy.deepcopy(a)
    batches = [(x.float(), y) for x, y in _batches(6)]
    _train(a, torch.optim.SGD(a.parameters(), lr=0.05, foreach=foreach, **kw), batches)
    _train(b, psi.PSISGD(b.parameters(), lr=0.05, foreach=foreach, **kw), batches)
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_weight_decay_is_off_on_psi_groups_unless_asked():
    model = Mixed()
    groups = psi.param_groups(model, torch.randn(4, 3, 16, 16))
    opt = psi.PSISGD(groups[:-1] + [groups[-1]] + [], lr=0.1, weight_decay=5e-4)
    assert {g["weight_decay"] for g in opt.param_groups if g["psi"]} == {0.0}
    assert opt.param_groups[-1]["weight_decay"] == 5e-4
    opt2 = psi.PSISGD([dict(groups[0], weight_decay=1e-2)], lr=0.1)
    assert opt2.param_groups[0]["weight_decay"] == 1e-2


@pytest.mark.parametrize("foreach", [False, True])
def test_state_dict_round_trip_mid_training(foreach, tmp_path):
    torch.manual_seed(0)
    x0 = torch.randn(8, 3, 16, 16)
    batches = [(x.float(), y) for x, y in _batches(10)]
    a = Mixed()
    opt = psi.PSISGD(psi.param_groups(a, x0), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    _train(a, opt, batches[:5])
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck.pt")
    _train(a, opt, batches[5:])
    b = Mixed()
    ck = torch.load(tmp_path / "ck.pt")
    b.load_state_dict(ck["model"])
    opt_b = psi.PSISGD(psi.param_groups(b, x0), lr=0.05, momentum=0.9, weight_decay=1e-4, foreach=foreach)
    opt_b.load_state_dict(ck["opt"])
    _train(b, opt_b, batches[5:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)


def test_gradscaler_skips_inf_steps():
    model = Mixed()
    opt = psi.PSISGD(psi.param_groups(model, torch.randn(4, 3, 16, 16)), lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = torch.randn(4, 3, 16, 16), torch.randint(5, (4,))
    before = [p.clone() for p in model.parameters()]
    loss = nn.functional.cross_entropy(model(x), y) * float("inf")
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(p, q) for p, q in zip(before, model.parameters()))
    assert scaler.get_scale() < 2.0**10
    opt.zero_grad()
    scaler.scale(nn.functional.cross_entropy(model(x), y)).backward()
    scaler.step(opt)
    scaler.update()
    assert not all(torch.equal(p, q) for p, q in zip(before, model.parameters()))


def test_step_under_torch_compile_matches_eager():
    torch.manual_seed(0)
    params = [torch.randn(8, 4, 3, 3, requires_grad=True), torch.randn(5, 6, requires_grad=True)]
    twins = [p.detach().clone().requires_grad_() for p in params]
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    eager = psi.PSISGD([{"params": params, "psi": True}], lr=0.1, momentum=0.9)
    compiled = psi.PSISGD([{"params": twins, "psi": True}], lr=0.1, momentum=0.9)
    step = torch.compile(compiled.step, fullgraph=False)
    for gs in grads:
        for p, q, g in zip(params, twins, gs):
            p.grad, q.grad = g.clone(), g.clone()
        eager.step()
        step()
    for p, q in zip(params, twins):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_no_host_sync_on_cuda():
    model = Mixed().cuda()
    x = torch.randn(4, 3, 16, 16, device="cuda")
    opt = psi.PSISGD(psi.param_groups(model, x), lr=0.1, momentum=0.9)
    for _ in range(2):  # the first step creates the buffers
        opt.zero_grad()
        model(x).sum().backward()
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


def test_benchmark_runs_and_prints_ratios(capsys):
    """Every contender gets a row with a positive time, and its ratio column is its time over torch
    SGD's, as far as the printed digits tell (times to 1e-3 ms, ratios to 1e-2)."""
    from psi.bench import cli as bench

    bench.main(["optimizer", "--models", "resnet20", "--steps", "1", "--rounds", "1", "--no-compile"])
    out = capsys.readouterr().out
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("resnet20 ")) + 2  # after the column heads
    rows = {}
    for ln in lines[start:]:
        if not ln.startswith("  "):
            break
        ms, ratio = ln[32:].split()  # name in a 30-wide column after two spaces: it holds spaces itself
        rows[ln[2:32].strip()] = (float(ms), float(ratio))
    expected = {"torch SGD (foreach)", "torch Adam (foreach)", "torch Adam (fused)", "psi.PSISGD (flat, default)",
                "psi.PSISGD (fused=False)", "psi.PSISGD (foreach=False)"}
    expected |= {name for name, module in (("adamp.SGDP", "adamp"), ("geoopt.RiemannianSGD", "geoopt"))
                 if importlib.util.find_spec(module) is not None}  # in requirements.txt; context when installed
    assert set(rows) == expected
    base = rows["torch SGD (foreach)"][0]
    for ms, ratio in rows.values():
        assert ms > 0
        slack = 0.005 + (ms / base) * (0.0005 / ms + 0.0005 / base)  # the ratio's rounding, and the times'
        assert abs(ratio - ms / base) <= slack, (ms, base, ratio)


def test_epoch_benchmark_times_every_paper_optimizer_beside_the_papers_ratio(capsys):
    from psi.bench import cli as bench

    bench.main(["epoch", "--models", "smallcnn", "--images", "128", "--rounds", "1"])
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln.split()[1:] for ln in out.splitlines() if ln.startswith("  ") and "ms/image" not in ln}
    assert set(rows) == {"sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm"}
    assert rows["sgd"][1] == "1.000" and rows["sgdg"][2] == f"{26.6 / 16.98:.3f}"  # section 6.2's V100 seconds
    assert all(float(r[0]) > 0 for r in rows.values())


# -- build_optimizer: the fewest groups, the same numbers as one group per layer -----------------

def _copies(n):
    torch.manual_seed(0)
    a = Mixed()
    return [a] + [copy.deepcopy(a) for _ in range(n - 1)]


def _per_layer(name, setting, model, x0):
    """What build_optimizer returned before it merged groups: one group per scale-invariant layer."""
    from psi.engine.optimizers import Combined, resolve

    spec, groups = resolve(name, setting), psi.param_groups(model, x0)
    hp = {k: v for k, v in spec[0].items() if k != "name"}
    if name == "sgd":
        return torch.optim.SGD(groups, **hp)
    if name == "sgdp":
        from adamp import SGDP

        return SGDP(groups, **hp)
    rest = {k: v for k, v in spec[1].items() if k != "name"}
    if name == "adam":
        return Combined(torch.optim.Adam(groups[:-1], **hp), torch.optim.SGD([groups[-1]], **rest))
    return psi.PSISGD([dict(g, **hp) for g in groups[:-1]] + [dict(groups[-1], **rest)], lr=hp["lr"])


@pytest.mark.parametrize("setting", ["table1", "table2"])
@pytest.mark.parametrize("name", ["sgd", "adam", "psi-sgd", "psi-sgdm", "sgdp"])
def test_merged_groups_equal_per_layer_groups_to_the_bit(name, setting):
    from psi.engine.optimizers import build_optimizer

    a, b = _copies(2)
    x0 = torch.randn(8, 3, 16, 16)
    merged = build_optimizer(name, a, x0, setting)
    assert len(merged.param_groups) == (1 if name in ("sgd", "sgdp") else 2)
    batches = [(x.float(), y) for x, y in _batches(6)]
    _train(a, merged, batches)
    _train(b, _per_layer(name, setting, b, x0), batches)
    for p, q in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["sgd", "adam", "psi-sgdm", "sgdp", "sgdg"])
def test_psi_layers_names_each_layers_tensors(name):
    from psi.engine.models import SmallCNN
    from psi.engine.optimizers import build_optimizer

    model = Mixed() if name != "sgdg" else SmallCNN(width=8)  # SGDG refuses Mixed's bias that scales
    x0 = torch.randn(8, 3, 16, 16)
    opt = build_optimizer(name, model, x0)
    mods = dict(model.named_modules())
    assert list(opt.psi_layers) == psi.find_scale_invariant(model, x0)
    for layer, tensors in opt.psi_layers.items():
        assert tensors[0] is mods[layer].weight and all(t is mods[layer].bias for t in tensors[1:])
    if name == "sgd":
        assert opt.psi_layers["biased"] == [model.biased.weight, model.biased.bias]
    flagged = [id(p) for g in opt.param_groups if g.get("psi") for p in g["params"]]
    if name not in ("sgd", "sgdp"):  # a psi group holds exactly these tensors, each layer's adjacent
        assert flagged == [id(t) for ts in opt.psi_layers.values() for t in ts]


# -- the fast path against psi.manifold's definitions ---------------------------------------------

@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("max_norm", [psi.MAX_NORM, None])
def test_one_step_is_the_retraction_of_the_riemannian_gradient(foreach, max_norm):
    """One PSI-SGD step (eq. 10, momentum 0) is ``R_W(-lr grad L)`` written with psi.manifold's eq. 7
    and eq. 8, on a product manifold of several layers. A bias that scales with its weight shares its
    neurons: the point is then the weight's rows with the bias as one more column."""
    g = torch.Generator().manual_seed(0)
    layers = [((6, 3, 3, 3), True), ((4, 7), False), ((5, 2, 3), False), ((8, 5), True), ((3, 4, 1, 1), False)]
    tensors, grads, points, egrads = [], [], [], []
    for shape, with_bias in layers:
        a = M.random_scales(shape[0], 1e-2, 1e2, generator=g)  # norms below MAX_NORM: no safeguard
        ts = [torch.randn(shape, generator=g, dtype=torch.float64)] + \
            ([torch.randn(shape[0], generator=g, dtype=torch.float64)] if with_bias else [])
        ts = [M.rescale(t, a) for t in ts]
        gs = [M.rescale(torch.randn(t.shape, generator=g, dtype=torch.float64), 1 / a) for t in ts]  # as eq. 5's
        tensors += ts
        grads += gs
        points.append(torch.cat([t.reshape(shape[0], -1) for t in ts], 1) if with_bias else ts[0])
        egrads.append(torch.cat([t.reshape(shape[0], -1) for t in gs], 1) if with_bias else gs[0])
    lr = 0.1
    expected = M.retr(points, [-lr * r for r in M.egrad2rgrad(points, egrads)])
    params = [t.clone().requires_grad_() for t in tensors]
    for p, gr in zip(params, grads, strict=True):
        p.grad = gr.clone()
    psi.PSISGD([{"params": params, "psi": True}], lr=lr, foreach=foreach, max_norm=max_norm).step()
    it = iter(params)
    for (shape, with_bias), e in zip(layers, expected, strict=True):
        w = next(it).detach()
        if with_bias:
            b = next(it).detach()
            torch.testing.assert_close(w, e[:, :-1].reshape(shape), rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b, e[:, -1], rtol=1e-12, atol=1e-12)
        else:
            torch.testing.assert_close(w, e, rtol=1e-12, atol=1e-12)


# -- effective learning rates (psi.engine.optimizers.effective_lr) ---------------------------------------

def test_effective_lr_is_what_the_run_records():
    """``_psi_layer_stats``'s ``eff_lr`` (each epoch's row of metrics.jsonl) is ``effective_lr`` to the bit,
    for every method, with a learning rate held as a tensor too (compiled steps)."""
    from psi.engine import epoch
    from psi.engine.models import SmallCNN
    from psi.engine.optimizers import EFFECTIVE_LR, OPTIMIZERS, build_optimizer, effective_lr

    assert set(EFFECTIVE_LR) == set(OPTIMIZERS)
    for name in OPTIMIZERS:
        torch.manual_seed(0)
        model = SmallCNN(width=8)
        with torch.no_grad():
            model.features[0].weight.mul_(7.0)  # norms far from 1, where the rules differ
        opt = build_optimizer(name, model, torch.randn(8, 3, 16, 16))
        opt.param_groups[0]["lr"] = torch.tensor(0.37)
        stats = epoch._psi_layer_stats(opt, name)
        for layer, tensors in opt.psi_layers.items():
            w = tensors[0].detach()
            lr = next(float(g["lr"]) for g in opt.param_groups if any(p is tensors[0] for p in g["params"]))
            eff = effective_lr(name, lr, w.reshape(w.shape[0], -1).square().sum(1).double()).item()
            recorded = stats[layer]["eff_lr"]
            assert (math.isnan(eff) and math.isnan(recorded)) if EFFECTIVE_LR[name] is None else eff == recorded
    with pytest.raises(ValueError, match="unknown optimizer"):
        effective_lr("lbfgs", 0.1, torch.ones(3))


@pytest.mark.parametrize("name", ["psi-sgd", "sgd"])
def test_effective_lr_is_the_turn_of_the_direction_per_unit_of_sphere_gradient(name):
    """The reason ``effective_lr`` gives: a small step of the method on a scale-invariant loss turns
    ``v(i) = w(i)/||w(i)||`` by the angle ``rate(i) * ||grad_v(i)||``; the mean over neurons of
    ``rate(i)`` is ``effective_lr``."""
    from psi.engine.optimizers import effective_lr

    g = torch.Generator().manual_seed(0)
    W = M.rescale(torch.randn(6, 5, generator=g, dtype=torch.float64), M.random_scales(6, 0.2, 5.0, generator=g))
    target = torch.randn(6, 5, generator=g, dtype=torch.float64)

    def loss(w):
        return ((M.canonical(w) - target) ** 3).sum()  # scale-invariant: a function of the directions

    V = M.canonical(W).requires_grad_()
    grad_v = M.proju(V.detach(), torch.autograd.grad(loss(V), V)[0])  # the gradient on the unit sphere
    p = W.clone().requires_grad_()
    p.grad = torch.autograd.grad(loss(p), p)[0]
    lr = 1e-7  # small: the first-order turn
    opt = psi.PSISGD([{"params": [p], "psi": True}], lr=lr) if name == "psi-sgd" else torch.optim.SGD([p], lr=lr)
    opt.step()
    angle = torch.stack([M.dist(a[None], b[None]) for a, b in zip(W, p.detach())])
    rate = angle / grad_v.norm(dim=1)
    torch.testing.assert_close(rate.mean(), effective_lr(name, lr, M.sqnorms(W)), rtol=1e-5, atol=0)
