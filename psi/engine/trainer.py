"""One CIFAR training run, or a sweep of them, with a run folder that survives crashes.

    python -m psi.train --dataset cifar10 --model resnet20 --optimizer psi-sgdm --epochs 200 \\
        --seed 0 --data-dir DIR --out runs [--subset 5000] [--device cuda]
    torchrun --nproc_per_node 2 -m psi.train ... --device cuda   (data-parallel; SyncBatchNorm on CUDA)
    python -m psi.train --model resnet20 resnet32 --optimizer sgd psi-sgdm --seed 0 1 2 --shard 2/4

A run folder ``<out>/<dataset>-<model>-<optimizer>-s<seed>-<hash>`` (the hash is of the whole
resolved config and the device kind: results are keyed by it) holds ``config.json`` (what ran,
defaults resolved, with the ``setting`` and every optimizer group's hyperparameters as the
optimizer read them: :func:`psi.engine.optimizers.describe`), ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (written atomically after every epoch) and, once finished,
``summary.json``. Running the same command
again resumes from the checkpoint; a finished run is not run again. Faults lose nothing: a write killed
at any point leaves the previous file whole; a full disk raises :class:`DiskFull`; a folder made with
other settings :class:`ConfigMismatch`; a NaN loss :class:`TrainingDiverged` naming epoch and step;
SIGTERM checkpoints the step reached and exits with :data:`PREEMPTED_EXIT` (143) to be resumed there.
One process at a time works in a run folder (an ``flock`` on ``.lock``, released by the kernel even on ``kill -9``): a second
one is refused with :class:`RunLocked`, naming the holder.

What a resume gives: on the CPU, and on CUDA with ``--deterministic``, exactly the result an
uninterrupted run gives (the batches of epoch ``e`` depend only on the seed and ``e``; model,
optimizer, loss scale and RNG come back from the checkpoint). On CUDA without it, cuDNN's
algorithm choice and atomic-add kernels make every run, resumed or not, differ in the last bits.

GPU defaults (each can be switched off): bf16 autocast, channels-last, ``cudnn.benchmark``, a
compiled model and (for SGD and PSI-SGD(M)) a compiled optimizer step with the learning rate held
as a tensor, so that a schedule changes a value and never recompiles. On the CPU all are off.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from dataclasses import asdict
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


def _train(cfg: Config, device: torch.device, rank: int, world: int, out: Path,
           dataset: Dataset | None) -> dict[str, Any]:
    set_determinism(cfg, device)
    torch.manual_seed(cfg.seed)
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
    # what ran: the config, every group's hyperparameters as the optimizer reads them, the CPU kernels
    record = {**asdict(cfg), "device_kind": device.type, "world_size": world, "groups": describe(opt),
              "kernels": kernels.record()}
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        clear_stale_temps(out)
        if ckpt_path.is_file():
            check_same_config(out, record)
        write_json(out / "config.json", record)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start, resumed = 0, None
    if ckpt_path.is_file():
        ck = load_checkpoint(ckpt_path)
        start = restore_checkpoint(ck, model, opt, scaler, device, ckpt_path)
        resumed = ck.get("partial")
        for g in opt.param_groups:  # a compiled run saved a tensor lr; an eager step would read it each step
            g["lr"] = float(g["lr"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # keep exactly the epochs the checkpoint holds
        atomic_write(metrics_path, lambda f: f.write(kept_metrics(metrics_path, start).encode()))

    net: nn.Module = model
    if world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if device.type == "cuda" else net
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    step = opt.step
    if cfg.compile:
        net = torch.compile(net)
        if cfg.optimizer in COMPILED_STEP and cfg.amp != "fp16":  # GradScaler steps the optimizer itself
            for g in opt.param_groups:  # a tensor: the schedule fills it, the compiled step never recompiles
                g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)
            step = torch.compile(opt.step)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    def save(epoch: int, part: Partial | None = None) -> None:
        if rank == 0:
            state = checkpoint_state(model, opt, scaler, epoch, device, cfg, part)
            atomic_write(ckpt_path, lambda f: torch.save(state, f))

    show = cfg.progress and rank == 0 and os.environ.get("PSI_PROGRESS", "1") != "0"
    with Stop(world, device) as stop:
        for epoch in range(start, cfg.epochs):
            part = Partial(epoch, len(train), device)
            if resumed is not None and resumed["epoch"] == epoch:  # the sums over the processes go to rank 0
                sums = ("loss_sum", "correct", "losses") if rank else ()
                part = Partial(epoch, len(train), device, **{k: v for k, v in resumed.items()
                                                              if k != "epoch" and k not in sums})
            t0 = time.perf_counter()
            train_epoch(cfg, net, opt, step, scaler, train, epoch, autocast, show, out.name, part, stop)
            part.seconds += time.perf_counter() - t0
            if part.step < part.steps:  # SIGTERM: this epoch's steps so far, checkpointed, and out
                for t in (part.loss_sum, part.correct, part.losses) if world > 1 else ():
                    torch.distributed.all_reduce(t)  # what every process has added up, in rank 0's checkpoint
                save(epoch - 1, part)
                raise Preempted(f"{out.name}: stopped by SIGTERM at step {part.step} of {part.steps} in epoch "
                                f"{epoch + 1}; a checkpoint of that step is in {ckpt_path}. Run the same command "
                                f"again to resume from it.")
            row = epoch_row(cfg, epoch, start, part, rank, world, model, opt, evaluation, eval_name, autocast, out)
            if rank == 0:
                append_line(metrics_path, json.dumps(row))
            save(epoch)
            if show:
                acc = row[f"{eval_name}_acc"]
                acc_text = "" if acc is None else f", {eval_name} acc {acc:.4f}"
                print(f"{out.name} epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f}{acc_text}, "
                      f"{part.seconds:.1f}s", file=sys.stderr)
            if epoch < cfg.epochs - 1 and stop.asked(0):  # every process of the run agrees
                raise Preempted(f"{out.name}: stopped by SIGTERM after epoch {epoch + 1}, checkpointed in "
                                f"{ckpt_path}. Run the same command again to resume from it.")
    if world > 1:  # every rank reads the metrics rank 0 has written, all of them
        torch.distributed.barrier()
    summary = _summary(cfg, device, world, ds, metrics_path, eval_name)
    if rank == 0:
        write_json(out / "summary.json", summary)
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


