"""Engine benchmark: ``python -m psi.bench engine [--models resnet20 resnet56] [--device cuda]``.

Side by side in one invocation, on the same batches:

1. the engine (:func:`psi.engine.trainer.run`, SGD) against a bare hand-written loop (forward, loss,
   backward, ``optimizer.step()``, nothing else), eager: the engine's bookkeeping costs the ratio;
2. PSI-SGDM against SGD in the engine, eager and compiled (model and step): the paper's timing
   remark (+9% per epoch on a V100);
3. ``--runs-per-device 1 4``: that many engine runs at once on one device (separate processes,
   as ``python -m psi.grid run --runs-per-gpu`` starts them), images/s summed over the runs.

Epoch times exclude evaluation and each process's first epoch (compilation, cuDNN
benchmarking: reported apart); the median of the others is reported. On CUDA the engine's
defaults are used (bf16 autocast, channels-last), on the CPU none of them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from psi.bench.epoch import train_batches
from psi.engine.cifar import BatchLoader
from psi.engine.config import Config
from psi.engine.dataset import Dataset, balanced_subset
from psi.engine.loaders import load_dataset
from psi.engine.models import build_model
from psi.engine.optimizers import build_optimizer
from psi.engine.trainer import DISCOVERY_EXAMPLES, run


def bare_loop(ds: Dataset, cfg: Config) -> list[float]:
    """Seconds per epoch of the plainest loop over the engine's own batches (eager, fp32)."""
    torch.manual_seed(cfg.seed)
    idx = balanced_subset(ds.train_y, cfg.subset) if cfg.subset else torch.arange(len(ds.train_y))
    loader = BatchLoader(ds.train_x[idx], ds.train_y[idx], ds.mean, ds.std, cfg.batch_size, train=True,
                           seed=cfg.seed, device=cfg.device)
    model = build_model(cfg.model, ds.num_classes).to(cfg.device)
    opt = build_optimizer(cfg.optimizer, model, next(iter(loader.epoch(0)))[0][:DISCOVERY_EXAMPLES])
    times = []
    for epoch in range(cfg.epochs):
        model.train()
        t = time.perf_counter()
        train_batches(model, opt, loader.epoch(epoch))
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def _timed(rows: list[dict]) -> list[float]:
    return [r["epoch_seconds"] for r in rows if not r.get("warmup")]


def engine(ds: Dataset, cfg: Config) -> list[float]:
    """Seconds of the engine's non-warm-up epochs."""
    run(cfg, ds)
    return _timed([json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()])


def concurrent(cfg: Config, n: int, threads: int) -> float:
    """Images/s summed over ``n`` engine runs started at once (seeds 100..), each in its own process."""
    args = ["--dataset", cfg.dataset, "--model", cfg.model, "--optimizer", cfg.optimizer, "--epochs", str(cfg.epochs),
            "--batch-size", str(cfg.batch_size), "--subset", str(cfg.subset), "--device", cfg.device, "--out", cfg.out,
            "--threads", str(threads), "--quiet", "--compile" if cfg.compile else "--no-compile"]
    if cfg.data_dir:
        args += ["--data-dir", cfg.data_dir]
    procs = [subprocess.Popen([sys.executable, "-m", "psi.train", *args, "--seed", str(100 + i)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(n)]
    for p in procs:
        if p.wait() != 0:
            raise RuntimeError(f"a concurrent run failed: {p.stderr.read()[-2000:]}")
    total = 0.0
    for i in range(n):
        d = Config.from_dict({**cfg.__dict__, "seed": 100 + i}).run_dir()
        rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
        total += cfg.subset / statistics.median(_timed(rows) or [r["epoch_seconds"] for r in rows])
    return total


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psi.bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-dir")
    ap.add_argument("--models", nargs="+", default=["resnet20"])
    ap.add_argument("--subset", type=int, default=5120, help="training images per epoch (all 50000 on a GPU)")
    ap.add_argument("--epochs", type=int, default=3, help="per run; the first is a warm-up")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--modes", nargs="+", choices=["eager", "compiled"],
                    help="default: eager and compiled on CUDA, eager on the CPU (compiling takes minutes there)")
    ap.add_argument("--runs-per-device", nargs="+", type=int, default=[1],
                    help="also time N concurrent runs on the device, images/s summed (e.g. 1 4)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    cuda = a.device.startswith("cuda")
    modes = a.modes or (["eager", "compiled"] if cuda else ["eager"])
    ds = load_dataset(a.dataset, a.data_dir)
    name = torch.cuda.get_device_name(a.device) if cuda else f"cpu, {torch.get_num_threads()} threads"
    print(f"torch {torch.__version__}, {name}; {a.subset} images of {ds.source}, batch {a.batch_size}; "
          f"median epoch seconds after each process's warm-up epoch")
    with tempfile.TemporaryDirectory() as tmp:
        def cfg(model: str, opt: str, mode: str, seed: int = 0) -> Config:
            return Config(dataset=a.dataset, model=model, optimizer=opt, epochs=a.epochs, batch_size=a.batch_size,
                          subset=a.subset, device=a.device, compile=mode == "compiled", data_dir=a.data_dir,
                          out=str(Path(tmp) / mode / "runs"), progress=False, seed=seed)

        for model in a.models:
            res: dict[str, list[float]] = {}
            for rep in range(2):  # interleaved, so a slow moment of the machine hits every contender
                res.setdefault("bare loop, sgd, eager", []).extend(bare_loop(ds, cfg(model, "sgd", "eager"))[1:])
                for mode in modes:
                    for opt in ("sgd", "psi-sgdm"):
                        res.setdefault(f"engine, {opt}, {mode}", []).extend(engine(ds, cfg(model, opt, mode, rep)))
            med = {k: statistics.median(v) for k, v in res.items()}
            print(f"\n{model}")
            for k, v in med.items():
                print(f"  {k:<28} {v:8.3f} s/epoch  {a.subset / v:9.0f} images/s")
            print(f"  engine / bare loop (sgd, eager): {med['engine, sgd, eager'] / med['bare loop, sgd, eager']:.3f}")
            for mode in modes:
                ratio = med[f"engine, psi-sgdm, {mode}"] / med[f"engine, sgd, {mode}"]
                print(f"  psi-sgdm / sgd ({mode}):{'':9} {ratio:.3f}")
            if "compiled" in modes:
                print(f"  compiled / eager (psi-sgdm):     "
                      f"{med['engine, psi-sgdm, compiled'] / med['engine, psi-sgdm, eager']:.3f}")
            if cuda:
                print(f"  epoch of all 50000 images (psi-sgdm, {modes[-1]}): "
                      f"{med[f'engine, psi-sgdm, {modes[-1]}'] * 50000 / a.subset:.2f} s")
            counts = [n for n in a.runs_per_device if n > 0]
            if len(counts) > 1 or counts != [1]:
                base = None
                for n in counts:
                    threads = max(1, (os.cpu_count() or 1) // n) if cuda else max(1, a.threads // n)
                    ips = concurrent(cfg(model, "psi-sgdm", modes[-1]), n, threads)
                    base = base or ips
                    print(f"  {n} run(s) at once (psi-sgdm, {modes[-1]}): {ips:9.0f} images/s summed, "
                          f"{ips / base:.2f}x the first")
