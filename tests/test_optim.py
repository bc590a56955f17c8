"""PSISGD: Theorem 1, the step against eq. 10 / Algorithm 1, torch SGD on the rest, state."""

import copy
import math

import pytest
import torch
from torch import nn

import psi
from psi import manifold as M
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
    moved = M.dist(_psi_weights(model, groups), [M.canonical(w) for w in _psi_weights(net(), groups)])
    assert moved > 0.1  # it did train


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
    from psi import bench

    bench.main(["optimizer", "--models", "resnet20", "--steps", "1", "--rounds", "1", "--no-compile"])
    out = capsys.readouterr().out
    assert "torch SGD (foreach)" in out and "psi.PSISGD" in out and "1.00" in out



def test_epoch_benchmark_times_every_paper_optimizer_beside_the_papers_ratio(capsys):
    from psi import bench

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
    from psi.optimizers import Combined, resolve

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
    from psi.optimizers import build_optimizer

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
    from psi.models import SmallCNN
    from psi.optimizers import build_optimizer

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


def _sgdg_per_layer(w, g, m, lr, momentum, clip):
    """The layer-by-layer SGDG step psi.sgdg had before it stacked layers (about 35 ops a layer)."""
    y, g = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
    h = g - torch.linalg.vecdot(y, g).unsqueeze(1) * y
    hn = torch.linalg.vector_norm(h, dim=1, keepdim=True)
    h = h * torch.clamp(clip / hn.clamp_min(1e-30), max=1.0)
    d = -lr * h if m is None else momentum * m - lr * h
    dn = torch.linalg.vector_norm(d, dim=1, keepdim=True)
    new_y = y * torch.cos(dn) + d / dn.clamp_min(1e-30) * torch.sin(dn)
    m = d * torch.cos(dn) - y * (dn * torch.sin(dn))
    return (new_y / torch.linalg.vector_norm(new_y, dim=1, keepdim=True)).view_as(w), m


def test_sgdg_stacked_layers_match_the_layer_by_layer_step():
    from psi.sgdg import SGDG

    torch.manual_seed(0)
    shapes = [(8, 3, 3, 3), (8, 8, 3, 3), (8, 8, 3, 3), (16, 8, 3, 3), (16, 16, 3, 3), (16, 16, 3, 3), (5, 7)]
    ws = [torch.randn(s, requires_grad=True) for s in shapes]
    rest = [torch.randn(16, requires_grad=True)]
    opt = SGDG([{"params": ws, "psi": True}, {"params": rest, "weight_decay": 5e-4}], lr=0.2, momentum=0.9)
    ref = [w.detach().clone() for w in ws]  # SGDG put them on the sphere
    ref_rest = torch.optim.SGD(r := [p.detach().clone().requires_grad_() for p in rest], lr=0.2, momentum=0.9,
                               weight_decay=5e-4)
    ms = [None] * len(ws)
    for step in range(8):
        gs = [torch.randn_like(w) * (1.0 if step % 2 else 0.01) for w in ws]  # the clip binds on odd steps only
        for w, g in zip(ws, gs, strict=True):
            w.grad = g.clone()
        rest[0].grad = r[0].grad = torch.randn(16)
        opt.step()
        ref_rest.step()
        for k, g in enumerate(gs):
            ref[k], ms[k] = _sgdg_per_layer(ref[k], g, ms[k], 0.2, 0.9, 0.1)
        for w, e, m, g in zip(ws, ref, ms, gs, strict=True):
            assert torch.equal(w.grad, g)  # the step works in place on copies, never on .grad
            torch.testing.assert_close(w.detach(), e, rtol=0, atol=1e-6)
            torch.testing.assert_close(opt.state[w]["momentum"].reshape(m.shape), m, rtol=0, atol=1e-6)
        assert torch.equal(rest[0], r[0])
    with pytest.raises(ValueError, match="weight tensors only"):
        SGDG([{"params": [torch.randn(4, 3), torch.randn(4)], "psi": True}], lr=0.1)


# -- SGDG against Cho and Lee's code ----------------------------------------------------------

def _cho_lee_step(p, grad, mom, lr, momentum, omega, grad_clip, eps):
    """One step of SGDG as Cho and Lee's code makes it (riemannian-batch-normalization-pytorch,
    ``grassmann_optimizer.SGDG.step`` with ``gutils``; their TensorFlow code's ``SgdgOptimizer`` and
    orthogonality loss are the same), transcribed operation by operation for a single layer ``p``
    (neurons on axis 0): the new ``p`` and the new momentum. ``eps``: their ``unit`` divides by
    ``norm + 1e-8``."""
    def unit(v):
        n = v.norm(dim=1, keepdim=True)
        return v / (n + eps), n

    unity, _ = unit(p.reshape(p.shape[0], -1))
    g = grad.reshape(p.shape[0], -1).clone()
    if omega != 0:  # their comment: L=|Y'Y-I|^2/2=|YY'-I|^2/2+c, dL/dY=2(YY'Y-Y)
        g = g + 2 * omega * (unity @ unity.t() @ unity - unity)
    h = g - (unity * g).sum(1, keepdim=True) * unity  # gproj
    if grad_clip is not None:  # clip_by_norm: rows longer than grad_clip scaled down to it
        hn = h.norm(dim=1, keepdim=True)
        scale = torch.ones_like(hn)
        mask = hn > grad_clip
        scale[mask] = grad_clip / hn[mask]
        h = h * scale
    mom_new = momentum * mom - lr * h
    u, hnorm = unit(mom_new)
    new_p = unity * hnorm.cos() + u * hnorm.sin()  # gexp
    new_mom = (u * hnorm.cos() - unity * hnorm.sin()) * hnorm  # gpt
    return new_p.view_as(p), new_mom


@pytest.mark.parametrize("eps,atol", [(0.0, 1e-12), (1e-8, 1e-6)], ids=["exact", "their-eps"])
@pytest.mark.parametrize("omega", [0.0, 0.1])
def test_sgdg_is_cho_and_lees_update(omega, eps, atol):
    """Layers stacked by trailing shape, orthogonality regularizer per layer, clipping that binds on
    some steps: every weight (as a unit row: their rows drift off the sphere by their ``eps``) and
    momentum equals their code's, step after step (float64): to rounding without their ``eps``, to
    about its size with it."""
    from psi.sgdg import SGDG

    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (6, 4, 3, 3), (6, 4, 3, 3), (5, 7)]  # two layers share a trailing shape
    ws = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    opt = SGDG([{"params": ws, "psi": True}], lr=0.2, momentum=0.9, grad_clip=0.1, omega=omega)
    ref = [w.detach().clone() for w in ws]  # on the sphere already: they initialise to unit norm too
    moms = [torch.zeros(s[0], math.prod(s[1:]), dtype=torch.float64) for s in shapes]
    for step in range(8):
        gs = [torch.randn_like(w) * (1.0 if step % 2 else 0.01) for w in ws]
        for w, g in zip(ws, gs, strict=True):
            w.grad = g.clone()
        opt.step()
        for k, g in enumerate(gs):
            ref[k], moms[k] = _cho_lee_step(ref[k], g, moms[k], 0.2, 0.9, omega, 0.1, eps)
            rows = ref[k].reshape(shapes[k][0], -1)
            torch.testing.assert_close(ws[k].detach(), (rows / rows.norm(dim=1, keepdim=True)).view_as(ref[k]), rtol=0,
                                       atol=atol)
            torch.testing.assert_close(opt.state[ws[k]]["momentum"].reshape(moms[k].shape), moms[k], rtol=0, atol=atol)
            assert torch.equal(ws[k].grad, g)  # .grad untouched, regularizer included


def test_orthogonality_term_is_the_gradient_of_the_regularizer_of_each_layer():
    """``2 omega (Y Y^T Y - Y)`` is autograd's gradient of ``omega/2 ||Y Y^T - I||_F^2`` for each
    layer's unit rows, and stacking layers adds no cross-layer term."""
    from psi.sgdg import _add_orthogonality

    torch.manual_seed(0)
    layers = [torch.nn.functional.normalize(torch.randn(n, 9, dtype=torch.float64), dim=1) for n in (3, 5)]
    expected = []
    for y in layers:
        y = y.clone().requires_grad_()
        (0.05 * (y @ y.T - torch.eye(len(y), dtype=torch.float64)).square().sum()).backward()
        expected.append(y.grad)
    g = torch.zeros(8, 9, dtype=torch.float64)
    _add_orthogonality(g, torch.cat(layers), [3, 5], omega=0.1)
    torch.testing.assert_close(g, torch.cat(expected))
