"""psi.engine.models' ImageNet ResNets against torchvision's: the same state_dict keys and shapes, so that
torchvision's checkpoints load (the project's tests run without torchvision, hence the key list is data).

``tests/data/torchvision_resnet_keys.json`` was written by torchvision itself (0.29.1, torch 2.14.1),
run from the repository root in a venv that has it:

    python -c "
    import json, torch, torchvision, torchvision.models as tvm
    out = {'torch': torch.__version__, 'torchvision': torchvision.__version__, 'models': {}}
    for name in ('resnet18', 'resnet34', 'resnet50'):
        m = getattr(tvm, name)(weights=None)
        out['models'][name] = {'params': sum(p.numel() for p in m.parameters()),
                               'state_dict': [[k, list(v.shape)] for k, v in m.state_dict().items()]}
    text = json.dumps(out).replace(']], [', ']],\\n [')  # one key a line
    open('tests/data/torchvision_resnet_keys.json', 'w').write(text + '\\n')"
"""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import psi
from psi.engine import models

KEYS = json.loads((Path(__file__).parent / "data" / "torchvision_resnet_keys.json").read_text())["models"]
# He et al. 2016's networks at 1000 classes, as torchvision counts them
PARAMS = {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032}


def _torchvision_like_state_dict(name: str) -> dict[str, torch.Tensor]:
    """Random tensors of torchvision's shapes under its keys (BN's counters as int64, as torch keeps them)."""
    gen = torch.Generator().manual_seed(0)
    return {k: torch.tensor(7) if k.endswith("num_batches_tracked") else torch.randn(shape, generator=gen)
            for k, shape in KEYS[name]["state_dict"]}


@pytest.mark.parametrize("name", models.IMAGENET_MODELS)
def test_keys_and_shapes_are_torchvisions(name):
    ours = [[k, list(v.shape)] for k, v in models.build_model(name).state_dict().items()]
    assert ours == KEYS[name]["state_dict"]  # the same order too: torchvision's module registration


@pytest.mark.parametrize("name", models.IMAGENET_MODELS)
def test_torchvision_state_dict_loads_strictly(name):
    m = models.build_model(name)
    sd = _torchvision_like_state_dict(name)
    m.load_state_dict(sd, strict=True)
    assert all(torch.equal(v, sd[k]) for k, v in m.state_dict().items())


@pytest.mark.parametrize("name", models.IMAGENET_MODELS)
def test_parameter_counts(name):
    assert sum(p.numel() for p in models.build_model(name).parameters()) == KEYS[name]["params"] == PARAMS[name]


@pytest.mark.parametrize("name", models.IMAGENET_MODELS)
def test_forward_at_a_small_size(name):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    assert models.build_model(name)(x).shape == (2, 1000)
    assert models.build_model(name, 10)(x).shape == (2, 10)


def test_init_as_torchvision():
    """kaiming_normal_ (fan_out, relu) convs, BN scale 1 shift 0; zero_init_residual zeroes each block's last BN."""
    torch.manual_seed(0)
    m = models.resnet50()
    w = m.layer4[0].conv2.weight  # 512 out x 3 x 3: fan_out 4608
    assert abs(w.std().item() / (2 / 4608) ** 0.5 - 1) < 0.02
    assert all(torch.all(b.weight == 1) and torch.all(b.bias == 0) for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    z50, z18 = models.resnet50(zero_init_residual=True), models.resnet18(zero_init_residual=True)
    assert all(torch.all(b.bn3.weight == 0) for b in z50.modules() if isinstance(b, models.Bottleneck))
    assert all(torch.all(b.bn2.weight == 0) for b in z18.modules() if isinstance(b, models.BasicBlock))
    assert torch.all(z18.bn1.weight == 1)


def test_resnet18_every_conv_is_scale_invariant_not_fc():
    m = models.resnet18()
    found = psi.find_scale_invariant(m, torch.randn(2, 3, 64, 64))
    convs = [n for n, mod in m.named_modules() if isinstance(mod, nn.Conv2d)]
    assert found == convs and len(convs) == 20 and "layer2.0.downsample.0" in found and "fc" not in found


def test_names_and_defaults():
    assert set(models.IMAGENET_MODELS) <= set(models.MODELS)
    assert models.build_model("resnet18").fc.out_features == 1000
    assert models.build_model("resnet20").fc.out_features == 10
    m = models.build_model("cifar_resnet18")  # the optimizer benchmark's ResNet-18-sized CIFAR network
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - 11.17) < 0.01
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
