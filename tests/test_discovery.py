"""Discovery: every scale-invariant layer, nothing else (the symmetry of section 3.1 of the paper, p. 1130:
``L(W, g) = L(T_a(W), g)`` for per-neuron factors ``a > 0``)."""

import pytest
import torch
from torch import nn

import psi
from psi.models import BNMLP, ToyNet, resnet20
from tests.nets import DenseSE, Mixed, PreActBlockNet, ResidualNoBN

# BNMLP's layers: net = [Flatten, Linear, BatchNorm1d, ReLU, Linear, BatchNorm1d, ReLU, ..., classifier]
FIRST_LINEAR, FIRST_BN = 1, 2


def test_mixed_network():
    m = Mixed()
    assert sorted(psi.find_scale_invariant(m, torch.randn(4, 3, 16, 16))) == sorted(Mixed.invariant)


def test_bias_joins_the_group_only_when_it_must_scale():
    m = Mixed()
    groups = {g.get("name"): g for g in psi.param_groups(m, torch.randn(4, 3, 16, 16), lr=0.1)}
    assert [id(p) for p in groups["biased"]["params"]] == [id(m.biased.weight), id(m.biased.bias)]
    assert [id(p) for p in groups["stem"]["params"]] == [id(m.stem.weight)]
    rest = groups[None]["params"]
    assert groups[None]["psi"] is False and groups["stem"]["psi"] is True and groups["stem"]["lr"] == 0.1
    assert id(m.stem.bias) in {id(p) for p in rest} and id(m.fc2.weight) in {id(p) for p in rest}
    assert len({id(p) for g in groups.values() for p in g["params"]}) == len(list(m.parameters()))


def test_preactivation_block_last_conv_is_rejected():
    assert sorted(psi.find_scale_invariant(PreActBlockNet(), torch.randn(4, 3, 8, 8))) == PreActBlockNet.invariant


def test_residual_without_bn_layernorm_groupnorm_rejected():
    assert psi.find_scale_invariant(ResidualNoBN(), torch.randn(8, 6)) == ResidualNoBN.invariant


def test_resnet20_all_convs_but_not_classifier():
    m = resnet20()
    found = psi.find_scale_invariant(m, torch.randn(4, 3, 32, 32))
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert found == convs and len(convs) == 19


def test_zero_init_does_not_fool_the_check():
    m = BNMLP(5, [7, 7], 3)
    nn.init.zeros_(m.net[-1].weight)  # a zero classifier must still be rejected
    m.net[FIRST_BN].weight.data.zero_()  # BN scale 0: the layer before stays invariant, the network still depends
    assert psi.find_scale_invariant(m, torch.randn(6, 5)) == ["net.1", "net.4"]


def test_toy_net_and_model_unchanged():
    m = ToyNet()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    x = torch.randn(16, 10)
    rng = torch.get_rng_state()
    assert psi.find_scale_invariant(m.eval(), x) == ["hidden"]
    assert torch.equal(rng, torch.get_rng_state())  # the caller's random stream is untouched
    assert not m.training
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


def test_frozen_layer_is_reported_but_not_optimized():
    m = BNMLP(5, [7, 7], 3)
    m.net[FIRST_LINEAR].weight.requires_grad_(False)
    x = torch.randn(6, 5)
    assert psi.find_scale_invariant(m, x) == ["net.1", "net.4"]
    assert [g["name"] for g in psi.param_groups(m, x) if g["psi"]] == ["net.4"]


def test_unused_layer_is_not_reported():
    m = BNMLP(5, [7], 3)
    m.spare = nn.Linear(5, 5)
    assert psi.find_scale_invariant(m, torch.randn(6, 5)) == ["net.1"]


def test_a_batch_of_one_gets_a_clear_error():
    with pytest.raises(RuntimeError, match="2 or more samples"):
        psi.find_scale_invariant(BNMLP(5, [7], 3), torch.randn(1, 5))


def test_concatenation_inverted_residual_squeeze_excitation():
    assert psi.find_scale_invariant(DenseSE(), torch.randn(6, 3, 8, 8)) == DenseSE.invariant


@pytest.mark.parametrize("act,invariant", [
    (torch.nn.functional.relu, True), (lambda z: torch.nn.functional.leaky_relu(z, 0.2), True),
    (torch.nn.functional.relu6, False), (torch.nn.functional.hardtanh, False),
    (torch.nn.functional.softshrink, False), (torch.nn.functional.gelu, False)],
    ids=["relu", "leaky_relu", "relu6", "hardtanh", "softshrink", "gelu"])
def test_only_positively_homogeneous_ops_between_layer_and_bn(act, invariant):
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layer, self.bn, self.out = nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)

        def forward(self, x):
            return self.out(self.bn(act(self.layer(x))))

    assert psi.find_scale_invariant(Net(), torch.randn(16, 5)) == (["layer"] if invariant else [])
