"""Full-batch experiments on small problems (section 6.1, Figure 1), shared by the notebooks.

- :func:`toy_regression`: 1000 samples ``x ~ N(0, I_10)``, ``y = mu^T x + eps``, ``eps ~ N(0, 1)``.
- :func:`train_full_batch`: a model trained on one batch by a named method (GD, PSI-GD, PSI-GDM,
  GDG, Adam), recording the loss and the gradient norm of section 5 (in the normalized weights
  ``V`` and the other parameters ``g``) at every step.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import manifold as M
from .discovery import param_groups
from .optim import PSIGD
from .sgdg import SGDG

__all__ = ["toy_regression", "vg_grad_norm", "make_optimizer", "train_full_batch", "METHODS"]

METHODS = ("gd", "psi-gd", "psi-gdm", "gdg", "adam")


def toy_regression(n: int = 1000, d: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64):
    """Section 6.1's data: ``x ~ N(0, I_d)``, ``y = mu^T x + eps`` with ``mu ~ N(0, I_d)``, ``eps ~ N(0, 1)``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    mu = torch.randn(d, generator=g, dtype=dtype)
    return x, x @ mu + torch.randn(n, generator=g, dtype=dtype)


def vg_grad_norm(model: nn.Module, groups: list[dict]) -> float:
    """``||grad_{V,g} L||``: for a scale-invariant weight the gradient in ``v = w/||w||`` is
    ``||w(i)|| G(i)`` per neuron (the Riemannian gradient's length under metric (6)); for the
    other parameters, the plain gradient."""
    total = 0.0
    for grp in groups:
        for p in grp["params"]:
            if p.grad is None:
                continue
            if grp["psi"]:
                total += float(M.inner(p.detach(), M.egrad2rgrad(p.detach(), p.grad), M.egrad2rgrad(p.detach(), p.grad)))
            else:
                total += float(p.grad.square().sum())
    return total**0.5


def make_optimizer(method: str, model: nn.Module, example: Tensor, lr: float, rest_lr: float | None = None,
                   momentum: float = 0.9) -> torch.optim.Optimizer:
    """The scale-invariant weights take ``method``; the rest plain GD with ``rest_lr`` (default ``lr``)."""
    groups = param_groups(model, example)
    psi_groups, rest = groups[:-1], dict(groups[-1], lr=lr if rest_lr is None else rest_lr)
    if method == "gd":
        return torch.optim.SGD(groups, lr=lr)
    if method in ("psi-gd", "psi-gdm"):
        return PSIGD(psi_groups + [rest], lr=lr, momentum=momentum if method == "psi-gdm" else 0.0)
    if method == "gdg":
        return SGDG(psi_groups + [rest], lr=lr, momentum=momentum, grad_clip=None, rest_momentum=0.0)
    if method == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def train_full_batch(model: nn.Module, method: str, x: Tensor, y: Tensor, steps: int, lr: float,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss, **kw) -> dict[str, list[float]]:
    """Train on the whole batch; return per-step ``loss`` and ``grad_norm`` (before each step)."""
    opt = make_optimizer(method, model, x, lr, **kw)
    groups = param_groups(model, x)
    hist: dict[str, list[float]] = {"loss": [], "grad_norm": []}
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        hist["loss"].append(float(loss.detach()))
        hist["grad_norm"].append(vg_grad_norm(model, groups))
        if not torch.isfinite(loss):
            break
        opt.step()
    return hist


# -- Figure 1: a two-layer BN classifier from an unbalanced start ----------------------------

def small_images(name: str = "digits", data_dir: str | None = None) -> tuple[Tensor, Tensor]:
    """Standardized flat images and labels: scikit-learn's ``digits`` (8x8, 1797 images, shipped
    with the package) or MNIST's training set from ``data_dir`` (``mnist.npz`` as Keras saves it,
    or the raw ``train-images-idx3-ubyte[.gz]`` and ``train-labels-idx1-ubyte[.gz]``)."""
    import gzip
    from pathlib import Path

    import numpy as np

    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y = d.data.astype("float32"), d.target
    elif name == "mnist":
        root = Path(data_dir or "data")
        npz = sorted(root.rglob("mnist.npz"))
        raw = sorted(root.rglob("train-images-idx3-ubyte*"))
        if npz:
            z = np.load(npz[0])
            x, y = z["x_train"].reshape(len(z["x_train"]), -1).astype("float32"), z["y_train"]
        elif raw:
            def read(p: Path, offset: int) -> np.ndarray:
                b = gzip.open(p).read() if p.suffix == ".gz" else p.read_bytes()
                return np.frombuffer(b, dtype=np.uint8, offset=offset)

            x = read(raw[0], 16).reshape(-1, 784).astype("float32")
            y = read(Path(str(raw[0]).replace("images-idx3", "labels-idx1")), 8)
        else:
            raise FileNotFoundError(f"MNIST not found under {root}: put mnist.npz or train-images-idx3-ubyte(.gz) "
                                    f"and train-labels-idx1-ubyte(.gz) there, or use dataset='digits' (no download)")
    else:
        raise ValueError(f"unknown dataset {name!r}; valid: digits, mnist")
    xt = torch.from_numpy(x)
    xt = (xt - xt.mean(0)) / (xt.std(0) + 1e-6)
    return xt, torch.as_tensor(np.asarray(y), dtype=torch.long)


def unbalanced_mlp(d_in: int, hidden: int, classes: int, scales: tuple[float, ...], seed: int = 0) -> nn.Module:
    """Linear-BN-ReLU-Linear with the hidden neurons split into ``len(scales)`` equal groups,
    group ``k`` multiplied by ``scales[k]`` (Figure 1: ``T_a(W)`` with ``a = (1e4, 1e4, 1e-4, 1e-4)``)."""
    from .models import BNMLP

    torch.manual_seed(seed)
    model = BNMLP(d_in, [hidden], classes)
    a = torch.tensor(scales, dtype=torch.float32).repeat_interleave(hidden // len(scales))
    with torch.no_grad():
        model.net[1].weight.copy_(M.rescale(model.net[1].weight, a))
    return model


def train_minibatch(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, epochs: int,
                    batch_size: int = 64, seed: int = 0) -> list[float]:
    """Minibatch training; the loss on the whole training set (train mode) after every epoch."""
    g = torch.Generator().manual_seed(seed)
    history = []
    for _ in range(epochs):
        perm = torch.randperm(len(x), generator=g)
        model.train()
        for i in range(0, len(x) - batch_size + 1, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            history.append(float(F.cross_entropy(model(x), y)))
    return history
