"""The check's ``cifar`` stage: one real CIFAR-10 run from the JPEG archive, then a paired mini-study
sized to the rest of the stage's time (SGD and PSI-SGDM at ``table1``, the same seeds: at a seed both
start from the same weights and see the same batches), several runs at once on the one GPU, reported
as the CPU study reports: per-seed accuracies, the paired difference with its 95% interval and the
smallest difference the design could have detected (:mod:`psi.study.stats`)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
from dataclasses import replace
from typing import Any

from psi.check.stage import ROOT, Stage
from psi.engine.config import Config

OPTIMIZERS = ("sgd", "psi-sgdm")
# Several runs of a small ResNet on one GPU share it: one run is bound by kernel launches, so packed
# runs gain throughput. The sizing assumes this gain (conservative: a run cut off by the stage's box
# is lost), and the stage records the packed epoch time it measured, for the next sizing.
PACKED_GAIN = 1.5
STARTUP_SECONDS = 25.0  # a process's start: imports, the dataset from its cache, cuDNN's first choices


def _base(s: Stage) -> tuple[Config, Any]:
    from psi.engine.cifar import synthetic
    from psi.engine.loaders import load_dataset

    if s.tiny and not s.data_dir:  # the self-test without CIFAR-10 at hand
        ds, dataset = synthetic(n_train=400, n_test=100), "synthetic"
    else:  # tiny: the real loader on 200 images
        ds, dataset = load_dataset("cifar10", s.data_dir, download=False), "cifar10"
    base = Config(dataset=dataset, model="smallcnn" if s.tiny else "resnet20", setting="table1", epochs=1,
                  batch_size=50 if s.tiny else 128, device=str(s.device), data_dir=s.data_dir,
                  out=str(s.work / "runs"), progress=False, compile=False, subset=200 if s.tiny else None)
    return base, ds


def _argv(c: Config) -> list[str]:
    args = ["--dataset", c.dataset, "--model", c.model, "--setting", c.setting, "--epochs", str(c.epochs),
            "--batch-size", str(c.batch_size), "--device", c.device, "--out", c.out, "--no-compile", "--quiet"]
    args += ["--data-dir", c.data_dir] if c.data_dir else []
    return args + (["--subset", str(c.subset)] if c.subset else [])


def packed(base: Config, seeds: list[int], procs: int, timeout: float) -> tuple[list[dict[str, Any]], float]:
    """Train every optimizer at every seed in ``procs`` processes at once (``python -m psi.train``'s
    shards of one sweep); the runs' summaries and the wall seconds."""
    from psi.study.results import _kernels_of as label

    cmd = [sys.executable, "-m", "psi.train", *_argv(base), "--optimizer", *OPTIMIZERS, "--seed", *map(str, seeds)]
    t = time.perf_counter()
    ps = [subprocess.Popen([*cmd, "--shard", f"{k}/{procs}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True) for k in range(1, procs + 1)]
    errors = []
    for p in ps:
        try:
            _, err = p.communicate(timeout=max(1.0, timeout - (time.perf_counter() - t)))
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
            errors.append("a shard ran out of the stage's time")
        if p.returncode:
            errors.append(err[-1500:])
    wall = time.perf_counter() - t
    rows = []
    for opt in OPTIMIZERS:
        for seed in seeds:
            path = replace(base, optimizer=opt, seed=seed).run_dir() / "summary.json"
            if path.is_file():
                sm = json.loads(path.read_text())
                rows.append(dict(optimizer=opt, seed=seed, acc=sm["final_test_acc"], kernels=label(sm["config"], sm),
                                 mean_epoch_seconds=sm["mean_epoch_seconds"]))
    if errors and not rows:
        raise RuntimeError("the mini-study's runs failed: " + " | ".join(errors))
    return rows, wall


def cifar(s: Stage) -> None:
    import pandas as pd

    from psi.engine.trainer import run
    from psi.study.stats import paired

    try:
        base, ds = _base(s)
    except Exception as e:
        s.emit(headline=f"no CIFAR-10: {e}"[:300])
        raise
    t = time.perf_counter()
    first = run(replace(base, optimizer="psi-sgdm", seed=0, out=str(s.work / "first")), ds)  # not one of the study's
    first_wall = time.perf_counter() - t
    epoch = first["mean_epoch_seconds"]
    s.emit(first_run=dict(optimizer="psi-sgdm", model=base.model, epochs=1, test_acc=first["final_test_acc"],
                          epoch_seconds=epoch, wall_seconds=round(first_wall, 1), data_source=first["data_source"],
                          device_name=first["device_name"]))
    seeds = list(range(2 if s.tiny else 4))
    procs = len(seeds) * len(OPTIMIZERS)
    left = s.left() - 10
    per_epoch = procs * epoch / PACKED_GAIN  # wall seconds of one epoch of every run at once
    epochs = max(1, min(200, math.floor((left - STARTUP_SECONDS) / per_epoch))) if per_epoch > 0 else 1
    if s.tiny:
        epochs = 1
    elif left < STARTUP_SECONDS + per_epoch:
        s.emit(stage_skipped=True, headline=f"first run {epoch:.1f} s/epoch; {left:.0f} s left: too little for the study")
        return
    study = replace(base, epochs=epochs)
    s.emit(design=dict(seeds=seeds, optimizers=list(OPTIMIZERS), epochs=epochs, processes_at_once=procs,
                       setting="table1", model=base.model, assumed_gain=PACKED_GAIN))
    rows, wall = packed(study, seeds, procs, left)
    runs = pd.DataFrame(rows)
    p = paired(runs, "psi-sgdm", "sgd") if len(rows) else {}
    per_seed = {opt: {int(r["seed"]): r["acc"] for r in rows if r["optimizer"] == opt} for opt in OPTIMIZERS}
    measured_gain = procs * epochs * epoch / wall if wall else None
    s.emit(runs=rows, per_seed_acc=per_seed, paired={k: v for k, v in p.items()}, study_wall_seconds=round(wall, 1),
           measured_gain=measured_gain,
           headline=f"{epochs} epoch(s), {len(seeds)} seeds: psi-sgdm - sgd = {p.get('diff', math.nan):.2f} "
           f"[{p.get('ci_low', math.nan):.2f}, {p.get('ci_high', math.nan):.2f}], detectable "
           f"{p.get('mde', math.nan):.2f}")
