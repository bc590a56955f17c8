"""Benchmarks, side by side in one process, reported as ratios.

    python -m psi.bench optimizer [--models resnet56 resnet18] [--steps 50] [--device cpu] [--no-compile]
    python -m psi.bench engine    (see psi.train_bench)

``optimizer``: the cost of one ``step()`` on a network's parameters, gradients set at random
(the step does not look at where they came from), one thread on the CPU. ``psi.PSISGD``
(momentum 0.9, groups from :func:`psi.param_groups`) against ``torch.optim.SGD(momentum=0.9,
foreach=True)``; eager and under ``torch.compile``; with SGDP (``adamp``) and geoopt's
RiemannianSGD for context when they are installed. Timings are medians over interleaved
rounds, so a slow moment of the machine hits every contender alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import psi
from psi.models import build_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _contenders(model: nn.Module, example: torch.Tensor, compile_: bool) -> dict[str, Callable[[], object]]:
    params = list(model.parameters())
    groups = psi.param_groups(model, example)
    out: dict[str, Callable[[], object]] = {}

    def add(name: str, opt: torch.optim.Optimizer, compiled: bool = False) -> None:
        out[name] = torch.compile(opt.step) if compiled else opt.step

    add("torch SGD (foreach)", torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True))
    add("psi.PSISGD", psi.PSISGD(groups, lr=0.1, momentum=0.9))
    add("psi.PSISGD (foreach=False)", psi.PSISGD(groups, lr=0.1, momentum=0.9, foreach=False))
    if compile_:
        add("torch SGD (compiled)", torch.optim.SGD(params, lr=0.1, momentum=0.9, foreach=True), True)
        add("psi.PSISGD (compiled)", psi.PSISGD(groups, lr=0.1, momentum=0.9), True)
    try:
        from adamp import SGDP

        add("adamp.SGDP", SGDP(params, lr=0.1, momentum=0.9, nesterov=True))
    except ImportError:
        pass
    try:
        import geoopt

        add("geoopt.RiemannianSGD", geoopt.optim.RiemannianSGD(params, lr=0.1, momentum=0.9))
    except ImportError:
        pass
    return out


def bench_optimizer(model_name: str, steps: int, rounds: int, device: torch.device, compile_: bool) -> dict[str, float]:
    """Median seconds per step of every contender on ``model_name``'s parameters."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    example = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():  # all contenders update the same tensors: start from moderate norms
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    contenders = _contenders(model, example, compile_)
    for step in contenders.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            _sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            _sync(device)
            times[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psi.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["optimizer", "engine"])
    ap.add_argument("--models", nargs="+", default=["resnet56", "resnet18"])
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    args, rest = ap.parse_known_args(argv)
    if args.what == "engine":
        from psi.train_bench import main as engine_main

        return engine_main(rest)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s); "
          f"median of {args.rounds} rounds x {args.steps} steps")
    for name in args.models:
        res = bench_optimizer(name, args.steps, args.rounds, device, not args.no_compile)
        n = sum(p.numel() for p in build_model(name).parameters())
        base = res["torch SGD (foreach)"]
        print(f"\n{name} ({n / 1e6:.2f}M parameters)")
        print(f"  {'optimizer':<30} {'ms/step':>9} {'/ torch SGD':>12}")
        for k, v in res.items():
            print(f"  {k:<30} {v * 1e3:9.3f} {v / base:12.2f}")


if __name__ == "__main__":
    main()
