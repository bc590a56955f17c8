"""Discovery: every scale-invariant layer, nothing else (the symmetry of section 3.1 of the paper, p. 1130:
``L(W, g) = L(T_a(W), g)`` for per-neuron factors ``a > 0``)."""

import copy
import itertools
import math

import pytest
import torch
from torch import nn

import psi
from psi.core import discovery
from psi.core.discovery import discover
from psi.core.probe import Layer, _passing, _Probe, find_layers
from psi.engine.models import BNMLP, ToyNet, resnet20
from tests.nets import DenseSE, FrozenBN, InstanceStyle, KeepsBNFrozen, Mixed, MobileResNeXt, PreActBlockNet, ResidualNoBN

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


def _frozen(m: nn.Module, *bns: nn.Module) -> nn.Module:
    m.train()
    for bn in bns:
        bn.eval()
    return m


def test_frozen_batchnorm_makes_the_layer_before_it_not_invariant():
    x = torch.randn(4, 3, 8, 8)
    m = FrozenBN()
    assert psi.find_scale_invariant(m, x) == ["conv1", "conv2"]  # all in train mode
    assert psi.find_scale_invariant(_frozen(m, m.bn2), x) == ["conv1"]  # bn2 uses running stats: affine
    assert not m.bn2.training and m.training  # the caller's flags are untouched
    assert psi.find_scale_invariant(m.eval(), x) == ["conv1", "conv2"]  # all eval: judged as model.train() will be
    assert psi.find_scale_invariant(KeepsBNFrozen().train(), x) == []  # train() keeps every BN in eval
    assert psi.find_scale_invariant(KeepsBNFrozen().eval(), x) == []  # its train() is what the copy calls


def test_eval_batchnorm_without_running_stats_stays_invariant():
    m = FrozenBN()
    m.bn2 = nn.BatchNorm2d(8, track_running_stats=False)  # batch statistics in eval mode too
    assert psi.find_scale_invariant(_frozen(m, m.bn2), torch.randn(4, 3, 8, 8)) == ["conv1", "conv2"]


def test_instance_style_norms_found_layer_and_wide_group_norms_rejected():
    m = InstanceStyle()
    assert psi.find_scale_invariant(m, torch.randn(4, 3, 8, 8)) == InstanceStyle.invariant
    assert m.n_gn1.eps == m.n_in2.eps == m.n_ln.eps == 1e-5  # only the probe's eps were lowered


def test_inverted_residual_resnext_shared_and_tied_weights():
    x = torch.randn(4, 3, 8, 8)
    assert psi.find_scale_invariant(MobileResNeXt(), x) == MobileResNeXt.invariant
    cl = MobileResNeXt().to(memory_format=torch.channels_last)  # a channels-last copy: the same verdicts
    assert psi.find_scale_invariant(cl, x.to(memory_format=torch.channels_last)) == MobileResNeXt.invariant


NETS = {
    "mixed": (Mixed, (4, 3, 16, 16)), "preact": (PreActBlockNet, (4, 3, 8, 8)), "residual_no_bn": (ResidualNoBN, (8, 6)),
    "dense_se": (DenseSE, (6, 3, 8, 8)), "instance_style": (InstanceStyle, (4, 3, 8, 8)),
    "mobile_resnext": (MobileResNeXt, (4, 3, 8, 8)), "resnet20": (resnet20, (4, 3, 32, 32)),
    "bnmlp": (lambda: BNMLP(5, [7, 7], 3), (6, 5)), "frozen_bn": (lambda: _frozen(m := FrozenBN(), m.bn2), (4, 3, 8, 8)),
    "keeps_bn_frozen": (lambda: KeepsBNFrozen().train(), (4, 3, 8, 8)),
    # two samples: a BatchNorm1d over 2 outputs +-1 whatever comes in, so every gradient before it is
    # rounding; the screen must not read noise over noise as a dependence (it did, and missed layers)
    "mixed_two_samples": (Mixed, (2, 3, 16, 16)), "bnmlp_two_samples": (lambda: BNMLP(5, [7, 7], 3), (2, 5)),
    "ends_in_bn_two_samples": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3), nn.BatchNorm1d(3)),
                               (2, 5))}


@pytest.mark.parametrize("name", NETS)
def test_group_testing_and_screen_agree_with_the_per_layer_oracle(name):
    build, shape = NETS[name]
    torch.manual_seed(0)
    m, x = build(), torch.randn(shape)
    oracle = discover(m, x, strategy="per-layer")
    assert discover(m, x) == oracle  # the default: screen + group testing
    assert find_layers(m, x, 0, "group", screen=False)[0] == oracle  # group testing alone decides every layer
    assert discover(m, x, seed=1) == oracle


def test_resnet20_takes_a_few_forward_passes():
    m, x = resnet20(), torch.randn(4, 3, 32, 32)
    calls = []
    m.register_forward_hook(lambda *_: calls.append(1))  # deep-copied with the model: counts the probe's passes
    found, n = find_layers(m, x, 0, "group")
    assert n == len(calls) == 3  # reference, screen (with its backward), one group of the 19 convs
    assert find_layers(m, x, 0, "group", screen=False)[1] <= 10  # bisection down to the classifier
    assert find_layers(m, x, 0, "per-layer")[1] == 22  # reference + 20 layers + the classifier with its bias
    assert len(found) == 19


@pytest.mark.parametrize("n", [0, 1, 2, 5, 10])
def test_group_testing_finds_the_passing_members_within_its_budget(n):
    for bits in itertools.product("PF", repeat=n):  # every pattern of passing and failing layers
        tests = []

        def test(group, bits=bits, tests=tests):
            tests.append(group)
            return all(bits[i] == "P" for i in group)

        assert _passing(test, list(range(n))) == [i for i in range(n) if bits[i] == "P"]
        assert len(tests) <= n + 7  # dense failures: one by one, not bisection's 2n
        if bits.count("F") == 0:
            assert len(tests) == min(n, 1)  # one forward when everything passes
        elif bits.count("F") == 1:
            assert len(tests) <= 2 * math.ceil(math.log2(n)) + 1


def test_probe_is_float64_made_without_a_copy_in_the_models_dtype(monkeypatch):
    m = MobileResNeXt()
    m.tied2 = nn.Linear(32, 32, bias=False)
    m.tied2.weight = m.tied.weight  # a tied parameter: one tensor on the probe too
    copied = []
    for cls in (torch.Tensor, nn.Parameter):
        original = cls.__deepcopy__
        monkeypatch.setattr(cls, "__deepcopy__", lambda t, memo, o=original: copied.append(t.dtype) or o(t, memo))
    probe = _Probe(m, torch.randn(4, 3, 8, 8), 0).model
    assert not [d for d in copied if d.is_floating_point]  # no float tensor went through deepcopy: no fp32 copy
    assert all(t.dtype == torch.float64 for t in [*probe.parameters(), *probe.buffers()] if t.is_floating_point())
    assert probe.tied2.weight is probe.tied.weight and probe.stem.weight.requires_grad
    assert not {t.data_ptr() for t in m.parameters()} & {t.data_ptr() for t in probe.parameters()}
    _Probe(m, torch.randn(4, 3, 8, 8), 0, legacy_copy=True)  # deepcopy(model).double(): the check can fail
    assert torch.float32 in copied
    m64 = copy.deepcopy(m).double()  # a float64 model: the probe must still not share its storage
    probe64 = _Probe(m64, torch.randn(4, 3, 8, 8).double(), 0).model
    assert not {t.data_ptr() for t in m64.parameters()} & {t.data_ptr() for t in probe64.parameters()}


def test_param_groups_take_found_layers_without_a_second_discovery(monkeypatch):
    m, x = Mixed(), torch.randn(4, 3, 16, 16)
    found = discover(m, x)
    assert Layer("biased", True) in found and Layer("stem", False) in found
    expected = psi.param_groups(m, x, lr=0.1)
    monkeypatch.setattr(discovery, "find_layers", lambda *a, **k: pytest.fail("discovery ran again"))
    got = psi.param_groups(m, found=found, lr=0.1)
    assert [[id(p) for p in g["params"]] for g in got] == [[id(p) for p in g["params"]] for g in expected]
    assert [g.get("name") for g in got] == [g.get("name") for g in expected]
    with pytest.raises(TypeError, match="found="):
        psi.param_groups(m)


def test_unknown_strategy():
    with pytest.raises(ValueError, match="per-layer"):
        discover(BNMLP(5, [7], 3), torch.randn(6, 5), strategy="fast")


def test_discovery_benchmark_runs_on_a_tiny_model(capsys):
    from psi.bench.cli import main

    main(["discovery", "--models", "tiny", "nonexistent", "--in-process"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("tiny"))
    assert row.split()[-1] == "yes" and "skipped" in out  # the same layers both ways; an absent model is skipped
