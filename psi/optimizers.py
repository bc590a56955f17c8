"""The paper's optimizers (and SGDP) by name, with appendix F.2's defaults.

The reading we run of F.2 (Table 3) and section 6.2, which disagree in places:

- "The PSI parameters are updated by the various methods while non-PSI parameters are all
  updated by SGD" (F.2): in every method but ``sgd`` and ``sgdp``, the scale-invariant weights
  (found by :func:`psi.param_groups`) take the named method and everything else takes SGD with
  lr 0.1, momentum 0.9, L2 5e-4 (``REST``).
- Learning rates are Table 3's: SGD 0.1, Adam 1e-3, SGDG 0.2, PSI-SGD 1.0, PSI-SGDM 0.1. Section
  6.2 says "the learning rate starts from 0.1" for all; we take the table (PSI-SGD without
  momentum at 0.1 would take steps ten times smaller than PSI-SGDM's at 0.1).
- "Regularizer" 5e-4 for PSI-SGD/PSI-SGDM in Table 3 contradicts section 6.2 ("we do not use
  the regularizer to the PSI weights ... it breaks the PSI property"): we apply it to the
  non-PSI parameters only. SGD, Adam and SGDP use it on every parameter.
- SGDG's "regularizer 0.1" follows Cho and Lee: we read it as their gradient-clipping
  threshold nu = 0.1 (an L2 term on unit-norm weights would be constant); SGDG's momentum
  is Cho and Lee's 0.9 (Table 3 shows none).
- ``sgdp`` (Heo et al. 2021, package ``adamp``) is not in the paper: SGDP with momentum 0.9,
  Nesterov and L2 5e-4 on every parameter, as its authors recommend.

Every value can be overridden (``lr``, ``momentum``, ``weight_decay``, ``rest_lr``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .discovery import param_groups
from .optim import PSISGD
from .sgdg import SGDG

__all__ = ["OPTIMIZERS", "DEFAULTS", "REST", "build_optimizer", "Combined"]

OPTIMIZERS = ("sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm", "sgdp")
DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
    "adam": dict(lr=1e-3, weight_decay=5e-4),
    "sgdg": dict(lr=0.2, momentum=0.9, grad_clip=0.1),
    "psi-sgd": dict(lr=1.0, momentum=0.0, weight_decay=0.0),
    "psi-sgdm": dict(lr=0.1, momentum=0.9, weight_decay=0.0),
    "sgdp": dict(lr=0.1, momentum=0.9, weight_decay=5e-4),
}
REST = dict(lr=0.1, momentum=0.9, weight_decay=5e-4)


class Combined(torch.optim.Optimizer):
    """Several optimizers stepped as one (Adam on the PSI weights, SGD on the rest).

    ``param_groups`` is the concatenation of theirs, so schedules written for one optimizer
    work unchanged; ``state_dict`` holds each one's."""

    def __init__(self, *optimizers: torch.optim.Optimizer) -> None:  # noqa: D107 - no super(): a facade
        self.optimizers = optimizers
        self.defaults: dict[str, Any] = {}

    @property
    def param_groups(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [g for o in self.optimizers for g in o.param_groups]

    @property
    def state(self):  # type: ignore[override]
        return {k: v for o in self.optimizers for k, v in o.state.items()}

    def step(self, closure=None):  # noqa: ANN001
        loss = closure() if closure is not None else None
        for o in self.optimizers:
            o.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers:
            o.zero_grad(set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        for o, s in zip(self.optimizers, state_dict["optimizers"], strict=True):
            o.load_state_dict(s)


def build_optimizer(name: str, model: nn.Module, example_input: Any, *, lr: float | None = None,
                    momentum: float | None = None, weight_decay: float | None = None, rest_lr: float | None = None,
                    max_norm: float | None = 1e4) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model`` with F.2's defaults (see the module docstring).

    Every optimizer gets the fewest parameter groups its hyperparameters allow, because on a
    GPU these small networks are bound by kernel launches and a group costs launches of its
    own: ``sgd`` and ``sgdp`` one group; ``psi-sgd``, ``psi-sgdm`` and ``sgdg`` one group with
    ``psi=True`` holding every scale-invariant tensor (a layer's weight, then its bias when the
    bias scales with it: :class:`psi.PSISGD` pairs a 1-D tensor with the weight just before
    it) and one with ``psi=False``; ``adam`` one group each for Adam (``psi=True``) and SGD. The
    results are those of one group per layer (tested). torch's SGD and Adam take their
    multi-tensor (foreach) path on every device: torch picks it on GPUs only, and with it an op
    count measured on the CPU (``python -m psi.bench ops``) is the one a GPU sees.

    The returned optimizer has an attribute ``psi_layers: dict[str, list[Tensor]]``: the
    scale-invariant layers (names as in ``model.named_modules()``, module order) and their
    tensors, ``[weight]`` or ``[weight, bias]``, for per-layer statistics (the groups no longer
    say which layer a tensor belongs to)."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    hp = dict(DEFAULTS[name])
    for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if v is not None:
            hp[k] = v
    rest = dict(REST, lr=REST["lr"] if rest_lr is None else rest_lr)
    groups = param_groups(model, example_input)
    layers = {g["name"]: list(g["params"]) for g in groups[:-1]}
    scale_invariant = [p for ps in layers.values() for p in ps]  # each layer's tensors adjacent, weight first
    other = groups[-1]["params"]
    opt: torch.optim.Optimizer
    if name == "sgd":
        opt = torch.optim.SGD(scale_invariant + other, lr=hp["lr"], momentum=hp["momentum"],
                              weight_decay=hp["weight_decay"], foreach=True)
    elif name == "sgdp":
        from adamp import SGDP

        opt = SGDP(scale_invariant + other, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"],
                   nesterov=True)
    elif name in ("psi-sgd", "psi-sgdm"):
        opt = PSISGD([dict(params=scale_invariant, psi=True, momentum=hp["momentum"], weight_decay=hp["weight_decay"]),
                      dict(params=other, psi=False, **rest)], lr=hp["lr"], max_norm=max_norm)
    elif name == "sgdg":
        opt = SGDG([dict(params=scale_invariant, psi=True),
                    dict(params=other, psi=False, lr=rest["lr"], weight_decay=rest["weight_decay"])],
                   lr=hp["lr"], momentum=hp["momentum"], grad_clip=hp["grad_clip"], rest_momentum=rest["momentum"])
    else:  # adam: Adam on the PSI weights, SGD on the rest (F.2)
        opt = Combined(torch.optim.Adam([dict(params=scale_invariant, psi=True)], lr=hp["lr"],
                                        weight_decay=hp["weight_decay"], foreach=True),
                       torch.optim.SGD([dict(params=other, psi=False)], **rest, foreach=True))
    opt.psi_layers = layers  # type: ignore[attr-defined]
    return opt
