"""One CIFAR training run, or a sweep of them, with a run folder that survives crashes.

    python -m psi.train --dataset cifar10 --model resnet20 --optimizer psi-sgdm --epochs 200 \\
        --seed 0 --data-dir DIR --out runs [--subset 5000] [--device cuda] [--amp bf16]
    torchrun --nproc_per_node 2 -m psi.train ...      (data-parallel; SyncBatchNorm on CUDA)
    python -m psi.train --model resnet20 resnet32 --optimizer sgd psi-sgdm --seed 0 1 2 --shard 2/4

A run folder ``<out>/<dataset>-<model>-<optimizer>-s<seed>-<hash>`` (the hash is of the whole
config: results are keyed by it) holds ``config.json``, ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (written atomically after every epoch) and, once finished,
``summary.json``. Running the same command again resumes from the checkpoint (the batches of
epoch ``e`` depend only on the seed and ``e``, so the result is the one an uninterrupted run
gives); a finished run is not run again.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import data as D
from .models import MODELS, build_model
from .optimizers import OPTIMIZERS, build_optimizer

__all__ = ["Config", "run", "sweep", "lr_factor", "TrainingDiverged", "main", "SCHEDULES"]

SCHEDULES = ("step", "cosine", "constant")
_NOT_IN_KEY = ("data_dir", "out", "progress", "device", "compile", "channels_last")


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the metrics of the epochs before are kept."""


@dataclass
class Config:
    """Everything that defines a run. ``lr=None`` etc. take the optimizer's F.2 default."""

    dataset: str = "cifar10"
    model: str = "resnet20"
    optimizer: str = "psi-sgdm"
    epochs: int = 200
    batch_size: int = 128
    seed: int = 0
    lr: float | None = None
    momentum: float | None = None
    weight_decay: float | None = None
    rest_lr: float | None = None
    schedule: str = "step"
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    gamma: float = 0.2
    warmup_epochs: float = 0.0
    subset: int | None = None
    val_size: int = 0
    max_norm: float | None = 1e4
    bn_split: int = 1
    amp: str | None = None
    channels_last: bool = False
    compile: bool = False
    device: str = "cpu"
    data_dir: str | None = None
    out: str = "runs"
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        checks = [("dataset", self.dataset, D.DATASETS), ("model", self.model, tuple(MODELS)),
                  ("optimizer", self.optimizer, OPTIMIZERS), ("schedule", self.schedule, SCHEDULES),
                  ("amp", self.amp, (None, "bf16", "fp16"))]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"invalid {name} {value!r}; valid: {', '.join(str(v) for v in valid)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The config a ``config.json`` or a summary's ``config`` holds (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> str:
        d = {k: v for k, v in asdict(self).items() if k not in _NOT_IN_KEY}
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_dir(self) -> Path:
        return Path(self.out) / f"{self.dataset}-{self.model}-{self.optimizer}-s{self.seed}-{self.key()}"


def lr_factor(cfg: Config, t: float) -> float:
    """The schedule's multiplier at fractional epoch ``t``: the paper's steps (x0.2 at 30%, 60%,
    80% of training), cosine or constant, after an optional linear warm-up."""
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return (t + 1e-9) / cfg.warmup_epochs
    if cfg.schedule == "step":
        return cfg.gamma ** sum(int(t) >= round(m * cfg.epochs) for m in cfg.milestones)
    if cfg.schedule == "cosine":
        w = cfg.warmup_epochs
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / max(cfg.epochs - w, 1e-9))))
    return 1.0


# -- helpers ---------------------------------------------------------------------------------

def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def _dist() -> tuple[int, int]:
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() and os.environ.get("PSI_BACKEND") != "gloo" else "gloo"
        torch.distributed.init_process_group(backend)
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _psi_layer_stats(opt: torch.optim.Optimizer, optimizer: str) -> dict[str, dict[str, float]]:
    """Per scale-invariant layer: neuron norm mean/min/max and the effective learning rate (the
    step on the unit sphere per unit of gradient): lr for PSI methods and SGDG (unit norms),
    the mean over neurons of lr/||w||^2 for Euclidean SGD/SGDP, undefined (NaN) for Adam."""
    out = {}
    for g in opt.param_groups:
        if not g.get("psi"):
            continue
        w = g["params"][0].detach()
        n = w.reshape(w.shape[0], -1).norm(dim=1).double()
        if optimizer in ("psi-sgd", "psi-sgdm", "sgdg"):
            eff = g["lr"]
        elif optimizer in ("sgd", "sgdp"):
            eff = float((g["lr"] / n.square()).mean())
        else:
            eff = float("nan")
        out[g["name"]] = {"norm_mean": float(n.mean()), "norm_min": float(n.min()), "norm_max": float(n.max()),
                          "eff_lr": eff}
    return out


@torch.no_grad()
def evaluate(model: nn.Module, loader: D.BatchLoader, autocast) -> tuple[float, float]:
    model.eval()
    loss = torch.zeros((), device=loader.device, dtype=torch.float64)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    n = 0
    for x, y in loader.epoch(0):
        with autocast():
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    return float(loss) / n, float(correct) / n


# -- one run ---------------------------------------------------------------------------------

def run(cfg: Config, dataset: D.Dataset | None = None) -> dict[str, Any]:
    """Train (or resume, or just read back) the run ``cfg``; returns its summary."""
    cfg.validate()
    rank, world = _dist()
    out = cfg.run_dir()
    if (out / "summary.json").is_file():
        return json.loads((out / "summary.json").read_text())
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(out / "config.json", asdict(cfg))
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    ds = dataset or D.load_dataset(cfg.dataset, cfg.data_dir)
    train_idx = torch.arange(len(ds.train_y))
    eval_x, eval_y, eval_name = ds.test_x, ds.test_y, "test"
    if cfg.val_size:
        train_idx, val_idx = D.split_validation(ds.train_y, cfg.val_size)
        eval_x, eval_y, eval_name = ds.train_x[val_idx], ds.train_y[val_idx], "val"
    if cfg.subset:
        train_idx = train_idx[D.balanced_subset(ds.train_y[train_idx], cfg.subset)]
    device_kw = dict(device=device, channels_last=cfg.channels_last)
    train = D.BatchLoader(ds.train_x[train_idx], ds.train_y[train_idx], ds.mean, ds.std, cfg.batch_size, train=True,
                          seed=cfg.seed, rank=rank, world=world, **device_kw)
    evaluation = D.BatchLoader(eval_x, eval_y, ds.mean, ds.std, 500, train=False, **device_kw)
    if len(train) == 0:
        raise ValueError(f"{len(train_idx)} training images give no full batch of {cfg.batch_size}")

    model = build_model(cfg.model, ds.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    example = next(iter(train.epoch(0)))[0][:16]
    opt = build_optimizer(cfg.optimizer, model, example, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, rest_lr=cfg.rest_lr, max_norm=cfg.max_norm)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    start = 0
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        try:
            ck = torch.load(ckpt_path, map_location=device, weights_only=False)
            model.load_state_dict(ck["model"])
            opt.load_state_dict(ck["optimizer"])
        except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
            raise RuntimeError(f"checkpoint {ckpt_path} is unreadable ({type(e).__name__}: {e}). Delete it to "
                               f"start this run over (metrics.jsonl keeps what was measured), or restore a "
                               f"good copy.") from e
        start = ck["epoch"] + 1
        torch.set_rng_state(ck["torch_rng"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # keep exactly the epochs the checkpoint holds
        lines = metrics_path.read_text().splitlines() if metrics_path.is_file() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln)["epoch"] < start]
        _atomic_write(metrics_path, lambda f: f.write("".join(ln + "\n" for ln in kept).encode()))

    net: nn.Module = model
    if world > 1:
        net = nn.SyncBatchNorm.convert_sync_batchnorm(net) if device.type == "cuda" else net
        net = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        net = torch.compile(net)
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.amp)

    def autocast():
        if amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=amp_dtype)

    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    steps = len(train)
    show = cfg.progress and rank == 0 and os.environ.get("PSI_PROGRESS", "1") != "0"
    for epoch in range(start, cfg.epochs):
        net.train()
        t0 = time.perf_counter()
        loss_sum = torch.zeros((), device=device, dtype=torch.float64)
        correct = torch.zeros((), device=device, dtype=torch.long)
        seen = 0
        batches = train.epoch(epoch)
        if show:
            from tqdm.auto import tqdm

            batches = tqdm(batches, total=steps, desc=f"{out.name} epoch {epoch + 1}/{cfg.epochs}", leave=False)
        for i, (x, y) in enumerate(batches):
            factor = lr_factor(cfg, epoch + i / steps)
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * factor
            with autocast():
                # bn_split > 1: BN statistics per slice, as that many processes without SyncBatchNorm
                logits = net(x) if cfg.bn_split == 1 else torch.cat([net(c) for c in x.chunk(cfg.bn_split)])
                loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            loss_sum += loss.detach().double() * len(y)
            correct += (logits.detach().argmax(1) == y).sum()
            seen += len(y)
        if world > 1:
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(correct)
            seen *= world
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - t0
        train_loss = float(loss_sum) / seen
        if not math.isfinite(train_loss):
            msg = (f"{out.name}: the training loss became {train_loss} in epoch {epoch + 1}; the metrics of the "
                   f"{epoch} epochs before are kept in {metrics_path}. Lower the learning rate (now "
                   f"{opt.param_groups[0]['initial_lr']}) or check the data; delete {out} to run it again.")
            if rank == 0:
                _write_json(out / "failed.json", {"error": msg, "epoch": epoch})
            raise TrainingDiverged(msg)
        eval_loss, eval_acc = evaluate(model, evaluation, autocast)
        row = {"epoch": epoch, "lr": lr_factor(cfg, epoch) * opt.param_groups[0]["initial_lr"],
               "train_loss": train_loss, "train_acc": float(correct) / seen,
               f"{eval_name}_loss": eval_loss, f"{eval_name}_acc": eval_acc,
               "epoch_seconds": seconds, "images_per_second": seen / seconds,
               "psi_layers": _psi_layer_stats(opt, cfg.optimizer)}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
                     "torch_rng": torch.get_rng_state(), "config": asdict(cfg)}
            _atomic_write(ckpt_path, lambda f, state=state: torch.save(state, f))
        if show:
            print(f"{out.name} epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}, "
                  f"{eval_name} acc {eval_acc:.4f}, {seconds:.1f}s", file=sys.stderr)
    rows = [json.loads(ln) for ln in metrics_path.read_text().splitlines() if ln.strip()]
    last = rows[-1]
    summary = {"config": asdict(cfg), "key": cfg.key(), "epochs": len(rows), "final_train_loss": last["train_loss"],
               f"final_{eval_name}_acc": last[f"{eval_name}_acc"], f"best_{eval_name}_acc":
               max(r[f"{eval_name}_acc"] for r in rows), "mean_epoch_seconds":
               sum(r["epoch_seconds"] for r in rows) / len(rows), "world_size": world,
               "data_source": ds.source, "torch": torch.__version__}
    if rank == 0:
        _write_json(out / "summary.json", summary)
    return json.loads(json.dumps(summary))  # as it reads back from summary.json


def sweep(configs: list[Config], shard: tuple[int, int] = (1, 1), dataset: D.Dataset | None = None,
          stop_on_error: bool = False) -> list[dict[str, Any]]:
    """Run shard ``k`` of ``n`` (1-based) of ``configs``: the runs ``i`` with ``i % n == k - 1``.
    A diverged run is reported and skipped unless ``stop_on_error``."""
    k, n = shard
    results = []
    for i, cfg in enumerate(configs):
        if i % n != k - 1:
            continue
        try:
            results.append(run(cfg, dataset))
        except TrainingDiverged as e:
            if stop_on_error:
                raise
            print(f"warning: {e}", file=sys.stderr)
            results.append({"config": asdict(cfg), "failed": str(e)})
    return results


# -- command line ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m psi.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    d = Config()
    ap.add_argument("--dataset", default=d.dataset, choices=D.DATASETS)
    ap.add_argument("--model", nargs="+", default=[d.model], choices=list(MODELS), help="one or more (a sweep)")
    ap.add_argument("--optimizer", nargs="+", default=[d.optimizer], choices=OPTIMIZERS, help="one or more")
    ap.add_argument("--seed", nargs="+", type=int, default=[d.seed], help="one or more")
    ap.add_argument("--epochs", type=int, default=d.epochs)
    ap.add_argument("--batch-size", type=int, default=d.batch_size)
    ap.add_argument("--lr", type=float, help="learning rate of the named method (default: appendix F.2's)")
    ap.add_argument("--rest-lr", type=float, help="learning rate of the non-PSI parameters (default 0.1)")
    ap.add_argument("--momentum", type=float)
    ap.add_argument("--weight-decay", type=float)
    ap.add_argument("--schedule", default=d.schedule, choices=SCHEDULES,
                    help="step: x0.2 at 30/60/80%% of the epochs (the paper's 60/120/160 of 200)")
    ap.add_argument("--warmup-epochs", type=float, default=0.0)
    ap.add_argument("--subset", type=int, help="a fixed class-balanced subset of N training images")
    ap.add_argument("--val-size", type=int, default=0,
                    help="hold out N training images as a validation split, evaluated instead of the test set")
    ap.add_argument("--bn-split", type=int, default=1,
                    help="BatchNorm statistics over N slices of each batch (what N processes compute without "
                         "SyncBatchNorm, which needs CUDA)")
    ap.add_argument("--max-norm", type=float, default=d.max_norm, help="PSI overflow safeguard (section 6.2)")
    ap.add_argument("--data-dir", help="folder with the dataset (default $PSI_DATA, else ./data)")
    ap.add_argument("--out", default=d.out, help="folder for run folders")
    ap.add_argument("--device", default=d.device, help="cpu, cuda, cuda:1, ...")
    ap.add_argument("--amp", choices=["bf16", "fp16"], help="mixed precision (autocast)")
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--shard", default="1/1", help="k/n: run only the k-th of n slices of the sweep")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    return ap


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = _parser()
    a = ap.parse_args(argv)
    try:
        k, n = (int(v) for v in a.shard.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        ap.error(f"--shard must be k/n with 1 <= k <= n, got {a.shard!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device is visible to torch {torch.__version__}")
    if "LOCAL_RANK" in os.environ and a.device == "cuda":
        a.device = f"cuda:{os.environ['LOCAL_RANK']}"
    configs = [Config(dataset=a.dataset, model=m, optimizer=o, seed=s, epochs=a.epochs, batch_size=a.batch_size,
                      lr=a.lr, rest_lr=a.rest_lr, momentum=a.momentum, weight_decay=a.weight_decay,
                      schedule=a.schedule, warmup_epochs=a.warmup_epochs, subset=a.subset, val_size=a.val_size,
                      max_norm=a.max_norm, bn_split=a.bn_split, data_dir=a.data_dir, out=a.out, device=a.device, amp=a.amp,
                      channels_last=a.channels_last, compile=a.compile, progress=not a.quiet)
               for m in a.model for o in a.optimizer for s in a.seed]
    try:
        for c in configs:
            c.validate()
        dataset = D.load_dataset(a.dataset, a.data_dir)
        results = sweep(configs, (k, n), dataset)
    except (D.DataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    for r in results:
        if "failed" in r:
            print(f"error: {r['failed']}", file=sys.stderr)
            continue
        acc = {k: v for k, v in r.items() if k.startswith("final_") and k.endswith("_acc")}
        print(json.dumps({"run": Config.from_dict(r["config"]).run_dir().name,
                          **acc, "final_train_loss": r["final_train_loss"]}))
    if any("failed" in r for r in results):
        raise SystemExit(1)
    return results


if __name__ == "__main__":
    main()
