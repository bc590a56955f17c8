"""Engine benchmark: ``python -m psi.bench engine [--model resnet20] [--subset 5120] [--epochs 2]``.

Side by side in one process, on the same model and the same batches:

1. the engine (:func:`psi.train.run`, SGD) against a bare hand-written loop (forward, loss,
   backward, ``optimizer.step()``, nothing else): the engine's bookkeeping costs the ratio;
2. PSI-SGDM against SGD in the engine: the paper's timing remark (+9% per epoch on a V100).

Epoch times exclude evaluation; the first epoch is a warm-up and the median of the others
is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from . import data as D
from .models import build_model
from .optimizers import build_optimizer
from .train import Config, run


def bare_loop(ds: D.Dataset, cfg: Config) -> list[float]:
    """Seconds per epoch of the plainest loop over the engine's own batches."""
    torch.manual_seed(cfg.seed)
    idx = D.balanced_subset(ds.train_y, cfg.subset) if cfg.subset else torch.arange(len(ds.train_y))
    loader = D.BatchLoader(ds.train_x[idx], ds.train_y[idx], ds.mean, ds.std, cfg.batch_size, train=True,
                           seed=cfg.seed, device=cfg.device)
    model = build_model(cfg.model, ds.num_classes).to(cfg.device)
    opt = build_optimizer(cfg.optimizer, model, next(iter(loader.epoch(0)))[0][:16])
    times = []
    for epoch in range(cfg.epochs):
        model.train()
        t = time.perf_counter()
        for x, y in loader.epoch(epoch):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if cfg.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return times


def engine(ds: D.Dataset, cfg: Config) -> list[float]:
    run(cfg, ds)
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    return [r["epoch_seconds"] for r in rows]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psi.bench engine", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="cifar10")
    ap.add_argument("--data-dir")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--subset", type=int, default=5120)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--amp", choices=["bf16", "fp16"])
    ap.add_argument("--channels-last", action="store_true")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    ds = D.load_dataset(a.dataset, a.data_dir)
    print(f"torch {torch.__version__}, {a.device}, {torch.get_num_threads()} threads; {a.model}, {a.subset} "
          f"images of {ds.source}, batch {a.batch_size}; median epoch seconds after a warm-up epoch")
    with tempfile.TemporaryDirectory() as tmp:
        def cfg(opt: str, seed: int = 0) -> Config:
            return Config(dataset=a.dataset, model=a.model, optimizer=opt, epochs=a.epochs, batch_size=a.batch_size,
                          subset=a.subset, device=a.device, amp=a.amp, channels_last=a.channels_last,
                          out=str(Path(tmp) / "runs"), progress=False, seed=seed)

        res: dict[str, list[float]] = {"bare loop, sgd": [], "engine, sgd": [], "engine, psi-sgdm": []}
        for rep in range(2):  # interleaved, so a slow moment of the machine hits all three
            res["bare loop, sgd"] += bare_loop(ds, cfg("sgd"))[1:]
            res["engine, sgd"] += engine(ds, cfg("sgd", rep))[1:]
            res["engine, psi-sgdm"] += engine(ds, cfg("psi-sgdm", rep))[1:]
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in med.items():
        print(f"  {k:<20} {v:8.2f} s/epoch  {a.subset / v:8.0f} images/s")
    print(f"  engine / bare loop (sgd):     {med['engine, sgd'] / med['bare loop, sgd']:.3f}")
    print(f"  psi-sgdm / sgd (engine):      {med['engine, psi-sgdm'] / med['engine, sgd']:.3f}")
