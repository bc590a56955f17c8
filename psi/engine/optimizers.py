"""The paper's optimizers (and SGDP) by name, under a named setting; every reading of the paper in one place.

Page numbers: the paper as published (PMLR 180, pp. 1128-1137; p. 1134 is page 7 of its PDF) and
its supplement (``supp.``, page of its PDF). A run records the setting and, for every optimizer
group, the hyperparameters its optimizer read (:func:`describe`, in ``config.json``): the
analysis reads those, so changing a value below never relabels a finished run.

Settings (``SETTINGS``):

- ``table1`` (the default): section 6's runs, reported in Table 1 (p. 1134). "The experimental
  results in Section 6 are conducted without regularizer" (supp. F.1, p. 17), so no method has
  an L2 term or an orthogonality term, on any parameter.
- ``table2``: supp. Table 2 (p. 17), "the loss has l2-regularizer" (F.1), with Table 3's
  "Regularizer" row (supp. p. 17) belonging here: L2 5e-4 on every parameter (scale-invariant
  weights included, BN scales and shifts, biases, classifier) for SGD, Adam, PSI-SGD, PSI-SGDM
  (and SGDP). SGDG's "0.1" "follows the setting in [Cho and Lee, 2017]" (footnote 4): their
  orthogonality regularizer ``omega = 0.1`` (their code: ``--omega 0.1``) on the weights it
  keeps on the sphere, where an L2 term would have no Riemannian gradient (it is radial); its
  other parameters take the L2 5e-4 of everyone's.
- ``tuned``: ``table1``'s conditions with the named method's learning rate chosen by the study
  on a validation split (:func:`psi.study.selection.select_lr`); the rate must be given.

Readings that hold in every setting:

- Learning rates are Table 3's (supp. p. 17): SGD 0.1, Adam 1e-3, SGDG 0.2, PSI-SGD 1.0,
  PSI-SGDM 0.1. Section 6.2 (p. 1135) says "the learning rate starts from 0.1" for all; we take
  the table (PSI-SGD without momentum at 0.1 would take steps ten times smaller than PSI-SGDM's).
  Batch 128, steps x0.2 at 30/60/80% of the epochs (p. 1135) are :class:`psi.engine.config.Config`'s.
- "The PSI parameters are updated by the various methods while non-PSI parameters are all
  updated by SGD" (F.2, supp. p. 17), and the paper writes SGD for "SGD with momentum" (section
  6.1, p. 1135): in every method but ``sgd`` and ``sgdp`` the parameters that are not
  scale-invariant (found by :func:`psi.param_groups`) take SGD with lr 0.1, momentum 0.9, no
  Nesterov and the setting's L2 (``REST``). Algorithm 1 (p. 1132) writes a plain step
  ``g <- g - eta_g grad`` for them; we keep momentum 0.9 under PSI-SGD and PSI-SGDM alike, so that
  within a setting every method updates these parameters the same way and a paired difference
  measures the method on the scale-invariant weights alone.
- SGDG's other parameters take that same SGD, not Cho and Lee's recipe (lr 0.01, Nesterov
  momentum, L2 on weights but none on BN parameters and biases: the commands of their code).
  SGDG itself: lr 0.2 (Table 3; Cho and Lee's ``learnRateG``), momentum 0.9 (Cho and Lee's;
  Table 3 shows none) and gradient clipping nu = 0.1 (Cho and Lee's ``--grad_clip 0.1``) in every
  setting: Table 3's "0.1" is omega, not nu.
- PSI-SGD has momentum 0 (eq. 10; Table 3 "-"), PSI-SGDM 0.9; both keep section 6.2's overflow
  safeguard, ``max_norm`` 1e4 (p. 1135; :data:`psi.core.psisgd.MAX_NORM`).
- L2 "in the loss" is ``lambda/2 ||theta||^2``, applied as its gradient ``lambda theta`` through
  each optimizer's ``weight_decay`` (torch's SGD and Adam add it to the gradient: L2, not
  decoupled decay). The training loss a run logs is the cross-entropy alone.
- How PSI-SGD(M) treats that L2 on a scale-invariant weight: the Riemannian gradient of the
  regularized loss (eq. 7) is ``||w||^2 (G + lambda w)``, so ``w <- w - eta ||w||^2 (G + lambda w)``
  (momentum as Algorithm 1). Its radial part shrinks each neuron by ``1 - eta lambda ||w||^2`` per
  step; the loss is no longer scale-invariant and Theorem 1 no longer holds (section 6.2's reason
  for leaving it out of Table 1).
- Adam: Adam (beta 0.9, 0.999: Table 3; eps 1e-8) on the scale-invariant weights, ``REST`` on the
  others (F.2).
- ``sgdp`` (Heo et al. 2021, package ``adamp``) is not in the paper: SGDP, lr 0.1, momentum 0.9,
  Nesterov, the setting's L2 on every parameter, as its authors recommend.

Overrides (``lr``, ``momentum``, ``weight_decay``: the named method's group; ``rest_lr``;
``omega``: SGDG's) are recorded like the rest.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from psi.core.discovery import param_groups
from psi.core.psisgd import MAX_NORM, PSISGD
from psi.engine.sgdg import SGDG

__all__ = ["OPTIMIZERS", "SETTINGS", "LR", "L2", "OMEGA", "GRAD_CLIP", "REST", "resolve", "build_optimizer",
           "describe", "Combined", "EFFECTIVE_LR", "effective_lr"]

OPTIMIZERS = ("sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm", "sgdp")
SETTINGS = ("table1", "table2", "tuned")
LR = {"sgd": 0.1, "adam": 1e-3, "sgdg": 0.2, "psi-sgd": 1.0, "psi-sgdm": 0.1, "sgdp": 0.1}  # Table 3
L2 = 5e-4  # Table 3's "Regularizer": table2 only
OMEGA = 0.1  # SGDG's regularizer (footnote 4: Cho and Lee's orthogonality weight): table2 only
GRAD_CLIP = 0.1  # Cho and Lee's nu, every setting
REST = dict(lr=0.1, momentum=0.9, nesterov=False)  # F.2's SGD on the non-PSI parameters; L2 from the setting
# How far each method's step turns a scale-invariant neuron's direction per unit of gradient on the
# unit sphere: "lr", "lr/||w||^2", or None where no such rate exists (the reasons: effective_lr).
EFFECTIVE_LR: dict[str, str | None] = {"sgd": "lr/||w||^2", "adam": None, "sgdg": "lr", "psi-sgd": "lr",
                                       "psi-sgdm": "lr", "sgdp": "lr/||w||^2"}

# Keys a group carries (torch copies every default into every group) that its step never reads,
# and switches that choose how a step runs, not what it computes: left out of the record.
_NOT_READ = {(PSISGD, False): ("max_norm",), (SGDG, True): ("weight_decay", "nesterov"),
             (SGDG, False): ("grad_clip", "omega")}
_SWITCHES = ("params", "initial_lr", "foreach", "fused", "differentiable", "capturable")


def effective_lr(name: str, lr: float, sqnorm: Tensor) -> Tensor:
    """The effective learning rate of method ``name`` on one scale-invariant layer: how far its step
    turns the directions ``v(i) = w(i)/||w(i)||`` of the layer's neurons per unit of gradient on the
    unit sphere, averaged over the neurons. ``sqnorm``: the neurons' ``||w(i)||^2``; ``lr``: the
    group's learning rate (a float). A 0-dim tensor in ``sqnorm``'s dtype on its device, so that a
    caller reads every layer's statistics back at once (:func:`psi.engine.epoch._psi_layer_stats`).

    Why (``EFFECTIVE_LR``): for a scale-invariant loss ``L(W) = L(V)``, the Euclidean gradient of a
    neuron is ``G(i) = grad_v(i) / ||w(i)||`` (eq. 5 with ``a(i) = 1/||w(i)||``), orthogonal to
    ``w(i)`` (Lemma 1), and a step ``dw`` orthogonal to ``w(i)`` turns ``v(i)`` by ``dw / ||w(i)||``
    to first order. Hence:

    - ``psi-sgd``, ``psi-sgdm``: the Riemannian step of eq. 7 and 10, ``lr ||w||^2 G = lr ||w|| grad_v``,
      turns ``v`` by ``lr grad_v``: the rate is ``lr``, whatever the norms (the point of the method).
    - ``sgd``, ``sgdp``: the Euclidean step ``lr G = lr grad_v / ||w||`` turns ``v`` by
      ``lr grad_v / ||w||^2``: the rate is ``lr / ||w(i)||^2``, which falls as the norms grow
      (Lemma 1); given as ``lr * mean(1/||w(i)||^2)``, the order of operations the runs recorded.
      SGDP removes the radial part of the step: that slows the growth of ``||w||``, not this rate.
    - ``sgdg``: Cho and Lee keep every neuron at unit norm and step along the great circle by
      ``lr h`` (``h``: the gradient's tangent part), so the rate is ``lr`` (``lr/||w||^2`` at
      ``||w|| = 1``), less where the clip on ``h`` binds.
    - ``adam``: its step divides the gradient by a running root mean square per coordinate, so its
      length does not scale with the gradient: there is no rate per unit of gradient (NaN).

    Momentum is left out everywhere (at a steady state it multiplies every rate by ``1/(1 - momentum)``).
    """
    if name not in EFFECTIVE_LR:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(EFFECTIVE_LR)}")
    rule = EFFECTIVE_LR[name]
    if rule == "lr/||w||^2":
        return sqnorm.reciprocal().mean() * lr
    return torch.full((), lr if rule == "lr" else float("nan"), dtype=sqnorm.dtype, device=sqnorm.device)


def resolve(name: str, setting: str = "table1", *, lr: float | None = None, momentum: float | None = None,
            weight_decay: float | None = None, rest_lr: float | None = None, omega: float | None = None,
            max_norm: float | None = MAX_NORM) -> list[dict[str, Any]]:
    """The groups ``name`` runs under ``setting``, without their tensors: ``[{"name": ..., ...}]``
    with the method's group first (``"all"`` for ``sgd``/``sgdp``, else ``"psi"``, then ``"rest"``).
    See the module docstring for where each value comes from."""
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
    if setting not in SETTINGS:
        raise ValueError(f"unknown setting {setting!r}; valid: {', '.join(SETTINGS)}")
    if setting == "tuned" and lr is None:
        raise ValueError("setting 'tuned' needs the learning rate the selection chose (lr)")
    if omega is not None and name != "sgdg":
        raise ValueError(f"omega is SGDG's orthogonality regularizer; {name} has none")
    l2 = L2 if setting == "table2" else 0.0
    method: dict[str, Any] = {"lr": LR[name]}
    if name in ("sgd", "sgdp"):
        method.update(momentum=0.9, weight_decay=l2, nesterov=name == "sgdp")
    elif name == "adam":
        method.update(betas=(0.9, 0.999), eps=1e-8, weight_decay=l2)
    elif name == "sgdg":
        method.update(momentum=0.9, grad_clip=GRAD_CLIP, omega=OMEGA if setting == "table2" else 0.0)
    else:
        method.update(momentum=0.9 if name == "psi-sgdm" else 0.0, weight_decay=l2, max_norm=max_norm)
    for k, v in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("omega", omega)):
        if v is not None:
            if k not in method:
                raise ValueError(f"{name} has no {k}")
            method[k] = v
    if name in ("sgd", "sgdp"):
        return [{"name": "all", **method}]
    rest = dict(REST, weight_decay=l2, lr=REST["lr"] if rest_lr is None else rest_lr)
    return [{"name": "psi", **method}, {"name": "rest", **rest}]


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


def build_optimizer(name: str, model: nn.Module, example_input: Any, setting: str = "table1", *,
                    lr: float | None = None, momentum: float | None = None, weight_decay: float | None = None,
                    rest_lr: float | None = None, omega: float | None = None,
                    max_norm: float | None = MAX_NORM) -> torch.optim.Optimizer:
    """The optimizer ``name`` for ``model`` under ``setting`` (:func:`resolve`; module docstring).

    Every optimizer gets the fewest parameter groups its hyperparameters allow, because on a
    GPU these small networks are bound by kernel launches and a group costs launches of its
    own: ``sgd`` and ``sgdp`` one group; ``psi-sgd``, ``psi-sgdm`` and ``sgdg`` one group with
    ``psi=True`` holding every scale-invariant tensor (a layer's weight, then its bias when the
    bias scales with it: :class:`psi.PSISGD` pairs a 1-D tensor with the weight just before
    it) and one with ``psi=False``; ``adam`` one group each for Adam (``psi=True``) and SGD. The
    results are those of one group per layer (tested). torch's SGD and Adam take their
    multi-tensor (foreach) path on every device: torch picks it on GPUs only, and with it an op
    count measured on the CPU (``python -m psi.bench ops``) is the one a GPU sees. Each group
    carries its ``name`` (:func:`resolve`); :func:`describe` reads the groups back.

    The returned optimizer has an attribute ``psi_layers: dict[str, list[Tensor]]``: the
    scale-invariant layers (names as in ``model.named_modules()``, module order) and their
    tensors, ``[weight]`` or ``[weight, bias]``, for per-layer statistics (the groups no longer
    say which layer a tensor belongs to)."""
    spec = resolve(name, setting, lr=lr, momentum=momentum, weight_decay=weight_decay, rest_lr=rest_lr, omega=omega,
                   max_norm=max_norm)
    groups = param_groups(model, example_input)
    layers = {g["name"]: list(g["params"]) for g in groups[:-1]}
    scale_invariant = [p for ps in layers.values() for p in ps]  # each layer's tensors adjacent, weight first
    other = groups[-1]["params"]
    opt: torch.optim.Optimizer
    if name == "sgd":
        opt = torch.optim.SGD([dict(spec[0], params=scale_invariant + other)], lr=spec[0]["lr"], foreach=True)
    elif name == "sgdp":
        from adamp import SGDP

        opt = SGDP([dict(spec[0], params=scale_invariant + other)], lr=spec[0]["lr"])
    else:
        method = dict(spec[0], params=scale_invariant, psi=True)
        rest = dict(spec[1], params=other, psi=False)
        if name in ("psi-sgd", "psi-sgdm"):
            opt = PSISGD([method, rest], lr=method["lr"])
        elif name == "sgdg":
            opt = SGDG([method, rest], lr=method["lr"])
        else:  # adam: Adam on the PSI weights, SGD on the rest (F.2)
            opt = Combined(torch.optim.Adam([method], lr=method["lr"], foreach=True),
                           torch.optim.SGD([rest], lr=rest["lr"], foreach=True))
    opt.psi_layers = layers  # type: ignore[attr-defined]
    return opt


def describe(opt: torch.optim.Optimizer) -> list[dict[str, Any]]:
    """Every group of ``opt`` with the hyperparameters its step reads (JSON-ready), in group order:
    what a run records, so that the analysis never reconstructs them from today's defaults."""
    inner = opt.optimizers if isinstance(opt, Combined) else (opt,)
    out = []
    for o in inner:
        for g in o.param_groups:
            skip = _SWITCHES + _NOT_READ.get((type(o), bool(g.get("psi", False))), ())
            out.append({k: list(v) if isinstance(v, tuple) else float(v) if isinstance(v, torch.Tensor) else v
                        for k, v in g.items() if k not in skip})
    return out
