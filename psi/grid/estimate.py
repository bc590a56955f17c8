"""How long a run's epoch takes: measured in finished epochs of the runs folder when there are some, else
timed by a few training steps on this machine; what the grid's plan multiplies into hours."""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from psi.engine.config import Config, optimizer_for
from psi.engine.models import build_model
from psi.engine.trainer import discovery_examples
from psi.grid.progress import progress_of


def kind_of_device(device: str) -> str:
    return torch.device(device).type


def _measured_ips(runs_dir: Path, model: str, device_kind: str, batch_size: int) -> list[float]:
    """Images/s of every epoch (after a process's first) of the runs in ``runs_dir`` of this
    model, device kind and batch size."""
    out = []
    for p in sorted(runs_dir.glob("*/config.json")):
        c = json.loads(p.read_text())
        if (c.get("model"), c.get("device_kind", kind_of_device(c.get("device", "cpu"))), c.get("batch_size")) == (
                model, device_kind, batch_size):
            out.extend(progress_of(p.parent)[1])
    return out


def _timed_ips(cfg: Config, steps: int) -> float:
    """Images/s of ``steps`` training steps (after 3 untimed ones) of ``cfg``'s model and optimizer
    on random images, eager (a compiled run is faster), with its autocast and memory format."""
    r = cfg.resolved()
    device = torch.device(r.device)
    model = build_model(r.model, {"cifar100": 100, "imagenet": 1000}.get(r.dataset, 10)).to(device)
    fmt = torch.channels_last if r.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    side = r.image_size or 32  # ImageNet's crops, else CIFAR's images
    x = torch.randn(r.batch_size, 3, side, side, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (r.batch_size,), device=device)
    opt = optimizer_for(r, model, x[:discovery_examples(side)])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.amp)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * r.batch_size / (time.perf_counter() - t0)


def epoch_seconds(configs: list[Config], steps: int = 20) -> dict[str, tuple[float | None, str]]:
    """Per model of ``configs``: seconds per epoch of 50000 images (training only; evaluation adds
    a little), and where that number comes from: the median over the finished epochs of runs
    already in the runs folder (same model, device kind, batch size), else ``steps`` timed steps
    (None when the runs' device is not here: a CUDA grid planned on a login node)."""
    out: dict[str, tuple[float | None, str]] = {}
    for model in dict.fromkeys(c.model for c in configs):
        c = next(c for c in configs if c.model == model)
        ips = _measured_ips(Path(c.out), model, kind_of_device(c.device), c.batch_size)
        if ips:
            out[model] = (50000 / statistics.median(ips), f"measured: median of {len(ips)} epochs in {c.out}")
        elif kind_of_device(c.device) == "cuda" and not torch.cuda.is_available():
            out[model] = (None, "unknown: no CUDA device here to time it (plan on a GPU machine, or once runs "
                                "have finished epochs)")
        else:
            opt = "psi-sgdm" if any(x.optimizer == "psi-sgdm" for x in configs) else c.optimizer
            cfg = replace(c, optimizer=opt, setting="table1", lr=None, omega=None)  # Table 3's rate
            r = cfg.resolved()
            out[model] = (50000 / _timed_ips(cfg, steps),
                          f"estimate from {steps} steps of {opt} on {r.device} (eager, amp {r.amp}, channels-last "
                          f"{r.channels_last}, batch {r.batch_size})")
    return out
