"""Discovery benchmark: ``python -m psi.bench discovery [--models resnet20 vgg-wide] [--torchvision]``.

:func:`psi.core.discovery.discover` before and after group testing, side by side on each model: the
per-layer algorithm (``strategy="per-layer"``: one float64 forward per candidate layer, one more per
rejected layer with a bias, on ``deepcopy(model).double()``) against the default (gradient screen,
group testing, a float64 copy made without an intermediate one). One CPU thread; reported: seconds,
forward passes of the probe (the screen's one with its backward), the peak memory above the process's
before the call (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), the ratios
new / old, and whether both found the same layers. Each measurement runs in a fresh child process
(``--in-process`` to skip that), so that pages one contender freed cannot hide the other's peak.

Models: ``resnet20``, ``resnet56``, ``cifar_resnet18`` (CIFAR inputs, batch 4) and ``resnet50``
(ImageNet, batch 2 at 224x224) from :mod:`psi.engine.models` when it has them; ``vgg-wide``, a VGG-11-BN
with a 4096-wide classifier (28M parameters, the memory case); ``tiny`` (a BN MLP, for the tests).
``--torchvision``: torchvision's resnet50, vgg11_bn, convnext_tiny, mobilenet_v3_large and vit_b_16,
and timm's vit_tiny_patch16_224 when timm is installed (batch 2 at 224x224, random init).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from psi.core.probe import find_layers
from psi.engine.models import BNMLP, MODELS

CIFAR = (4, 3, 32, 32)
IMAGENET = (2, 3, 224, 224)
DEFAULT_MODELS = ("resnet20", "resnet56", "cifar_resnet18", "resnet50", "vgg-wide")
TORCHVISION = ("resnet50", "vgg11_bn", "convnext_tiny", "mobilenet_v3_large", "vit_b_16")


def vgg_wide(num_classes: int = 10) -> nn.Module:
    """VGG-11-BN for 32x32 inputs with a 4096-4096 classifier (no BN there): 28M parameters."""
    layers: list[nn.Module] = []
    cin = 3
    for v in (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"):
        if v == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(cin, int(v), 3, padding=1), nn.BatchNorm2d(int(v)), nn.ReLU(inplace=True)]
            cin = int(v)
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(512, 4096), nn.ReLU(inplace=True), nn.Dropout(),
                         nn.Linear(4096, 4096), nn.ReLU(inplace=True), nn.Dropout(), nn.Linear(4096, num_classes))


def builders() -> dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]]:
    """Every model this benchmark knows, with its input shape."""
    from psi.engine import models

    imagenet = getattr(models, "IMAGENET_MODELS", ())
    out: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
        name: (MODELS[name], IMAGENET if name in imagenet else CIFAR) for name in MODELS}
    out["vgg-wide"] = (vgg_wide, CIFAR)
    out["tiny"] = (lambda: BNMLP(8, [16, 16], 4), (6, 8))
    try:
        import torchvision.models as tv

        for name in TORCHVISION:
            out[f"tv:{name}"] = (getattr(tv, name), IMAGENET)
    except ImportError:
        pass
    try:
        import timm

        out["timm:vit_tiny_patch16_224"] = (lambda: timm.create_model("vit_tiny_patch16_224"), IMAGENET)
    except ImportError:
        pass
    return out


def _status_kb(field: str) -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return float(line.split()[1])
    except OSError:
        pass
    return float("nan")


def measure(name: str, strategy: str) -> dict:
    """Seconds, forward passes, peak extra MiB and the layers found by ``strategy`` on model ``name``."""
    torch.manual_seed(0)
    build, shape = builders()[name]
    model, x = build(), torch.randn(shape)
    before = _status_kb("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak from here on
    except OSError:
        before = float("nan")
    t = time.perf_counter()
    found, forwards = find_layers(model, x, 0, strategy)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "forwards": forwards, "peak_mib": (_status_kb("VmHWM") - before) / 1024,
            "found": [[f.name, f.with_bias] for f in found],
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6}


def _measure_in_child(name: str, strategy: str, threads: int) -> dict:
    cmd = [sys.executable, "-m", "psi.bench.discovery", "--child", name, strategy, "--threads", str(threads)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psi.bench discovery", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_MODELS)} (those present)")
    ap.add_argument("--torchvision", action="store_true", help="torchvision's (and timm's) ImageNet models instead")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-process", action="store_true", help="measure here, not in child processes")
    ap.add_argument("--child", nargs=2, metavar=("MODEL", "STRATEGY"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(measure(*args.child)))
        return
    known = builders()
    if args.models:
        names = args.models
    elif args.torchvision:
        names = [n for n in known if n.startswith(("tv:", "timm:"))]
    else:
        names = [n for n in DEFAULT_MODELS if n in known]
    print(f"torch {torch.__version__}, {args.threads} thread(s); discover(): per-layer (old) vs group (new)")
    print(f"{'model':<28} {'params':>7} {'old s':>8} {'new s':>8} {'new/old':>8} {'fwd old':>8} {'fwd new':>8} "
          f"{'MiB old':>8} {'MiB new':>8} {'new/old':>8} {'same':>5}")
    for name in names:
        if name not in known:
            print(f"{name:<28} (not available here: skipped)")
            continue
        if args.in_process:
            old, new = measure(name, "per-layer"), measure(name, "group")
        else:
            old, new = (_measure_in_child(name, s, args.threads) for s in ("per-layer", "group"))
        print(f"{name:<28} {new['params_m']:6.1f}M {old['seconds']:8.2f} {new['seconds']:8.2f} "
              f"{new['seconds'] / old['seconds']:8.3f} {old['forwards']:8d} {new['forwards']:8d} "
              f"{old['peak_mib']:8.0f} {new['peak_mib']:8.0f} {new['peak_mib'] / max(old['peak_mib'], 1e-9):8.2f} "
              f"{'yes' if old['found'] == new['found'] else 'NO':>5}")


if __name__ == "__main__":
    main()
