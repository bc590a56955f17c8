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

    Every group carries ``'psi'`` (whether it holds scale-invariant weights) and, when it
    does, the layer ``'name'``, which the training loop reads for its per-layer statistics."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    hp = dict(DEFAULTS[name])
    for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay)):
        if v is not None:
            hp[k] = v
    rest = dict(REST, lr=REST["lr"] if rest_lr is None else rest_lr)
    groups = param_groups(model, example_input)
    psi_groups, other = groups[:-1], groups[-1]["params"]
    if name in ("sgd", "sgdp"):
        all_groups = [dict(g) for g in groups]
        if name == "sgd":
            return torch.optim.SGD(all_groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
        from adamp import SGDP

        return SGDP(all_groups, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"], nesterov=True)
    if name in ("psi-sgd", "psi-sgdm"):
        return PSISGD([dict(g, lr=hp["lr"], momentum=hp["momentum"], weight_decay=hp["weight_decay"])
                       for g in psi_groups] + [dict(params=other, psi=False, **rest)],
                      lr=hp["lr"], max_norm=max_norm)
    if name == "sgdg":
        return SGDG([dict(g, lr=hp["lr"]) for g in psi_groups] +
                    [dict(params=other, psi=False, lr=rest["lr"], weight_decay=rest["weight_decay"])],
                    lr=hp["lr"], momentum=hp["momentum"], grad_clip=hp["grad_clip"], rest_momentum=rest["momentum"])
    # adam: Adam on the PSI weights, SGD on the rest (F.2)
    adam = torch.optim.Adam([dict(g) for g in psi_groups], lr=hp["lr"], weight_decay=hp["weight_decay"])
    sgd = torch.optim.SGD([dict(params=other, psi=False)], **rest)
    return Combined(adam, sgd)
