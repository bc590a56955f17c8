"""Benchmarks, side by side in one process, reported as ratios.

    python -m psi.bench optimizer [--models resnet56 cifar_resnet18] [--steps 50] [--device cpu] [--no-compile]
    python -m psi.bench ops       [--models resnet56 resnet20]   (default resnet56)
    python -m psi.bench epoch     [--models resnet56] [--images 384] [--rounds 5] [--threads 2]
    python -m psi.bench engine    (see psi.bench.engine)
    python -m psi.bench discovery (see psi.bench.discovery)
    python -m psi.bench loader    (see psi.bench.loader: image folders, decoding against training)

``optimizer``: the cost of one ``step()`` on a network's parameters, gradients set at random
(the step does not look at where they came from), one thread on the CPU, each contender on its own
copy of the network. ``psi.PSISGD`` (momentum 0.9, groups from :func:`psi.param_groups`) on its
flat path (the default), its per-tensor reference (``fused=False``) and its for-loop
(``foreach=False``), against ``torch.optim.SGD(momentum=0.9, foreach=True)`` and torch's Adam
(foreach, fused); eager and under ``torch.compile``; with SGDP (``adamp``) and geoopt's
RiemannianSGD for context when they are installed. Timings are medians over interleaved
rounds, so a slow moment of the machine hits every contender alike.

``ops``: what one ``opt.step()`` of every optimizer of :func:`psi.engine.optimizers.build_optimizer`
(and of PSI-SGD(M)'s per-tensor path and torch's Adam on every tensor, foreach and fused) dispatches
on ResNet-56 (by default), counted with :class:`psi.bench.opcount.OpCounter` after two
warm-up steps (the first creates the buffers), gradients from a backward pass: aten ops, host
syncs, and an estimate of the GPU kernels (:class:`StepCounter`: views launch none, and a
foreach op whose operands broadcast takes CUDA's slow path, a kernel per tensor), which is what
bounds these small networks on a GPU. Counted on the CPU, on the paths a GPU takes
(``build_optimizer`` asks torch for foreach on every device).

``epoch``: section 6.2's timing remark (p. 1135: seconds per CIFAR-10 epoch of ResNet-56 on one
V100, SGD 16.98, Adam 18.1, SGDG 26.6, PSI-SGD 18.2, PSI-SGDM 18.5) on this machine: whole
training steps (forward, backward, ``step``) of every optimizer of the paper at ``table1``,
each on its own copy of one initial network, over the same few hundred images in batches of
128, interleaved rounds; the median time per image as a ratio to SGD's, beside the paper's ratio.
"""

from __future__ import annotations

import argparse
import sys

import torch

from psi.bench.epoch import print_epoch
from psi.bench.steps import bench_optimizer, print_ops
from psi.engine.models import build_model


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psi.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["optimizer", "ops", "epoch", "engine", "discovery", "loader"])
    ap.add_argument("--models", nargs="+", default=None, help="default: resnet56 cifar_resnet18 (optimizer), resnet56 (ops)")
    ap.add_argument("--steps", type=int, default=20, help="steps per timed round")
    ap.add_argument("--rounds", type=int, help="timed rounds (default: 15; epoch: 5)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile contenders")
    ap.add_argument("--images", type=int, default=384, help="epoch: images per timed round (batches of 128)")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["engine"]:  # its own options (--models, --device, ... mean other things there)
        from psi.bench.engine import main as engine_main

        engine_main(argv[1:])
        return
    if argv[:1] == ["loader"]:
        from psi.bench.loader import main as loader_main

        loader_main(argv[1:])
        return
    if argv[:1] == ["discovery"]:
        from psi.bench.discovery import main as discovery_main

        discovery_main(argv[1:])
        return
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.what == "ops":
        print_ops(args.models or ["resnet56"])
        return
    device = torch.device(args.device)
    if args.what == "epoch":
        print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s)")
        print_epoch(args.models or ["resnet56"], args.images, args.rounds or 5, device)
        return
    args.rounds = args.rounds or 15
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} thread(s); "
          f"median of {args.rounds} rounds x {args.steps} steps")
    for name in args.models or ["resnet56", "cifar_resnet18"]:
        res = bench_optimizer(name, args.steps, args.rounds, device, not args.no_compile)
        n = sum(p.numel() for p in build_model(name).parameters())
        base = res["torch SGD (foreach)"]
        print(f"\n{name} ({n / 1e6:.2f}M parameters)")
        print(f"  {'optimizer':<30} {'ms/step':>9} {'/ torch SGD':>12}")
        for k, v in res.items():
            print(f"  {k:<30} {v * 1e3:9.3f} {v / base:12.2f}")
