"""Networks used in the paper and the notebooks.

- ``resnet20/32/44/56``: He et al. 2016's CIFAR ResNets (section 4.2 of their paper): three
  stages of 16, 32, 64 channels, ``n`` basic blocks each (depth ``6n + 2``), identity
  shortcuts with zero-padding when the shape changes ("option A").
- ``cifar_resnet18``: the ImageNet ResNet-18 widths (64..512, projection shortcuts) with a 3x3
  CIFAR stem; the "ResNet-18-sized" network of the optimizer benchmark (11.2M parameters).
- ``resnet18/34/50``: He et al. 2016's ImageNet ResNets (``IMAGENET_MODELS``), with torchvision's
  parameter names and shapes, so that torchvision's checkpoints load with ``load_state_dict``.
- ``ToyNet``: section 6.1's regressor ``w1^T ELU(BN(W2 x))`` (the paper's formula shows no BN;
  the PSI methods need one after ``W2 x``, so it is there).
- ``BNMLP`` and ``SmallCNN``: small BN networks for the theory notebooks and the tests.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["CifarResNet", "cifar_resnet18", "ResNet", "BasicBlock", "Bottleneck", "resnet18", "resnet34",
           "resnet50", "ToyNet", "BNMLP", "SmallCNN", "MODELS", "IMAGENET_MODELS", "build_model", "CifarBlock",
           "GlobalAvgPool"]


class CifarBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU. ``option='A'``: zero-padded identity."""

    def __init__(self, cin: int, cout: int, stride: int, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.pad = 0
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            if option == "A":
                self.pad, self.stride = cout - cin, stride
            else:
                self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.pad:
            short = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        else:
            short = self.shortcut(x)
        return F.relu(out + short)


class CifarResNet(nn.Module):
    """ResNet for 32x32 images: 3x3 stem, stages of ``blocks`` basic blocks, global pooling, linear."""

    def __init__(self, blocks: list[int], widths: list[int], num_classes: int = 10, option: str = "A") -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        layers, cin = [], widths[0]
        for i, (n, w) in enumerate(zip(blocks, widths, strict=True)):
            for j in range(n):
                layers.append(CifarBlock(cin, w, 2 if (i > 0 and j == 0) else 1, option))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(F.relu(self.bn1(self.conv1(x))))
        # a mean over H and W, not adaptive_avg_pool2d: the same numbers, and its CUDA backward is
        # deterministic (adaptive_avg_pool2d's is not, see --deterministic)
        return self.fc(x.mean((2, 3)))


def _cifar(depth: int):
    if (depth - 2) % 6:
        raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
    n = (depth - 2) // 6

    def build(num_classes: int = 10) -> CifarResNet:
        return CifarResNet([n, n, n], [16, 32, 64], num_classes)

    build.__name__ = f"resnet{depth}"
    build.__doc__ = f"He et al.'s CIFAR ResNet-{depth} (option A shortcuts)."
    return build


resnet20, resnet32, resnet44, resnet56 = (_cifar(d) for d in (20, 32, 44, 56))


def cifar_resnet18(num_classes: int = 10) -> CifarResNet:
    """ResNet-18 widths with a CIFAR stem and 1x1 projection shortcuts (option B)."""
    return CifarResNet([2, 2, 2, 2], [64, 128, 256, 512], num_classes, option="B")


# ImageNet ResNets. Attribute names, the order of registration and the shapes follow torchvision's
# resnet.py, because torchvision's checkpoints are loaded by state_dict key.


def _projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    """The shortcut when the shape changes (option B): 1x1 conv then BN, keys ``downsample.0``/``.1``."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BasicBlock(nn.Module):
    """Two 3x3 convs (the first one strided), as in ResNet-18/34."""

    expansion = 1

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3, 1x1 expand (x4), as in ResNet-50. The stride is on the 3x3 conv, as in
    torchvision ("ResNet v1.5"); the paper puts it on the first 1x1. The shapes are the same
    either way, so only the numbers differ, and a torchvision checkpoint needs this placement."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, width * self.expansion, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(width * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + (x if self.downsample is None else self.downsample(x)))


class GlobalAvgPool(nn.Module):
    """A mean over H and W to shape (N, C). Not ``nn.AdaptiveAvgPool2d``: the same numbers, and its
    CUDA backward is deterministic (adaptive_avg_pool2d's is not, see --deterministic). Neither has
    parameters or buffers, so the state_dict keys are torchvision's all the same."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class ResNet(nn.Module):
    """He et al.'s ImageNet ResNet: 7x7/2 conv, 3x3/2 max pool, four stages (64..512 wide, the
    first block of stages 2-4 strided), global mean, linear. ``zero_init_residual`` sets the last
    BN scale of each block to 0, so that each block starts as the identity (Goyal et al. 2017)."""

    def __init__(self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int = 1000,
                 zero_init_residual: bool = False) -> None:
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._stage(block, 64, layers[0], 1)
        self.layer2 = self._stage(block, 128, layers[1], 2)
        self.layer3 = self._stage(block, 256, layers[2], 2)
        self.layer4 = self._stage(block, 512, layers[3], 2)
        self.avgpool = GlobalAvgPool()
        self.fc = nn.Linear(512 * block.expansion, num_classes)  # torch's default init, as torchvision's
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, BasicBlock | Bottleneck):
                    nn.init.zeros_((m.bn3 if isinstance(m, Bottleneck) else m.bn2).weight)

    def _stage(self, block: type[BasicBlock | Bottleneck], width: int, n: int, stride: int) -> nn.Sequential:
        cout = width * block.expansion
        down = _projection(self.inplanes, cout, stride) if stride != 1 or self.inplanes != cout else None
        blocks = [block(self.inplanes, width, stride, down)]
        self.inplanes = cout
        blocks += [block(cout, width) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(self.avgpool(x))


def resnet18(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-18 (11.7M parameters at 1000 classes), torchvision's keys."""
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes, zero_init_residual)


def resnet34(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-34 (21.8M parameters at 1000 classes), torchvision's keys."""
    return ResNet(BasicBlock, [3, 4, 6, 3], num_classes, zero_init_residual)


def resnet50(num_classes: int = 1000, zero_init_residual: bool = False) -> ResNet:
    """ImageNet ResNet-50 (25.6M parameters at 1000 classes; bottlenecks strided on the 3x3, v1.5)."""
    return ResNet(Bottleneck, [3, 4, 6, 3], num_classes, zero_init_residual)


class ToyNet(nn.Module):
    """Section 6.1: ``f(x) = w1^T ELU(BN(W2 x))``, ``W2`` of shape (hidden, d_in)."""

    def __init__(self, d_in: int = 10, hidden: int = 100) -> None:
        super().__init__()
        self.hidden = nn.Linear(d_in, hidden, bias=False)
        self.bn = nn.BatchNorm1d(hidden, affine=False)
        self.out = nn.Linear(hidden, 1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(F.elu(self.bn(self.hidden(x)))).squeeze(-1)


class BNMLP(nn.Module):
    """Linear-BN-ReLU blocks then a linear classifier (Figure 1's network with ``hidden=[h]``)."""

    def __init__(self, d_in: int, hidden: list[int], num_classes: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        for h in hidden:
            layers += [nn.Linear(d_in, h, bias=False), nn.BatchNorm1d(h), nn.ReLU()]
            d_in = h
        layers.append(nn.Linear(d_in, num_classes))
        self.net = nn.Sequential(*layers)

    @property
    def first_linear(self) -> nn.Linear:
        """The first hidden layer (``net[1]``, after the flatten): the scale-invariant layer that
        Figure 1's readings rescale."""
        return self.net[1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv-BN-ReLU-pool stages and a linear head, for quick image experiments."""

    def __init__(self, num_classes: int = 10, width: int = 16, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.fc = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.features(x))


MODELS = {"resnet20": resnet20, "resnet32": resnet32, "resnet44": resnet44, "resnet56": resnet56,
          "cifar_resnet18": cifar_resnet18, "smallcnn": SmallCNN,
          "resnet18": resnet18, "resnet34": resnet34, "resnet50": resnet50}
# the networks made for 224x224 ImageNet images (the rest are for 32x32 ones), for a caller that
# picks per-model defaults such as the number of classes or the input size
IMAGENET_MODELS = ("resnet18", "resnet34", "resnet50")


def build_model(name: str, num_classes: int | None = None) -> nn.Module:
    """A model by name (``MODELS``); an unknown name lists the valid ones. ``num_classes=None``:
    the model's own default (10 for the CIFAR ones, 1000 for ``IMAGENET_MODELS``)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODELS)}")
    return MODELS[name]() if num_classes is None else MODELS[name](num_classes=num_classes)
