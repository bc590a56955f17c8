"""No silent surprises for a practitioner (issue 17, item 10): what plain-torch use of psi gets wrong
without noticing is warned about, and ``weight_decay`` means one thing wherever it is given."""

import warnings

import pytest
import torch
from torch import nn

import psi
from psi.core import psisgd
from psi.core.discovery import NoScaleInvariantLayer
from psi.core.psisgd import NoPsiGroupWarning


def _mlp(norm: bool) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), *([nn.BatchNorm1d(8)] if norm else []), nn.ReLU(), nn.Linear(8, 2))


def test_psisgd_on_model_parameters_warns_once_that_it_is_sgd(monkeypatch):
    monkeypatch.setattr(psisgd, "_warned_plain", False)
    with pytest.warns(NoPsiGroupWarning, match=r"none with psi=True.*psi.param_groups"):
        psi.PSISGD(_mlp(True).parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        psi.PSISGD(_mlp(True).parameters(), lr=0.1)  # once per process
        psi.PSISGD(psi.param_groups(_mlp(True), torch.randn(4, 4)), lr=0.1)  # psi groups: silent


def test_param_groups_on_a_model_without_normalization_warns_naming_what_it_saw():
    with pytest.warns(NoScaleInvariantLayer, match=r"in Sequential: of its 2 Linear/Conv.*normalizations in the "
                                                   r"model: none"):
        groups = psi.param_groups(_mlp(False), torch.randn(4, 4))
    assert [g["psi"] for g in groups] == [False]
    frozen = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2))
    frozen[1].eval()  # a frozen BN uses running statistics: the layer before it is not invariant
    with pytest.warns(NoScaleInvariantLayer, match="normalizations in the model: BatchNorm1d"):
        psi.param_groups(frozen, torch.randn(4, 4))


def test_weight_decay_means_the_plain_group_wherever_it_is_given():
    """``PSISGD(groups, weight_decay=x)`` and ``param_groups(model, e, weight_decay=x)`` agree: L2 on the
    plain group, none on the psi groups (Theorem 1 holds); the other hyperparameters go to every group."""
    model, x = _mlp(True), torch.randn(4, 4)
    via_groups = psi.PSISGD(psi.param_groups(model, x, weight_decay=1e-3, lr=0.2), lr=0.1)
    via_opt = psi.PSISGD(psi.param_groups(model, x, lr=0.2), lr=0.1, weight_decay=1e-3)
    for opt in (via_groups, via_opt):
        assert [(g["psi"], g["weight_decay"], g["lr"]) for g in opt.param_groups] == [(True, 0.0, 0.2),
                                                                                       (False, 1e-3, 0.2)]
