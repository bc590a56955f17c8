"""SGDG (Cho and Lee 2017, the paper's SGDG baseline): what it promises, by hand and against their code.

Its rows stay at unit norm by construction (it renormalizes them), so that says nothing; what it
promises is Cho and Lee's update: the gradient projected to the tangent space, clipped to norm nu,
the momentum step along the great circle (the exponential map of the sphere) and the momentum
parallel-transported to the new point, where it is tangent.
"""

import math

import pytest
import torch

from psi.core import manifold as M
from psi.engine.sgdg import SGDG


def _by_hand(y, m, g, lr, momentum, nu):
    """Cho and Lee's SGD-G (their Algorithm 1, one neuron ``y`` of unit norm): ``h = g - (y.g) y``;
    ``h <- nu h/|h|`` if ``|h| > nu``; ``d = momentum m - lr h``; the geodesic from ``y`` with
    velocity ``d`` at time 1, ``y cos|d| + d/|d| sin|d|``; the momentum: its velocity there,
    ``d cos|d| - y |d| sin|d|``. Written neuron by neuron with Python floats for the angles."""
    h = g - torch.dot(y, g) * y
    hn = math.sqrt(torch.dot(h, h))
    if hn > nu:
        h = h * (nu / hn)
    d = momentum * m - lr * h
    t = math.sqrt(torch.dot(d, d))
    return y * math.cos(t) + d * (math.sin(t) / t), d * math.cos(t) - y * (t * math.sin(t))


def test_one_step_is_cho_and_lees_update_computed_by_hand():
    """Three neurons of a tiny conv layer, three steps: the clip binds for some neurons on some steps,
    momentum carries from step to step."""
    torch.manual_seed(0)
    w0 = torch.randn(3, 2, 2, dtype=torch.float64)
    w = w0.clone().requires_grad_()
    opt = SGDG([{"params": [w], "psi": True}], lr=0.3, momentum=0.9, grad_clip=0.5)
    ys = [r / math.sqrt(torch.dot(r, r)) for r in w0.reshape(3, -1)]  # SGDG starts from the unit rows
    ms = [torch.zeros(4, dtype=torch.float64) for _ in ys]
    clipped = 0
    for scale in (0.2, 3.0, 1.0):
        grad = torch.randn(3, 2, 2, dtype=torch.float64) * scale
        w.grad = grad.clone()
        opt.step()
        for i in range(3):
            g = grad[i].flatten()
            clipped += math.sqrt(torch.dot(g - torch.dot(ys[i], g) * ys[i], g - torch.dot(ys[i], g) * ys[i])) > 0.5
            ys[i], ms[i] = _by_hand(ys[i], ms[i], g, 0.3, 0.9, 0.5)
        torch.testing.assert_close(w.detach().reshape(3, -1), torch.stack(ys), rtol=0, atol=1e-12)
        torch.testing.assert_close(opt.state[w]["momentum"].reshape(3, -1), torch.stack(ms), rtol=0, atol=1e-12)
    assert 0 < clipped < 9  # both branches of the clip were taken


def test_transported_momentum_is_tangent_at_the_new_point_and_keeps_its_length():
    """Parallel transport along the geodesic: the new momentum of every neuron is orthogonal to the
    neuron's new position and as long as the step ``d`` it transports (an isometry), even for large
    turns (no clip, large steps)."""
    torch.manual_seed(1)
    w = torch.randn(5, 3, 3, dtype=torch.float64, requires_grad=True)
    opt = SGDG([{"params": [w], "psi": True}], lr=0.7, momentum=0.9, grad_clip=None)
    m = torch.zeros(5, 9, dtype=torch.float64)
    for _ in range(6):
        y = w.detach().reshape(5, -1).clone()
        g = torch.randn(5, 9, dtype=torch.float64)
        w.grad = g.view(5, 3, 3).clone()
        opt.step()
        d = 0.9 * m - 0.7 * (g - torch.linalg.vecdot(y, g)[:, None] * y)
        m = opt.state[w]["momentum"].reshape(5, -1).clone()  # the state is updated in place
        new_y = w.detach().reshape(5, -1)
        assert torch.linalg.vecdot(m, new_y).abs().max() < 1e-12
        torch.testing.assert_close(m.norm(dim=1), d.norm(dim=1), rtol=1e-12, atol=0)
        assert d.norm(dim=1).min() > 0.5  # turns of half a radian and more: a wrong transport would show
        assert torch.linalg.vecdot(m, y).abs().max() > 0.1  # the old point's tangent space is another one


def test_start_and_step_are_psi_manifolds_canonical_and_expmap():
    """psi.engine.sgdg writes out ``psi.manifold.canonical`` and ``psi.manifold.expmap`` (at unit norm) in the
    arithmetic its runs recorded; they agree to rounding. Momentum 0, no clip: one step is
    ``canonical(expmap(y, -lr proju(y, G)))``."""
    torch.manual_seed(2)
    ws = [torch.randn(s, dtype=torch.float64) * 10 for s in [(6, 3, 3, 3), (4, 7)]]
    params = [w.clone().requires_grad_() for w in ws]
    opt = SGDG([{"params": params, "psi": True}], lr=0.4, momentum=0.0, grad_clip=None)
    for p, w in zip(params, ws, strict=True):
        torch.testing.assert_close(p.detach(), M.canonical(w), rtol=0, atol=1e-15)
    ys = [p.detach().clone() for p in params]
    gs = [torch.randn_like(w) for w in ws]
    for p, g in zip(params, gs, strict=True):
        p.grad = g.clone()
    opt.step()
    for p, y, g in zip(params, ys, gs, strict=True):
        torch.testing.assert_close(p.detach(), M.canonical(M.expmap(y, -0.4 * M.proju(y, g))), rtol=0, atol=1e-12)


def _sgdg_per_layer(w, g, m, lr, momentum, clip):
    """The layer-by-layer SGDG step psi.engine.sgdg had before it stacked layers (about 35 ops a layer)."""
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
    from psi.engine.sgdg import _add_orthogonality

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
