"""``python -m psi.bench epoch``: whole training steps of every optimizer of the paper, side by side, as a
ratio to SGD beside section 6.2's timing remark; and the one training loop the epoch benchmarks share."""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from psi.engine.models import build_model
from psi.engine.optimizers import build_optimizer


def train_batches(model: nn.Module, opt: torch.optim.Optimizer, batches: Iterable[tuple[Tensor, Tensor]]) -> None:
    """The plainest training loop, what both epoch benchmarks time: forward, loss, backward, ``step()``."""
    for x, y in batches:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench_epoch(model_name: str, images: int, rounds: int, device: torch.device,
                optimizers: tuple[str, ...] = ("sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm")) -> dict[str, float]:
    """Median seconds per training image (a whole step: forward, backward, ``step``) of each of
    ``optimizers`` on ``model_name`` at batch 128, over ``images`` random CIFAR-sized images."""
    import copy

    g = torch.Generator().manual_seed(0)
    x = torch.randn(images, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, 10, (images,), generator=g).to(device)
    torch.manual_seed(0)
    model0 = build_model(model_name).to(device)
    runs = {}
    for name in optimizers:
        model = copy.deepcopy(model0)
        runs[name] = (model, build_optimizer(name, model, x[:16], "table1"))

    def epoch(model: nn.Module, opt: torch.optim.Optimizer) -> None:
        train_batches(model, opt, zip(x.split(128), y.split(128), strict=True))

    for model, opt in runs.values():  # warm-up: allocations, the optimizers' buffers
        epoch(model, opt)
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(rounds):
        for name, (model, opt) in runs.items():
            sync(device)
            t = time.perf_counter()
            epoch(model, opt)
            sync(device)
            times[name].append((time.perf_counter() - t) / images)
    return {k: statistics.median(v) for k, v in times.items()}


def print_epoch(models: list[str], images: int, rounds: int, device: torch.device) -> None:
    from psi.study.results import PAPER_EPOCH_SECONDS

    for name in models:
        res = bench_epoch(name, images, rounds, device)
        print(f"\n{name}: {images} images per round, batch 128, median of {rounds} interleaved rounds")
        print(f"  {'optimizer':<10} {'ms/image':>9} {'/ SGD':>7} {'paper / SGD (ResNet-56, V100)':>30}")
        for k, v in res.items():
            paper = PAPER_EPOCH_SECONDS[k] / PAPER_EPOCH_SECONDS["sgd"]
            print(f"  {k:<10} {v * 1e3:9.2f} {v / res['sgd']:7.3f} {paper:30.3f}")
