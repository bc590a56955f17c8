"""One training run, composed of named steps (:func:`run`: the devices and processes, the run folder and
its lock, the data and loaders, the model and optimizer, the epochs, the summary), and a sweep of runs
(:func:`sweep`, this shard's share). What a run folder holds, what a resume gives and the GPU defaults:
:mod:`psi.train`, the command line, whose help this is. Faults: :mod:`psi.engine.files` (a full disk),
:mod:`psi.engine.rundir` (the lock, other settings), :mod:`psi.engine.stop` (NaN, SIGTERM).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from psi.engine import kernels
from psi.engine.cifar import BatchLoader
from psi.engine.config import COMPILED_STEP, Config, optimizer_for
from psi.engine.dataset import Dataset, balanced_subset, split_validation
from psi.engine.distributed import (
    check_same_files,
    check_shared_folder,
    default_workers,
    from_rank0,
    init_distributed,
    rank0_lock,
    run_device,
    set_determinism,
    tf32_switches,
)
from psi.engine.epoch import epoch_row, train_epoch
from psi.engine.files import append_line, atomic_write, clear_stale_temps, write_json
from psi.engine.imageloader import ImageLoader
from psi.engine.images import FileDataset
from psi.engine.loaders import load_dataset
from psi.engine.models import build_model
from psi.engine.optimizers import describe
from psi.engine.rundir import (
    RunLocked,
    check_same_config,
    checkpoint_state,
    kept_metrics,
    load_checkpoint,
    restore_checkpoint,
)
from psi.engine.stop import Partial, Preempted, Stop, TrainingDiverged

__all__ = ["discovery_examples", "run", "sweep", "EVAL_BATCH", "DISCOVERY_EXAMPLES", "DISCOVERY_EXAMPLES_LARGE"]

EVAL_BATCH = 500  # evaluation batch: large (no gradients kept) and a divisor of CIFAR's 10000 test images
DISCOVERY_EXAMPLES = 16  # images of the first batch that psi.param_groups runs the model on
# at ImageNet's sizes, fewer: discovery's gradient screen keeps one float64 backward's activations
# (about 0.2 GB per 224-pixel image for ResNet-50), and the verdict does not depend on the batch
DISCOVERY_EXAMPLES_LARGE = 4


def discovery_examples(side: int) -> int:
    """How many images discovery runs the model on, for images ``side`` pixels wide."""
    return DISCOVERY_EXAMPLES if side <= 64 else DISCOVERY_EXAMPLES_LARGE


def run(cfg: Config, dataset: Dataset | None = None) -> dict[str, Any]:
    """Train (or resume, or just read back) the run ``cfg``; returns its summary.

    Raises :class:`RunLocked` when another process works in the run folder (nothing is changed),
    :class:`TrainingDiverged` on a NaN loss (the metrics so far are kept)."""
    cfg.validate()
    device = run_device(cfg.device)
    rank, world = init_distributed(device)
    if cfg.compile and world > 1:
        raise ValueError("--compile under torchrun is not supported: the model holds SyncBatchNorm (CUDA) or is "
                         "wrapped by DDP, and torch.compile breaks the graph at every BN layer. Run without "
                         "--compile, or train one run per GPU (python -m psi.grid run --gpus ...).")
    cfg = cfg.resolved(world)
    out = cfg.run_dir()
    if (done := _finished(out, rank, world)) is not None:
        return done
    with rank0_lock(out, rank, world):
        if world > 1:
            check_shared_folder(out, rank, world)
        if (done := _finished(out, rank, world)) is not None:  # finished while we waited for the lock
            return done
        return _train(cfg, device, rank, world, out, dataset)


def _finished(out: Path, rank: int, world: int) -> dict[str, Any] | None:
    """The run's summary if it is finished, else None: rank 0 looks and tells the others, so that every
    process takes the same branch (one that looked a moment earlier, before rank 0's summary reached
    the file system, would otherwise train alone and wait in a collective no one else joins)."""
    path = out / "summary.json"
    return from_rank0(json.loads(path.read_text()) if rank == 0 and path.is_file() else None, world)


@dataclass
class _Run:
    """What the steps of one run share once it is set up."""

    cfg: Config
    device: torch.device
    rank: int
    world: int
    out: Path
    dataset: Dataset | FileDataset
    model: nn.Module
    opt: torch.optim.Optimizer
    train: BatchLoader | ImageLoader
    evaluation: BatchLoader | ImageLoader
    eval_name: str
    scaler: torch.amp.GradScaler | None = None
    net: nn.Module | None = None  # the model as it trains: under DDP, compiled
    step: Callable[[], Any] | None = None  # the optimizer's step, compiled or not

    @property
    def ckpt_path(self) -> Path:
        return self.out / "checkpoint.pt"

    @property
    def metrics_path(self) -> Path:
        return self.out / "metrics.jsonl"

    @property
    def eval_net(self) -> nn.Module:
        """The model as it is evaluated: compiled when it trains compiled (BN's eval mode is one more graph,
        compiled at the first evaluation), else the model itself (never DDP's wrapper: no collective per batch)."""
        return self.net if self.cfg.compile else self.model

    @property
    def show(self) -> bool:
        return self.cfg.progress and self.rank == 0 and os.environ.get("PSI_PROGRESS", "1") != "0"

    @functools.cached_property
    def _amp_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.cfg.amp)

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Every step's autocast context (the dtype looked up once per run, not per step)."""
        dtype = self._amp_dtype
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def save(self, epoch: int, part: Partial | None = None) -> None:
        """The checkpoint after ``epoch`` (and how far the next got), written by rank 0 all or nothing."""
        if self.rank == 0:
            state = checkpoint_state(self.model, self.opt, self.scaler, epoch, self.device, self.cfg, part)
            atomic_write(self.ckpt_path, lambda f: torch.save(state, f))


def _train(cfg: Config, device: torch.device, rank: int, world: int, out: Path,
           dataset: Dataset | None) -> dict[str, Any]:
    set_determinism(cfg, device)
    torch.manual_seed(cfg.seed)
    with tf32_switches(cfg, device) as tf32:
        r = _set_up(cfg, device, rank, world, out, dataset)
        _write_config(r, tf32)
        start, resumed = _resume(r)
        _wrap(r)
        _epochs(r, start, resumed)
        return _finish(r)


def _set_up(cfg: Config, device: torch.device, rank: int, world: int, out: Path, dataset: Dataset | None) -> _Run:
    """The data and its loaders, the model on its device and its optimizer (the groups found on a few
    training images)."""
    ds = dataset or load_dataset(cfg.dataset, cfg.data_dir)
    train, evaluation, eval_name = _loaders(cfg, ds, device, rank, world)
    if isinstance(train, ImageLoader) and rank == 0 and cfg.progress:
        print(f"{out.name}: {len(train.files)} training images from {ds.source}, decoder {train.decoder}, "
              f"{train.workers} worker(s) per process, {cfg.image_size}px crops", file=sys.stderr)
    model = build_model(cfg.model, ds.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if isinstance(train, ImageLoader):  # a few images decoded here, not the workers' first batches
        example = train.sample(discovery_examples(cfg.image_size))
    else:
        example = next(iter(train.epoch(0)))[0][:discovery_examples(32)]
    opt = optimizer_for(cfg, model, example)
    return _Run(cfg, device, rank, world, out, ds, model, opt, train, evaluation, eval_name)


def _write_config(r: _Run, tf32: dict[str, bool | None]) -> None:
    """``config.json``: the config, every group's hyperparameters as the optimizer reads them, the CPU
    kernels, the TF32 switches as the run has them; a folder whose checkpoint was made with other
    settings is refused first."""
    record = {**asdict(r.cfg), "device_kind": r.device.type, "world_size": r.world, "groups": describe(r.opt),
              "kernels": kernels.record(), "tf32": tf32}
    if r.rank == 0:
        clear_stale_temps(r.out)
        if r.ckpt_path.is_file():
            check_same_config(r.out, record)
        write_json(r.out / "config.json", record)


def _resume(r: _Run) -> tuple[int, dict[str, Any] | None]:
    """The schedule's base rates, the loss scaler, and the state of the checkpoint if there is one: the
    epoch to start from and how far into it a stopped run got; the metrics trimmed to the checkpoint's."""
    for g in r.opt.param_groups:
        g["initial_lr"] = g["lr"]
    r.scaler = torch.amp.GradScaler(r.device.type, enabled=r.cfg.amp == "fp16")
    start, resumed = 0, None
    if r.ckpt_path.is_file():
        ck = load_checkpoint(r.ckpt_path)
        start = restore_checkpoint(ck, r.model, r.opt, r.scaler, r.device, r.ckpt_path)
        resumed = ck.get("partial")
        for g in r.opt.param_groups:  # a compiled run saved a tensor lr; an eager step would read it each step
            g["lr"] = float(g["lr"])
    if r.rank == 0:  # keep exactly the epochs the checkpoint holds
        atomic_write(r.metrics_path, lambda f: f.write(kept_metrics(r.metrics_path, start).encode()))
    return start, resumed


def _wrap(r: _Run) -> None:
    """The model as it trains (DDP with SyncBatchNorm on CUDA across processes; compiled) and the step
    (compiled with a tensor learning rate, so that the schedule fills it and never recompiles)."""
    net: nn.Module = r.model
    if r.world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if r.device.type == "cuda" else net
        net = nn.parallel.DistributedDataParallel(net, device_ids=[r.device.index] if r.device.type == "cuda" else None)
    r.step = r.opt.step
    if r.cfg.compile:
        net = torch.compile(net)
        if r.cfg.optimizer in COMPILED_STEP and r.cfg.amp != "fp16":  # GradScaler steps the optimizer itself
            for g in r.opt.param_groups:
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)
            r.step = torch.compile(r.opt.step)
    r.net = net


def _epochs(r: _Run, start: int, resumed: dict[str, Any] | None) -> None:
    """The epochs from ``start``: each trained, its row written, checkpointed; SIGTERM (mid-epoch or at
    its end, agreed by every process) checkpoints where it stopped and raises :class:`Preempted`."""
    cfg, out = r.cfg, r.out
    with Stop(r.world, r.device) as stop:
        for epoch in range(start, cfg.epochs):
            part = Partial(epoch, len(r.train), r.device)
            if resumed is not None and resumed["epoch"] == epoch:  # the sums over the processes go to rank 0
                sums = ("loss_sum", "correct", "losses") if r.rank else ()
                part = Partial(epoch, len(r.train), r.device, **{k: v for k, v in resumed.items()
                                                                  if k != "epoch" and k not in sums})
            t0 = time.perf_counter()
            train_epoch(cfg, r.net, r.opt, r.step, r.scaler, r.train, epoch, r.autocast, r.show, out.name, part, stop)
            part.seconds += time.perf_counter() - t0
            if part.step < part.steps:  # SIGTERM: this epoch's steps so far, checkpointed, and out
                for t in (part.loss_sum, part.correct, part.losses) if r.world > 1 else ():
                    torch.distributed.all_reduce(t)  # what every process has added up, in rank 0's checkpoint
                r.save(epoch - 1, part)
                raise Preempted(f"{out.name}: stopped by SIGTERM at step {part.step} of {part.steps} in epoch "
                                f"{epoch + 1}; a checkpoint of that step is in {r.ckpt_path}. Run the same command "
                                f"again to resume from it.")
            row = epoch_row(cfg, epoch, start, part, r.rank, r.world, r.eval_net, r.opt, r.evaluation, r.eval_name,
                            r.autocast, out)
            if r.rank == 0:
                append_line(r.metrics_path, json.dumps(row))
            r.save(epoch)
            if r.show:
                acc = row[f"{r.eval_name}_acc"]
                acc_text = "" if acc is None else f", {r.eval_name} acc {acc:.4f}"
                print(f"{out.name} epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}{acc_text}, "
                      f"{part.seconds:.1f}s", file=sys.stderr)
            if epoch < cfg.epochs - 1 and stop.asked(0):  # every process of the run agrees
                raise Preempted(f"{out.name}: stopped by SIGTERM after epoch {epoch + 1}, checkpointed in "
                                f"{r.ckpt_path}. Run the same command again to resume from it.")


def _finish(r: _Run) -> dict[str, Any]:
    """``summary.json``, from the metrics rank 0 wrote (every rank waits for all of them first)."""
    if r.world > 1:
        torch.distributed.barrier()
    summary = _summary(r.cfg, r.device, r.world, r.dataset, r.metrics_path, r.eval_name)
    if r.rank == 0:
        write_json(r.out / "summary.json", summary)
    return json.loads(json.dumps(summary))  # as it reads back from summary.json


def _split(cfg: Config, ds: Dataset | FileDataset) -> tuple[Tensor, Tensor | None]:
    """Indices of the training images (after ``val_size`` held out and ``subset``) and of the held-out
    validation images (None: the dataset's own test split is evaluated)."""
    train_idx, val_idx = torch.arange(len(ds.train_y)), None
    if cfg.val_size:
        train_idx, val_idx = split_validation(ds.train_y, cfg.val_size)
    if cfg.subset:
        train_idx = train_idx[balanced_subset(ds.train_y[train_idx], cfg.subset)]
    return train_idx, val_idx


def _loaders(cfg: Config, ds: Dataset | FileDataset, device: torch.device, rank: int,
             world: int) -> tuple[BatchLoader | ImageLoader, BatchLoader | ImageLoader, str]:
    """The training loader (this process's slice) and the evaluation loader (test or validation).
    CIFAR is held on the device whole; image folders stream from disk, each process decoding only its
    slice of every batch, the evaluation's too (:func:`evaluate` sums the slices over the processes)."""
    train_idx, val_idx = _split(cfg, ds)
    eval_name = "test" if val_idx is None else "val"
    if isinstance(ds, FileDataset):
        if world > 1:
            check_same_files(ds, world)
        files = ds.train_files[train_idx.numpy()]
        eval_files, eval_y = (ds.test_files, ds.test_y) if val_idx is None else (ds.train_files[val_idx.numpy()],
                                                                                 ds.train_y[val_idx])
        kw: dict[str, Any] = dict(device=device, channels_last=cfg.channels_last, image_size=cfg.image_size, rank=rank,
                                  world=world, decoder=cfg.decoder or "auto",
                                  workers=default_workers(world) if cfg.workers is None else cfg.workers)
        train = ImageLoader(files, ds.train_y[train_idx], ds.mean, ds.std, cfg.batch_size, train=True, seed=cfg.seed,
                              **kw)
        evaluation = ImageLoader(eval_files, eval_y, ds.mean, ds.std, max(cfg.batch_size, world), train=False, **kw)
    else:
        eval_x, eval_y = (ds.test_x, ds.test_y) if val_idx is None else (ds.train_x[val_idx], ds.train_y[val_idx])
        device_kw = dict(device=device, channels_last=cfg.channels_last)
        train = BatchLoader(ds.train_x[train_idx], ds.train_y[train_idx], ds.mean, ds.std, cfg.batch_size,
                              train=True, seed=cfg.seed, rank=rank, world=world, **device_kw)
        evaluation = BatchLoader(eval_x, eval_y, ds.mean, ds.std, EVAL_BATCH, train=False, **device_kw)
    if len(train) == 0:
        raise ValueError(f"{len(train_idx)} training images give no full batch of {cfg.batch_size}")
    return train, evaluation, eval_name


def _summary(cfg: Config, device: torch.device, world: int, ds: Dataset, metrics_path: Path,
             eval_name: str) -> dict[str, Any]:
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    last = rows[-1]
    timed = [r["epoch_seconds"] for r in rows if not r.get("warmup")] or [r["epoch_seconds"] for r in rows]
    return {"config": asdict(cfg), "key": cfg.key(), "device_kind": device.type, "epochs": len(rows),
            "final_train_loss": last["train_loss"], f"final_{eval_name}_acc": last[f"{eval_name}_acc"],
            f"best_{eval_name}_acc": max(r[f"{eval_name}_acc"] for r in rows if r[f"{eval_name}_acc"] is not None),
            "mean_epoch_seconds": sum(timed) / len(timed),  # warm-up epochs (compilation) left out
            "warmup_epoch_seconds": [r["epoch_seconds"] for r in rows if r.get("warmup")],
            "world_size": world, "data_source": ds.source, "torch": torch.__version__,
            "trained_by": {"pid": os.getpid(), "host": socket.gethostname()},  # the process that finished it
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "kernels": kernels.record()}  # what decides the CPU bits (psi.engine.kernels)


def sweep(configs: list[Config], shard: tuple[int, int] = (1, 1), dataset: Dataset | None = None,
          stop_on_error: bool = False) -> list[dict[str, Any]]:
    """Run shard ``k`` of ``n`` (1-based) of ``configs``: the runs ``i`` with ``i % n == k - 1``.
    A diverged run (``"failed"``) or one another process is working on (``"locked"``) is
    reported and skipped unless ``stop_on_error``."""
    k, n = shard
    results = []
    for i, cfg in enumerate(configs):
        if i % n != k - 1:
            continue
        try:
            results.append(run(cfg, dataset))
        except (TrainingDiverged, RunLocked) as e:
            if stop_on_error:
                raise
            print(f"warning: {e}", file=sys.stderr)
            results.append({"config": asdict(cfg), "failed" if isinstance(e, TrainingDiverged) else "locked": str(e)})
    return results


