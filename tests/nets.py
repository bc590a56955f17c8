"""Small BN networks for the tests: each with the layers that must and must not be found."""

import torch
import torch.nn.functional as F
from torch import nn


class Mixed(nn.Module):
    """Conv/linear -> BN through homogeneous ops, grouped/depthwise conv, 1x1 shortcut, classifier."""

    invariant = ["stem", "dw", "grouped", "block.conv1", "block.conv2", "block.short", "biased", "fc1"]

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)  # bias, then BN directly: bias need not scale
        self.bn0 = nn.BatchNorm2d(8, affine=False)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False)  # depthwise
        self.bn_dw = nn.BatchNorm2d(8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4, bias=False)  # then average pooling, then BN
        self.bn_g = nn.BatchNorm2d(12)
        self.block = nn.Module()
        self.block.conv1 = nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False)
        self.block.bn1 = nn.BatchNorm2d(16)
        self.block.conv2 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.block.bn2 = nn.BatchNorm2d(16)
        self.block.short = nn.Conv2d(12, 16, 1, stride=2, bias=False)  # 1x1 shortcut -> BN
        self.block.bn_s = nn.BatchNorm2d(16)
        self.biased = nn.Conv2d(16, 16, 3, padding=1)  # bias, ReLU, pool, dropout, then BN: bias scales
        self.bn_b = nn.BatchNorm2d(16)
        self.fc1 = nn.Linear(16 * 4 * 4, 20)
        self.bn_fc = nn.BatchNorm1d(20)
        self.fc2 = nn.Linear(20, 5)  # classifier: not invariant

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        x = F.relu(self.bn_dw(self.dw(x)))
        x = F.relu(self.bn_g(F.avg_pool2d(self.grouped(x), 3, 1, 1)))
        b = self.block
        x = F.relu(b.bn2(b.conv2(F.relu(b.bn1(b.conv1(x))))) + b.bn_s(b.short(x)))
        x = self.bn_b(F.dropout(F.max_pool2d(F.leaky_relu(self.biased(x), 0.1), 2), 0.2, self.training))
        x = F.relu(x)
        x = self.bn_fc(F.dropout(self.fc1(torch.flatten(x, 1)), 0.1, self.training))
        return self.fc2(F.relu(x))


class PreActBlockNet(nn.Module):
    """Pre-activation residual block: its last conv reaches the sum without BN."""

    invariant = ["conv1"]  # conv0 also feeds the sum around bn1

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)  # -> x + conv2(...): not invariant
        self.bn3 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = self.conv0(x)
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        x = F.relu(self.bn3(x + out))
        return self.fc(x.mean((2, 3)))


class ResidualNoBN(nn.Module):
    """A branch added to a BN'd path without its own BN, and a layer followed only by LayerNorm/GroupNorm."""

    invariant = ["a"]

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10, bias=False)
        self.bn = nn.BatchNorm1d(10)
        self.branch = nn.Linear(10, 10)  # x + branch(x): reaches the loss around any BN
        self.ln_in = nn.Linear(10, 10)
        self.ln = nn.LayerNorm(10)
        self.conv = nn.Conv1d(1, 4, 3, padding=1)
        self.gn = nn.GroupNorm(2, 4)
        self.head = nn.Linear(10 + 40, 3)

    def forward(self, x):
        h = F.relu(self.bn(self.a(x)))
        h = h + self.branch(h)
        h = self.ln(self.ln_in(h))
        g = self.gn(self.conv(h.unsqueeze(1))).flatten(1)
        return self.head(torch.cat([h, g], 1))


class DenseSE(nn.Module):
    """Concatenation before BN (DenseNet), an inverted residual with ReLU6 after its BNs
    (MobileNet), squeeze-and-excitation, and a conv -> ReLU6 -> BN that is *not* invariant."""

    invariant = ["c1", "pw", "dw", "pj"]

    def __init__(self) -> None:
        super().__init__()
        self.c0 = nn.Conv2d(3, 8, 3, padding=1)  # feeds the BN directly and c1 through a ReLU: not invariant
        self.c1 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(12)
        self.pw, self.bn_pw = nn.Conv2d(12, 24, 1, bias=False), nn.BatchNorm2d(24)
        self.dw, self.bn_dw = nn.Conv2d(24, 24, 3, padding=1, groups=24, bias=False), nn.BatchNorm2d(24)
        self.pj, self.bn_pj = nn.Conv2d(24, 12, 1, bias=False), nn.BatchNorm2d(12)
        self.se1, self.se2 = nn.Conv2d(12, 4, 1), nn.Conv2d(4, 12, 1)
        self.clipped, self.bn_c = nn.Conv2d(12, 12, 1), nn.BatchNorm2d(12)
        self.fc = nn.Linear(12, 5)

    def forward(self, x):
        a = self.c0(x)
        h = F.relu(self.bn(torch.cat([a, self.c1(F.relu(a))], 1)))
        y = F.relu6(self.bn_pw(self.pw(h)))
        y = self.bn_pj(self.pj(F.relu6(self.bn_dw(self.dw(y)))))
        y = y * torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        h = self.bn_c(F.relu6(self.clipped(h + y)))
        return self.fc(h.mean((2, 3)))


class FrozenBN(nn.Module):
    """conv -> BN -> conv -> BN -> classifier; freeze a BN (``eval()`` while the rest trains) and the
    layer before it is no longer invariant (running statistics: an affine map)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        return self.fc(F.relu(self.bn2(self.conv2(x))).mean((2, 3)))


class KeepsBNFrozen(FrozenBN):
    """A model whose ``train()`` keeps its BatchNorms in eval mode (as detection backbones do)."""

    def train(self, mode: bool = True):
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.eval()
        return self


class InstanceStyle(nn.Module):
    """Per-channel norms other than BN: GroupNorm with one channel per group and InstanceNorm1d/2d/3d
    (affine) make the layer before invariant; GroupNorm with 2 channels per group and LayerNorm do not."""

    invariant = ["gn1", "in2", "in1", "in3"]

    def __init__(self) -> None:
        super().__init__()
        self.gn1, self.n_gn1 = nn.Conv2d(3, 8, 3, padding=1), nn.GroupNorm(8, 8)
        self.in2, self.n_in2 = nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.InstanceNorm2d(8, affine=True)
        self.gn2, self.n_gn2 = nn.Conv2d(8, 8, 1, bias=False), nn.GroupNorm(2, 8)
        self.ln, self.n_ln = nn.Conv2d(8, 8, 1, bias=False), nn.LayerNorm([8, 8, 8])
        self.in1, self.n_in1 = nn.Conv1d(8, 6, 3, padding=1, bias=False), nn.InstanceNorm1d(6, affine=True)
        self.in3, self.n_in3 = nn.Conv3d(1, 4, 3, padding=1, bias=False), nn.InstanceNorm3d(4)
        self.fc = nn.Linear(8 + 6 + 4, 3)

    def forward(self, x):
        x = F.relu(self.n_gn1(self.gn1(x)))
        x = F.relu(self.n_in2(self.in2(x)))
        x = F.relu(self.n_gn2(self.gn2(x)))
        x = self.n_ln(self.ln(x))
        a = F.relu(self.n_in1(self.in1(x.mean(3))))
        b = F.relu(self.n_in3(self.in3(x[:, :1, :4, :4].unsqueeze(1).expand(-1, -1, 4, -1, -1))))
        return self.fc(torch.cat([x.mean((2, 3)), a.mean(2), b.mean((2, 3, 4))], 1))


class MobileResNeXt(nn.Module):
    """A MobileNetV2 inverted residual (1x1 expand, depthwise 3x3, 1x1 project, BN each, added to
    its input) and a ResNeXt bottleneck (grouped 3x3, cardinality 4) with a projection shortcut;
    a conv used twice (shared weights) with a BN after each use; a layer whose weight is also read
    outside its module (tied), which is therefore not invariant."""

    invariant = ["stem", "expand", "dw", "project", "reduce", "grouped", "widen", "short", "shared"]

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.expand, self.bn_e = nn.Conv2d(16, 64, 1, bias=False), nn.BatchNorm2d(64)
        self.dw, self.bn_dw = nn.Conv2d(64, 64, 3, padding=1, groups=64, bias=False), nn.BatchNorm2d(64)
        self.project, self.bn_p = nn.Conv2d(64, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.reduce, self.bn_r = nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.grouped, self.bn_g = nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
        self.widen, self.bn_w = nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32)
        self.short, self.bn_s = nn.Conv2d(16, 32, 1, stride=2, bias=False), nn.BatchNorm2d(32)
        self.shared, self.bn_sh1, self.bn_sh2 = nn.Conv2d(32, 32, 1, bias=False), nn.BatchNorm2d(32), nn.BatchNorm2d(32)
        self.tied, self.bn_t = nn.Linear(32, 32, bias=False), nn.BatchNorm1d(32)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu6(self.bn_e(self.expand(x)))
        x = x + self.bn_p(self.project(F.relu6(self.bn_dw(self.dw(y)))))  # linear bottleneck, then the sum
        y = F.relu(self.bn_g(self.grouped(F.relu(self.bn_r(self.reduce(x))))))
        x = F.relu(self.bn_w(self.widen(y)) + self.bn_s(self.short(x)))
        x = F.relu(self.bn_sh2(self.shared(F.relu(self.bn_sh1(self.shared(x))))))
        h = x.mean((2, 3))
        h = F.relu(self.bn_t(self.tied(h))) + h @ self.tied.weight.t()  # the weight, read outside self.tied
        return self.fc(h)


class OneByOne(nn.Module):
    """1x1 convolutions of a pooled input (a matrix product on the CPU): in flat buffers packed end to end,
    ``b``'s weight would start 39 floats in, where the CPU's 1x1 conv gives other bits than on a
    64-byte boundary (psi.core.flat aligns every tensor)."""

    invariant = ["a", "b"]

    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn_a = nn.Conv2d(3, 13, 1, bias=False), nn.BatchNorm2d(13)
        self.b, self.bn_b = nn.Conv2d(13, 4, 1, bias=False), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.bn_a(self.a(x.mean((2, 3), keepdim=True))))
        return self.head(F.relu(self.bn_b(self.b(h))).flatten(1))
