"""The small problems of notebooks 01-03 and full-batch training on them.

- :func:`toy_regression`: section 6.1's data (main paper p. 7): 1000 samples ``x ~ N(0, I_10)``,
  ``y = mu^T x + eps``, ``eps ~ N(0, 1)``. The paper does not say how ``mu`` is drawn; we draw
  ``mu ~ N(0, I_10)``. ``noise`` scales ``eps`` (0: noise-free targets, a variant of notebook 03).
- :func:`small_images`: scikit-learn's ``digits`` (no download) or MNIST, for Figure 1.
- :func:`make_optimizer` and :data:`METHODS`: the methods of Figure 4's legend (GD, PSI-GD,
  PSI-GDM, GDG, Adam) and the text's "SGD with momentum" (p. 8), here full batch: ``gdm``.
- :func:`train_full_batch`: a model trained on the whole batch by one of them, recording at every
  iterate the loss and the two gradient norms: the one of the theorems (section 5, in the
  normalized weights ``V`` and the other parameters ``g``) and the plain Euclidean one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psi.core import manifold as M
from psi.core.discovery import param_groups
from psi.core.psisgd import PSIGD
from psi.engine.sgdg import SGDG
from psi.paper.loop import train_steps

__all__ = ["METHODS", "LABELS", "toy_regression", "small_images", "vg_grad_norm", "euclid_grad_norm",
           "make_optimizer", "train_full_batch"]

METHODS = ("gd", "gdm", "psi-gd", "psi-gdm", "gdg", "adam")
LABELS = {"gd": "GD", "gdm": "GD + momentum", "psi-gd": "PSI-GD", "psi-gdm": "PSI-GDM", "gdg": "GDG", "adam": "Adam"}


def toy_regression(n: int = 1000, d: int = 10, seed: int = 0, dtype: torch.dtype = torch.float64,
                   noise: float = 1.0) -> tuple[Tensor, Tensor]:
    """``x ~ N(0, I_d)``, ``y = mu^T x + noise * eps`` with ``mu ~ N(0, I_d)``, ``eps ~ N(0, 1)``.

    The draws do not depend on ``noise``: the noise-free targets are the same ``mu^T x``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    mu = torch.randn(d, generator=g, dtype=dtype)
    return x, x @ mu + noise * torch.randn(n, generator=g, dtype=dtype)


def vg_grad_norm(groups: list[dict]) -> float:
    """``||grad_{V,g} L||`` (section 5): for a scale-invariant weight the gradient in ``v = w/||w||``
    is ``||w(i)|| G(i)`` per neuron (the Riemannian gradient's length under metric (6)); for the
    other parameters, the plain gradient. Read it where ``.grad`` belongs to the current weights."""
    total = 0.0
    for grp in groups:
        for p in grp["params"]:
            if p.grad is None:
                continue
            if grp.get("psi"):
                total += float((M.sqnorms(p.detach()) * M.sqnorms(p.grad)).sum())
            else:
                total += float(p.grad.square().sum())
    return total**0.5


def euclid_grad_norm(model: nn.Module) -> float:
    """The plain Euclidean norm of every parameter's gradient (what a training log usually shows)."""
    return sum(float(p.grad.square().sum()) for p in model.parameters() if p.grad is not None) ** 0.5


def make_optimizer(method: str, groups: list[dict], lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``method`` on ``groups`` from :func:`psi.param_groups`: the scale-invariant weights take it, the
    rest plain GD (``gd``, ``psi-gd``, ``gdg``), GD with momentum (``gdm``, ``psi-gdm``) or Adam."""
    if method == "gd":
        return torch.optim.SGD(groups, lr=lr)
    if method == "gdm":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if method in ("psi-gd", "psi-gdm"):
        return PSIGD(groups, lr=lr, momentum=momentum if method == "psi-gdm" else 0.0)
    if method == "gdg":
        return SGDG(groups, lr=lr, momentum=momentum, grad_clip=None, rest_momentum=0.0)
    if method == "adam":
        return torch.optim.Adam(groups, lr=lr)
    raise ValueError(f"unknown method {method!r}; valid: {', '.join(METHODS)}")


def train_full_batch(model: nn.Module, method: str, x: Tensor, y: Tensor, steps: int, lr: float,
                     loss_fn: Callable[[Tensor, Tensor], Tensor] = F.mse_loss,
                     momentum: float = 0.9) -> dict[str, list[float]]:
    """Train on the whole batch; per iterate (before each step) ``loss``, ``grad_norm``
    (:func:`vg_grad_norm`) and ``egrad_norm`` (:func:`euclid_grad_norm`). A diverged run stops
    early: its lists are shorter than ``steps``."""
    groups = param_groups(model, x)
    opt = make_optimizer(method, groups, lr, momentum)
    hist: dict[str, list[float]] = {"loss": [], "grad_norm": [], "egrad_norm": []}

    def record(loss: Tensor) -> None:
        hist["loss"].append(float(loss))
        hist["grad_norm"].append(vg_grad_norm(groups))
        hist["egrad_norm"].append(euclid_grad_norm(model))

    for _ in train_steps(model, opt, x, y, steps, None, loss_fn, before_step=record):
        pass
    if hist["loss"] and not math.isfinite(hist["loss"][-1]):
        for v in hist.values():
            v.pop()
    return hist


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
