"""Each manifold operation against its definition in section 4 of the paper (pp. 1130-1131): Definition 1,
the metric (6) of Proposition 2, the Riemannian gradient (7), the retraction (8) of Proposition 3."""

import math

import pytest
import torch

from psi.core import manifold as M

SHAPES = [(7, 5), (6, 3, 3, 3), (4, 2, 3)]


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def point(shape):
    return torch.randn(shape) * M.rescale(torch.ones(shape), M.random_scales(shape[0], 1e-2, 1e2))


def horizontal(W):
    return M.proju(W, torch.randn_like(W))


def test_sqnorms_canonical_rescale():
    W = point((6, 3, 3, 3))
    ref = torch.stack([w.flatten().dot(w.flatten()) for w in W])
    torch.testing.assert_close(M.sqnorms(W), ref)
    torch.testing.assert_close(M.sqnorms(M.canonical(W)), torch.ones(6))
    a = M.random_scales(6)
    torch.testing.assert_close(M.rescale(W, a), torch.stack([ai * w for ai, w in zip(a, W)]))
    torch.testing.assert_close(M.canonical(M.rescale(W, a)), M.canonical(W))


@pytest.mark.parametrize("shape", SHAPES)
def test_inner_and_dist_do_not_depend_on_representative(shape):
    W, W2 = point(shape), point(shape)
    X, Y = torch.randn(shape), torch.randn(shape)
    a, b = M.random_scales(shape[0]), M.random_scales(shape[0])
    # tangent vectors move with the point: d/dt T_a(W + tX) = T_a X
    torch.testing.assert_close(M.inner(M.rescale(W, a), M.rescale(X, a), M.rescale(Y, a)), M.inner(W, X, Y))
    torch.testing.assert_close(M.dist(M.rescale(W, a), M.rescale(W2, b)), M.dist(W, W2))
    ref = sum((x * y).sum() / (w * w).sum() for w, x, y in zip(W, X, Y))
    torch.testing.assert_close(M.inner(W, X, Y), ref)


@pytest.mark.parametrize("shape", SHAPES)
def test_proju_is_horizontal_projection(shape):
    W, X = point(shape), torch.randn(shape)
    H = M.proju(W, X)
    torch.testing.assert_close(torch.linalg.vecdot(H.flatten(1), W.flatten(1)), torch.zeros(shape[0]), atol=1e-10, rtol=0)
    torch.testing.assert_close(M.proju(W, H), H)  # idempotent
    torch.testing.assert_close(M.proju(W, M.rescale(W, torch.rand(shape[0]))), torch.zeros(shape), atol=1e-10, rtol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_expmap_keeps_norms_and_starts_along_the_vector(shape):
    W, X = point(shape), None
    X = horizontal(W)
    E = M.expmap(W, X)
    torch.testing.assert_close(M.sqnorms(E), M.sqnorms(W))
    h = 1e-6
    deriv = (M.expmap(W, h * X) - M.expmap(W, -h * X)) / (2 * h)
    torch.testing.assert_close(deriv, X, rtol=1e-6, atol=1e-8)
    # a geodesic: the distance travelled is the metric length of X (while angles stay < pi)
    small = X / (10 * M.norm(W, X))
    torch.testing.assert_close(M.dist(W, M.expmap(W, small)), M.norm(W, small))
    torch.testing.assert_close(M.expmap(W, torch.zeros(shape)), W)


def test_retr_agrees_with_expmap_to_first_order():
    W = point((8, 4))
    X = horizontal(W)
    for t in (1e-2, 1e-3):
        gap = M.dist(M.retr(W, t * X), M.expmap(W, t * X))
        assert gap < 10 * t**2 * M.norm(W, X) ** 2 + 1e-12  # second order in t


def test_egrad2rgrad_of_invariant_loss_is_horizontal_and_steepest():
    W = point((5, 6)).requires_grad_()
    target = torch.randn(5, 6)
    loss = ((M.canonical(W) - target) ** 2).sum()  # invariant under T_a
    (G,) = torch.autograd.grad(loss, W)
    R = M.egrad2rgrad(W.detach(), G)
    torch.testing.assert_close(torch.linalg.vecdot(R.flatten(1), W.detach().flatten(1)), torch.zeros(5),
                               atol=1e-10, rtol=0)
    # Riesz: <R, X>_W equals the directional derivative G . X for every X
    X = torch.randn(5, 6)
    torch.testing.assert_close(M.inner(W.detach(), R, X), (G * X).sum())


def test_dist_is_a_metric():
    pts = [point((6, 4)) for _ in range(12)]
    for P in pts:
        assert M.dist(P, P) < 1e-7
        assert M.dist(P, -P) == pytest.approx(math.pi * math.sqrt(6))
    for P in pts:
        for Q in pts:
            torch.testing.assert_close(M.dist(P, Q), M.dist(Q, P))
            if P is not Q:
                assert M.dist(P, Q) > 0
            for R in pts[:4]:
                assert M.dist(P, R) <= M.dist(P, Q) + M.dist(Q, R) + 1e-12


def test_product_manifold_lists():
    Ws = [point(s) for s in SHAPES]
    Xs = [torch.randn(s) for s in SHAPES]
    torch.testing.assert_close(M.inner(Ws, Xs, Xs), sum(M.inner(w, x, x) for w, x in zip(Ws, Xs)))
    Vs = [point(s) for s in SHAPES]
    torch.testing.assert_close(M.dist(Ws, Vs) ** 2, sum(M.dist(w, v) ** 2 for w, v in zip(Ws, Vs)))
    assert all(torch.equal(p, M.proju(w, x)) for p, w, x in zip(M.proju(Ws, Xs), Ws, Xs))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dtypes(dtype):
    W = torch.randn(4, 3, dtype=dtype)
    X = M.proju(W, torch.randn(4, 3, dtype=dtype))
    for out in (M.canonical(W), M.expmap(W, X), M.egrad2rgrad(W, X), M.retr(W, X), M.dist(W, W + X)):
        assert out.dtype == dtype
