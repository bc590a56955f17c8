"""One CIFAR training run, or a sweep of them, with a run folder that survives crashes.

    python -m psi.train --dataset cifar10 --model resnet20 --optimizer psi-sgdm --epochs 200 \\
        --seed 0 --data-dir DIR --out runs [--subset 5000] [--device cuda]
    torchrun --nproc_per_node 2 -m psi.train ... --device cuda   (data-parallel; SyncBatchNorm on CUDA)
    python -m psi.train --model resnet20 resnet32 --optimizer sgd psi-sgdm --seed 0 1 2 --shard 2/4

A run folder ``<out>/<dataset>-<model>-<optimizer>-s<seed>-<hash>`` (the hash is of the whole
resolved config and the device kind: results are keyed by it) holds ``config.json`` (what ran,
defaults resolved, with the ``setting`` and every optimizer group's hyperparameters as the
optimizer read them: :func:`psi.optimizers.describe`), ``metrics.jsonl`` (one JSON object per
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

import argparse
import atexit
import contextlib
import errno
import fcntl
import hashlib
import itertools
import json
import math
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import data as D
from . import images as I
from . import kernels
from .models import MODELS, build_model
from .optimizers import OPTIMIZERS, SETTINGS, build_optimizer, describe, effective_lr
from .psisgd import MAX_NORM

__all__ = ["Config", "configs_from_args", "discovery_examples", "run", "sweep", "lr_factor", "optimizer_for",
           "read_metrics", "TrainingDiverged", "RunLocked", "DiskFull", "ConfigMismatch", "Preempted", "lock_holder", "main",
           "SCHEDULES", "AMP_MODES", "COMPILED_STEP", "PREEMPTED_EXIT"]

SCHEDULES = ("step", "cosine", "constant")
AMP_MODES = ("auto", "none", "bf16", "fp16")
# Optimizers whose step is compiled when the model is: their steps trace to one graph with a tensor
# learning rate (tested on the CPU). Adam's foreach step refuses a tensor learning rate unless its
# state is capturable (which a resume does not restore reliably), SGDG's has not been checked under
# the compiler, and SGDP's reads values on the host: those run eager.
COMPILED_STEP = ("sgd", "psi-sgd", "psi-sgdm")
# not in the run's key: where it runs and how fast, not what it computes (the device *kind* is)
# nor how often it is evaluated: training never reads the evaluation, so the run is the same
_NOT_IN_KEY = ("data_dir", "out", "progress", "device", "compile", "channels_last", "deterministic", "eval_every",
               "workers")
# in the key only when set: fields added after runs were made, None or "none" for every CIFAR run,
# so that those runs keep their folders
_KEY_IF_SET = ("image_size", "decoder", "lr_scaling")
# The batch size of Table 3 (supp. p. 17: 128 for every method; the only batch size the paper gives,
# for CIFAR and ImageNet alike): with lr_scaling="linear" every learning rate is multiplied by
# batch_size / LR_REFERENCE_BATCH (Goyal et al. 2017's linear scaling rule).
LR_REFERENCE_BATCH = 128
# The paper's two schedules (section 6.2, p. 1135) as presets for the command line (--preset): CIFAR,
# 200 epochs, x0.2 at 60/120/160; ImageNet, 100 epochs, x0.2 at 30/60/90, 224-pixel crops, Table 3's
# batch of 128, learning rates scaled linearly when --batch-size changes it.
PRESETS: dict[str, dict[str, Any]] = {
    "cifar": dict(epochs=200, milestones=(0.3, 0.6, 0.8), gamma=0.2, batch_size=128),
    "imagenet": dict(dataset="imagenet", model=["resnet18"], epochs=100, milestones=(0.3, 0.6, 0.9), gamma=0.2,
                     batch_size=128, image_size=224, lr_scaling="linear"),
}
EVAL_BATCH = 500  # evaluation batch: large (no gradients kept) and a divisor of CIFAR's 10000 test images
DISCOVERY_EXAMPLES = 16  # images of the first batch that psi.param_groups runs the model on
# at ImageNet's sizes, fewer: discovery's gradient screen keeps one float64 backward's activations
# (about 0.2 GB per 224-pixel image for ResNet-50), and the verdict does not depend on the batch
DISCOVERY_EXAMPLES_LARGE = 4


def discovery_examples(side: int) -> int:
    """How many images discovery runs the model on, for images ``side`` pixels wide."""
    return DISCOVERY_EXAMPLES if side <= 64 else DISCOVERY_EXAMPLES_LARGE


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the metrics of the epochs before are kept."""


class RunLocked(RuntimeError):
    """Another live process is working in this run folder; nothing was changed."""


class DiskFull(RuntimeError):
    """A write found no space (ENOSPC) or no quota (EDQUOT) left; every file written before is intact."""


class ConfigMismatch(RuntimeError):
    """The run folder's checkpoint was made with other settings (another version of psi, or a hand
    edit): resuming would join two different runs into one. Nothing was changed."""


class Preempted(Exception):
    """SIGTERM arrived (what SLURM sends before it preempts or times out a job): the step under way
    finished, a checkpoint of it was written, and the same command resumes from there."""


PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143: the status of a process ended by SIGTERM, as schedulers expect


def _field(default: Any, help: str, **cli: Any) -> Any:
    """A :class:`Config` field and its command line: ``help`` and argparse's ``choices``, ``sweep``
    (one or more values: a sweep), ``cli=False`` (not an option)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class Config:
    """Everything that defines a run. ``setting`` names the paper's conditions (``table1``: no
    regularizer; ``table2``: L2 / SGDG's orthogonality term; ``tuned``: table1's with a selected
    ``lr``; see :mod:`psi.optimizers`); ``lr=None`` etc. take the setting's value; ``amp``,
    ``channels_last`` and ``compile`` left at auto take the device's best (see :meth:`resolved`).
    Each field's help is its command-line option's (:func:`_parser` is made from these)."""

    dataset: str = _field("cifar10", "the dataset", choices=D.DATASETS)
    model: str = _field("resnet20", "the network (one or more: a sweep)", choices=tuple(MODELS), sweep=True)
    optimizer: str = _field("psi-sgdm", "the method (one or more: a sweep)", choices=OPTIMIZERS, sweep=True)
    setting: str = _field("table1", "table1: no regularizer (Table 1); table2: L2 5e-4 in the loss, SGDG's "
                          "orthogonality omega 0.1 (supplement Table 2); tuned: table1 with the --lr a selection "
                          "chose (psi.optimizers says where every value comes from)", choices=SETTINGS)
    epochs: int = _field(200, "training epochs (the paper: 200 on CIFAR)")
    batch_size: int = _field(128, "training batch (the paper: 128)")
    seed: int = _field(0, "initial weights, batches and augmentation (one or more: a sweep)", sweep=True)
    lr: float | None = _field(None, "learning rate of the named method's group (default: Table 3's)")
    momentum: float | None = _field(None, "momentum of the named method's group (default: the setting's)")
    weight_decay: float | None = _field(None, "L2 of the named method's group (default: the setting's)")
    rest_lr: float | None = _field(None, "learning rate of the parameters that are not scale-invariant (default 0.1)")
    omega: float | None = _field(None, "SGDG's orthogonality regularizer (default: the setting's)")
    schedule: str = _field("step", "step: x gamma at the milestones (the paper: x0.2 at 60/120/160 of 200 epochs)",
                           choices=SCHEDULES)
    milestones: tuple[float, ...] = _field((0.3, 0.6, 0.8), "the step schedule's milestones, as fractions of the "
                                           "epochs")
    gamma: float = _field(0.2, "the step schedule's factor at each milestone")
    warmup_epochs: float = _field(0.0, "linear warm-up of the learning rate over this many epochs")
    image_size: int | None = _field(None, "imagefolder/imagenet: the training crop's side (default 224); evaluation "
                                    "resizes the shorter side to size/0.875 and takes the centre crop")
    lr_scaling: str = _field("none", "linear: every learning rate times batch_size/128 (Table 3's batch; Goyal et "
                             "al. 2017's rule), so that --batch-size keeps the paper's rate per image",
                             choices=("none", "linear"))
    workers: int | None = _field(None, "imagefolder/imagenet: decoding processes per training process (default: "
                                 "the CPUs per process, at most 8)")
    decoder: str | None = _field(None, "imagefolder/imagenet: pil (CPU workers), nvjpeg (the GPU, with "
                                 "torchvision), auto (default: nvjpeg on CUDA when it can)", choices=I.DECODERS)
    subset: int | None = _field(None, "a fixed class-balanced subset of N training images (default: all)")
    val_size: int = _field(0, "hold out N training images as a validation split, evaluated instead of the test set")
    eval_every: int = _field(1, "evaluate after every k-th epoch and after the last (0: the last only; a test pass "
                             "costs about a third of a training pass per image)")
    max_norm: float | None = _field(MAX_NORM, "PSI-SGD(M)'s overflow safeguard (section 6.2, p. 1135)")
    bn_split: int = _field(1, "BatchNorm statistics over N slices of each batch (what N processes compute without "
                           "SyncBatchNorm, which needs CUDA)")
    amp: str = _field("auto", "mixed precision (autocast): auto = bf16 on CUDA (pass fp16 on GPUs older than "
                      "Ampere), none on the CPU", choices=AMP_MODES)
    channels_last: bool | None = _field(None, "channels-last memory format (default: on for CUDA)")
    compile: bool | None = _field(None, "torch.compile the model, and the step of sgd/psi-sgd/psi-sgdm (default: on "
                                  "for CUDA in one process; refused under torchrun)")
    deterministic: bool = _field(False, "torch's deterministic algorithms: on CUDA a resumed run then equals an "
                                 "uninterrupted one bit for bit (slower; the CPU is deterministic anyway)")
    device: str = _field("cpu", "cpu, cuda, cuda:1, ... (under torchrun: cuda means cuda:$LOCAL_RANK)")
    data_dir: str | None = _field(None, "folder with the dataset (default $PSI_DATA, else ./data)")
    out: str = _field("runs", "folder for run folders")
    progress: bool = _field(True, "progress bar and per-epoch lines (--quiet: none)", cli=False)

    def validate(self) -> None:
        checks = [("dataset", self.dataset, D.DATASETS), ("model", self.model, tuple(MODELS)),
                  ("optimizer", self.optimizer, OPTIMIZERS), ("setting", self.setting, SETTINGS),
                  ("schedule", self.schedule, SCHEDULES),
                  ("amp", self.amp, (*AMP_MODES, None))]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"invalid {name} {value!r}; valid: {', '.join(str(v) for v in valid)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        images = self.dataset in I.IMAGE_DATASETS
        for name in ("image_size", "workers", "decoder"):
            if getattr(self, name) is not None and not images:
                raise ValueError(f"{name} is for the image datasets ({', '.join(I.IMAGE_DATASETS)}), not "
                                 f"{self.dataset} (CIFAR is held on the device at 32x32)")
        if self.image_size is not None and self.image_size < 8:
            raise ValueError(f"image_size must be at least 8 pixels, got {self.image_size}")
        if self.workers is not None and self.workers < 0:
            raise ValueError(f"workers must be >= 0 (0: decode in the training process), got {self.workers}")
        if self.lr_scaling not in ("none", "linear"):
            raise ValueError(f"invalid lr_scaling {self.lr_scaling!r}; valid: none, linear")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: evaluate after the last epoch only), got {self.eval_every}")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.setting == "tuned" and self.lr is None:
            raise ValueError("setting 'tuned' needs --lr (the learning rate the selection chose)")
        if self.omega is not None and (self.optimizer != "sgdg" or self.omega < 0):
            raise ValueError(f"omega is SGDG's orthogonality regularizer (>= 0), not {self.optimizer}'s: {self.omega}")
        try:
            torch.device(self.device)
        except RuntimeError as e:
            raise ValueError(f"invalid device {self.device!r} ({e}); valid: cpu, cuda, cuda:1, ...") from e

    def resolved(self, world: int = 1) -> Config:
        """The config with every 'auto' made concrete for its device kind (and ``world``
        processes: compiling a model that holds SyncBatchNorm is refused, see :func:`run`)."""
        device = torch.device(self.device)
        cuda = device.type == "cuda"
        amp = ("bf16" if cuda else "none") if self.amp == "auto" else (self.amp or "none")
        images = self.dataset in I.IMAGE_DATASETS
        return replace(self, amp=amp, channels_last=cuda if self.channels_last is None else self.channels_last,
                       compile=(cuda and world == 1) if self.compile is None else self.compile,
                       milestones=tuple(self.milestones),
                       image_size=(self.image_size or 224) if images else None,
                       decoder=I.resolve_decoder(self.decoder or "auto", device) if images else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The config a ``config.json`` or a summary's ``config`` holds (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> str:
        r = self.resolved()
        d = {k: v for k, v in asdict(r).items()
             if k not in _NOT_IN_KEY and not (k in _KEY_IF_SET and v in (None, "none"))}
        d["device_kind"] = torch.device(r.device).type  # a CPU and a GPU run never share a folder
        return hashlib.sha1(json.dumps(d, sort_keys=True).encode()).hexdigest()[:8]

    def run_dir(self) -> Path:
        return Path(self.out) / f"{self.dataset}-{self.model}-{self.optimizer}-s{self.seed}-{self.key()}"


def lr_factor(cfg: Config, t: float) -> float:
    """The schedule's multiplier at fractional epoch ``t`` (it is set every step): the paper's steps
    (x0.2 at 30%, 60%, 80% of training: epochs 60/120/160 of 200), cosine or constant, after an
    optional linear warm-up. A milestone that falls inside an epoch (30% of 1 or 3 epochs) takes
    effect at that step, not at an epoch boundary; at whole-epoch milestones the two agree."""
    if cfg.warmup_epochs and t < cfg.warmup_epochs:
        return (t + 1e-9) / cfg.warmup_epochs
    if cfg.schedule == "step":  # round(): 0.6 * 10 must be epoch 6 exactly, not 6.000000000000001
        return cfg.gamma ** sum(t >= round(m * cfg.epochs, 9) for m in cfg.milestones)
    if cfg.schedule == "cosine":
        w = cfg.warmup_epochs
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (t - w) / max(cfg.epochs - w, 1e-9))))
    return 1.0


def optimizer_for(cfg: Config, model: nn.Module, example: Tensor) -> torch.optim.Optimizer:
    """The optimizer ``cfg`` names, under its setting and overrides (one place for the engine and the grid tool)."""
    opt = build_optimizer(cfg.optimizer, model, example, cfg.setting, lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay, rest_lr=cfg.rest_lr, omega=cfg.omega, max_norm=cfg.max_norm)
    if cfg.lr_scaling == "linear":  # every group, the method's and the rest's: the same rate per image as at 128
        for g in opt.param_groups:
            g["lr"] = g["lr"] * cfg.batch_size / LR_REFERENCE_BATCH
    return opt


def set_lr(opt: torch.optim.Optimizer, factor: float) -> None:
    """Every group's ``initial_lr`` times ``factor``; a tensor learning rate (compiled steps) is
    filled in place, so the compiled step sees a new value, not a new constant."""
    for g in opt.param_groups:
        if isinstance(g["lr"], Tensor):
            g["lr"].fill_(g["initial_lr"] * factor)
        else:
            g["lr"] = g["initial_lr"] * factor


# -- files: atomic writes, the run lock, checkpoints -----------------------------------------

_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _temp_file(path: Path) -> tuple[Any, str]:
    """An open binary file beside ``path`` under a name of its own (``<name>.<random>.tmp``), and that name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    return os.fdopen(fd, "wb"), tmp


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable: without it a power cut after ``os.replace`` may bring back
    the old name, or none (POSIX: a rename is in the directory, which has its own fsync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Recording:
    """A file that remembers the OSError its ``write`` raised: ``torch.save`` turns one into a
    RuntimeError that no longer says the disk was full."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _no_space(e: BaseException, f: _Recording | None) -> OSError | None:
    for err in (f.error if f else None, e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
    return None


def _disk_full(path: Path, err: OSError) -> DiskFull:
    return DiskFull(f"no space left for {path} ({err.strerror}). Nothing written before is lost: the previous "
                    f"{path.name} is intact, the partial one removed. Free space in {path.parent} (or give --out "
                    f"a folder on another disk) and run the same command again: it resumes from the last checkpoint.")


def _atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write ``path`` all or nothing: into a temporary file beside it, flushed to the disk, renamed over
    it, the rename made durable. Killed at any point (kill -9, a power cut), the folder holds the old
    file or the new one, never a part (a temporary file may remain: :func:`_clear_stale_temps`).
    A full disk raises :class:`DiskFull` and leaves the old file."""
    f, tmp = _temp_file(path)
    rec = _Recording(f)
    try:
        with f:
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        if (err := _no_space(e, rec)) is not None:
            raise _disk_full(path, err) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` (the metrics): a line torn by a crash or a full disk is dropped on the
    next resume (:func:`_kept_metrics`)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise _disk_full(path, e) from e
        raise


def _clear_stale_temps(out: Path) -> list[Path]:
    """Remove what :func:`_atomic_write`s that were killed left behind (only the lock holder writes here)."""
    stale = sorted(out.glob("*.*.tmp"))
    for t in stale:
        t.unlink(missing_ok=True)
    return stale


def _write_json(path: Path, obj: Any) -> None:
    _atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))


def lock_holder(run_dir: str | os.PathLike) -> dict[str, Any] | None:
    """Who holds ``run_dir``'s lock (``{"pid", "host", "since"}``), or None when no live process does."""
    path = Path(run_dir) / ".lock"
    if not path.is_file():
        return None
    with open(path, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(f.read() or "{}") or {"pid": None, "host": None, "since": None}
            except json.JSONDecodeError:
                return {"pid": None, "host": None, "since": None}
        fcntl.flock(f, fcntl.LOCK_UN)
        return None


def _flock_briefly(f, patience: float = 1.0) -> None:
    """Take ``f``'s exclusive lock, retrying for ``patience`` seconds: :func:`lock_holder` takes it
    for an instant to look, and a run starting in that instant must not be turned away."""
    deadline = time.monotonic() + patience
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


# The run locks this process holds (their file descriptors). A forked child (a DataLoader worker of an
# image-folder run) would share each one's flock and keep the run folder locked after this process
# died: ``kill -9`` then a run again at once was refused for the seconds a worker takes to notice.
_HELD_LOCKS: set[int] = set()


def _drop_inherited_locks() -> None:
    """In a forked child: point each held lock's descriptor at /dev/null (the child's copy of the lock
    goes; the number stays valid for whatever the child's copy of the parent's code does with it)."""
    for fd in list(_HELD_LOCKS):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, fd)
        os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


@contextlib.contextmanager
def _run_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.lock`` (flock: the kernel releases it when the process dies, so no stale locks; not
    inherited by forked children, :data:`_HELD_LOCKS`)."""
    out.mkdir(parents=True, exist_ok=True)
    f = open(out / ".lock", "a+")
    try:
        _flock_briefly(f)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        raise RunLocked(f"{out} is being worked on by another process ({holder}). Nothing was changed. Wait for "
                        f"it to finish (or stop it: running again resumes from its last checkpoint).") from None
    _HELD_LOCKS.add(f.fileno())
    try:
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                            "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
        f.flush()
        yield
    finally:
        _HELD_LOCKS.discard(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def _load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint, every tensor on the CPU, whatever device wrote it or will run it:
    ``load_state_dict`` then puts model and optimizer state where the parameters are, and the
    RNG states stay CPU byte tensors, as ``torch.set_rng_state`` needs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). Delete it to start this "
                           f"run over (metrics.jsonl keeps what was measured), or restore a good copy.") from e


def _restore(ck: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
             device: torch.device, path: Path) -> int:
    """Load a checkpoint's state into the run's objects; return the epoch to start from."""
    kind = ck.get("device_kind", "cpu")
    if kind != device.type:
        raise RuntimeError(f"checkpoint {path} was written by a {kind} run and this run is on {device.type}: their "
                           f"augmentation streams differ, so resuming would not continue the same run. Run it on "
                           f"{kind}, or delete {path.parent} to start it over on {device.type}.")
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        if scaler.is_enabled() and ck.get("scaler"):
            scaler.load_state_dict(ck["scaler"])
    except Exception as e:  # noqa: BLE001
        raise RuntimeError(f"checkpoint {path} does not fit this run ({type(e).__name__}: {e}). Delete it to start "
                           f"this run over (metrics.jsonl keeps what was measured).") from e
    torch.set_rng_state(ck["torch_rng"])
    if device.type == "cuda" and ck.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(ck["cuda_rng"], device)
    return ck["epoch"] + 1


def _checkpoint(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int,
                device: torch.device, cfg: Config, part: _Partial | None = None) -> dict[str, Any]:
    """The state after ``epoch`` (-1: none yet), and ``part``: how far the next epoch got (SIGTERM)."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "device_kind": device.type, "config": asdict(cfg),
            "partial": None if part is None else part.state()}


@dataclass
class _Partial:
    """An epoch under way: its first ``step`` steps done, their summed loss, correct count and images,
    each step's loss (the first non-finite one is named), and the seconds spent. A checkpoint written
    on SIGTERM holds one, so the resumed epoch goes on from the next step with the same numbers."""

    epoch: int
    steps: int
    device: torch.device
    step: int = 0
    loss_sum: Tensor = None  # type: ignore[assignment]
    correct: Tensor = None  # type: ignore[assignment]
    losses: Tensor = None  # type: ignore[assignment]
    seen: int = 0
    seconds: float = 0.0

    def __post_init__(self) -> None:
        def on_device(t: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device) if t is None else t.to(self.device)

        self.loss_sum = on_device(self.loss_sum, torch.float64, ())
        self.correct = on_device(self.correct, torch.long, ())
        self.losses = on_device(self.losses, torch.float32, (self.steps,))

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum, "correct": self.correct,
                "losses": self.losses, "seen": self.seen, "seconds": self.seconds}


# Under torchrun every process must stop at the same step: they agree every STOP_POLL steps (one host
# read each time, in data-parallel runs only; a single process reads its own flag, no device at all).
STOP_POLL = 16


class _Stop:
    """SIGTERM during a run: note it, let the step under way finish, then stop at a step boundary
    (:func:`_train_epoch` asks :meth:`asked`), checkpoint and raise :class:`Preempted`. Installed only
    in the main thread (signals reach no other); the previous handler comes back afterwards."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device, self.received = world, device, False
        self._previous: Any = None

    def __enter__(self) -> _Stop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def asked(self, step: int) -> bool:
        """Whether to stop before ``step`` (the same answer on every process of the run)."""
        if self.world == 1:
            return self.received
        if step % STOP_POLL:
            return False
        flag = torch.tensor([float(self.received)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, without a last line torn by a crash or a full disk (the next
    resume drops it from the file too)."""
    rows = []
    for ln in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(ln))
    return rows


def _kept_metrics(metrics_path: Path, start: int) -> str:
    """The metrics of the epochs before ``start`` (what the checkpoint holds): a row of a later epoch
    (written before a crash or a full disk kept its checkpoint from the disk) goes, and so does a line
    torn by one."""
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    return "".join(json.dumps(r) + "\n" for r in rows if r["epoch"] < start)


def _same_run(record: dict[str, Any]) -> dict[str, Any]:
    """What of a ``config.json`` decides the numbers: the keyed fields (not where or how fast it runs),
    the device kind and every group's hyperparameters."""
    return {k: v for k, v in record.items()
            if k not in (*_NOT_IN_KEY, "world_size", "kernels") and not (k in _KEY_IF_SET and v in (None, "none"))}


def _check_same_config(out: Path, record: dict[str, Any]) -> None:
    """Refuse to resume a checkpoint made under other settings than ``record`` (another version of psi
    with other defaults, a hand edit), naming each key that differs; nothing is changed."""
    path = out / "config.json"
    if not path.is_file():
        return
    try:
        old = _same_run(json.loads(path.read_text()))
    except json.JSONDecodeError:
        return  # torn by a crash before the atomic writes: the checkpoint's own config is checked by the key
    new = _same_run(json.loads(json.dumps(record)))  # as it would read back (tuples as lists)
    diff = sorted(k for k in old.keys() | new.keys() if old.get(k, "<absent>") != new.get(k, "<absent>"))
    if diff:
        what = "; ".join(f"{k}: {json.dumps(old.get(k, '<absent>'))} there, {json.dumps(new.get(k, '<absent>'))} "
                         f"here" for k in diff)
        raise ConfigMismatch(f"{out} holds a checkpoint of a run made with other settings than this one ({what}). "
                             f"Resuming would join two different runs into one, so nothing was changed. Fix: run it "
                             f"with the version and settings that made it, or give another --out (or delete {out}) "
                             f"to train it anew.")


# -- processes and devices -------------------------------------------------------------------

def backend_for(device: torch.device) -> str:
    """The process-group backend for a run on ``device``: NCCL for CUDA tensors, gloo otherwise
    (the run's device decides, not whether the machine has a GPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def _run_device(name: str) -> torch.device:
    """``cuda`` under torchrun means this process's GPU, ``cuda:$LOCAL_RANK``."""
    device = torch.device(name)
    if device.type == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        if device.index is not None:
            raise ValueError(f"--device {name} under torchrun: give --device cuda, each process takes "
                             f"cuda:$LOCAL_RANK")
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def end_process_group() -> None:
    """Destroy the process group if one is live. Every way out of a process that joined one must pass
    here: gloo, left alive at interpreter exit, may abort the process ("terminate called without an
    active exception", SIGABRT) after its work is done. :func:`_init_distributed` registers it with
    atexit; :func:`main` and ``psi.grid work`` call it when they finish."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _init_distributed(device: torch.device) -> tuple[int, int]:
    """(rank, world size); joins torchrun's process group on the first call (and ends it at exit,
    whatever the caller: :func:`end_process_group`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        atexit.register(end_process_group)  # registered again on a later join: a second call is a no-op
        if device.type == "cuda":
            torch.cuda.set_device(device)
            torch.distributed.init_process_group(backend_for(device), device_id=device)
        else:
            torch.distributed.init_process_group(backend_for(device))
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _set_determinism(cfg: Config, device: torch.device) -> None:
    """``--deterministic``: torch's documented switches (reproducibility notes); else cuDNN may
    benchmark and pick the fastest algorithm for each shape."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(cfg.deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cudnn.benchmark = not cfg.deterministic


def _psi_layer_stats(opt: torch.optim.Optimizer, optimizer: str) -> dict[str, dict[str, float]]:
    """Per scale-invariant layer: neuron norm mean/min/max and the effective learning rate
    (:func:`psi.optimizers.effective_lr`, which says why each method gets its rule).
    One host read for all layers (once per epoch)."""
    layers = getattr(opt, "psi_layers", None)
    if layers is None:  # an optimizer built without the side table: per-layer groups carry the name
        layers = {g["name"]: g["params"] for g in opt.param_groups if g.get("psi")}
    if not layers:
        return {}
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    rows = []
    for tensors in layers.values():
        w = tensors[0].detach()
        sq = w.reshape(w.shape[0], -1).square().sum(1).double()
        norms = sq.sqrt()
        lr = float(lr_of[id(tensors[0])])  # a float, or a CPU tensor (compiled steps): no device read
        rows.append(torch.stack([norms.mean(), norms.min(), norms.max(), effective_lr(optimizer, lr, sq)]))
    values = torch.stack(rows).tolist()
    return {name: {"norm_mean": mean, "norm_min": lo, "norm_max": hi, "eff_lr": eff}
            for name, (mean, lo, hi, eff) in zip(layers, values, strict=True)}


@torch.inference_mode()
def evaluate(model: nn.Module, loader: D.BatchLoader | I.ImageLoader, autocast: Callable[[], Any]) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader, accumulated on the device and read once. A loader that
    gives each process a slice (``world > 1``: image folders) is summed over the processes, every one
    evaluating rank 0's model: without SyncBatchNorm (the CPU) each process's BN statistics took their
    last update from its own slice, so rank 0's are sent to all first."""
    sharded = getattr(loader, "world", 1) > 1
    if sharded:
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)
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
    totals = torch.stack([loss, correct.double(), torch.tensor(float(n), device=loader.device, dtype=torch.float64)])
    if sharded:
        torch.distributed.all_reduce(totals)
    loss_value, correct_value, n_value = totals.tolist()
    return loss_value / n_value, correct_value / n_value


# -- one run ---------------------------------------------------------------------------------

def run(cfg: Config, dataset: D.Dataset | None = None) -> dict[str, Any]:
    """Train (or resume, or just read back) the run ``cfg``; returns its summary.

    Raises :class:`RunLocked` when another process works in the run folder (nothing is changed),
    :class:`TrainingDiverged` on a NaN loss (the metrics so far are kept)."""
    cfg.validate()
    device = _run_device(cfg.device)
    rank, world = _init_distributed(device)
    if cfg.compile and world > 1:
        raise ValueError("--compile under torchrun is not supported: the model holds SyncBatchNorm (CUDA) or is "
                         "wrapped by DDP, and torch.compile breaks the graph at every BN layer. Run without "
                         "--compile, or train one run per GPU (python -m psi.grid run --gpus ...).")
    cfg = cfg.resolved(world)
    out = cfg.run_dir()
    if (done := _finished(out, rank, world)) is not None:
        return done
    with _rank0_lock(out, rank, world):
        if world > 1:
            _check_shared_folder(out, rank, world)
        if (done := _finished(out, rank, world)) is not None:  # finished while we waited for the lock
            return done
        return _train(cfg, device, rank, world, out, dataset)


def _finished(out: Path, rank: int, world: int) -> dict[str, Any] | None:
    """The run's summary if it is finished, else None: rank 0 looks and tells the others, so that every
    process takes the same branch (one that looked a moment earlier, before rank 0's summary reached
    the file system, would otherwise train alone and wait in a collective no one else joins)."""
    path = out / "summary.json"
    summary = json.loads(path.read_text()) if rank == 0 and path.is_file() else None
    if world > 1:
        box = [summary]
        torch.distributed.broadcast_object_list(box, src=0)
        summary = box[0]
    return summary


# How long a process of another node keeps looking for rank 0's token in the run folder: NFS may answer
# "no such file" from its cache of a lookup made before rank 0 created the folder (for up to its
# attribute timeout, 30-60 s by default); a node without the shared file system never sees it.
SHARED_FOLDER_PATIENCE = 60.0


def _sees_token(path: Path, token: str, patience: float) -> bool:
    deadline = time.monotonic() + patience
    while True:
        try:
            if json.loads(path.read_text())["token"] == token:
                return True
        except (OSError, ValueError, KeyError):
            pass
        if time.monotonic() >= deadline:
            return False
        with contextlib.suppress(OSError):
            os.listdir(path.parent.parent)  # a fresh lookup of the folders on the way
            os.listdir(path.parent)
        time.sleep(1.0)


def _check_shared_folder(out: Path, rank: int, world: int) -> None:
    """Every process of a data-parallel run reads the run folder (the checkpoint to resume from, the
    metrics for the summary) that rank 0 writes: across machines it must be one shared file system.
    Rank 0 writes a token there; a process that cannot read it back stops them all, with a message."""
    token = f"{os.getpid()}-{time.time_ns()}"
    if rank == 0:
        _write_json(out / ".world", {"token": token, "world_size": world})
    box = [token]
    torch.distributed.broadcast_object_list(box, src=0)
    seen = _sees_token(out / ".world", box[0], patience=0 if rank == 0 else SHARED_FOLDER_PATIENCE)
    views: list[Any] = [None] * world
    torch.distributed.all_gather_object(views, (socket.gethostname(), seen))
    blind = sorted({host for host, ok in views if not ok})
    if blind:
        raise RuntimeError(f"{out} is not the same folder on every machine of this run: the processes on "
                           f"{', '.join(blind)} cannot read what rank 0 writes there. Fix: give --out a folder on a "
                           f"file system that all nodes share (NFS, Lustre, ...).")


@contextlib.contextmanager
def _rank0_lock(out: Path, rank: int, world: int) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for all ranks; every rank learns whether it got it."""
    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(_run_lock(out))
            except RunLocked as e:
                refused = str(e)
        if world > 1:
            box = [refused]
            torch.distributed.broadcast_object_list(box, src=0)
            refused = box[0]
        if refused:
            raise RunLocked(refused)
        yield


def _train(cfg: Config, device: torch.device, rank: int, world: int, out: Path,
           dataset: D.Dataset | None) -> dict[str, Any]:
    _set_determinism(cfg, device)
    torch.manual_seed(cfg.seed)
    ds = dataset or D.load_dataset(cfg.dataset, cfg.data_dir)
    train, evaluation, eval_name = _loaders(cfg, ds, device, rank, world)
    if isinstance(train, I.ImageLoader) and rank == 0 and cfg.progress:
        print(f"{out.name}: {len(train.files)} training images from {ds.source}, decoder {train.decoder}, "
              f"{train.workers} worker(s) per process, {cfg.image_size}px crops", file=sys.stderr)

    model = build_model(cfg.model, ds.num_classes).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if isinstance(train, I.ImageLoader):  # a few images decoded here, not the workers' first batches
        example = train.sample(discovery_examples(cfg.image_size))
    else:
        example = next(iter(train.epoch(0)))[0][:discovery_examples(32)]
    opt = optimizer_for(cfg, model, example)
    # what ran: the config, every group's hyperparameters as the optimizer reads them, the CPU kernels
    record = {**asdict(cfg), "device_kind": device.type, "world_size": world, "groups": describe(opt),
              "kernels": kernels.record()}
    ckpt_path = out / "checkpoint.pt"
    if rank == 0:
        _clear_stale_temps(out)
        if ckpt_path.is_file():
            _check_same_config(out, record)
        _write_json(out / "config.json", record)
    for g in opt.param_groups:
        g["initial_lr"] = g["lr"]
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.amp == "fp16")
    start, resumed = 0, None
    if ckpt_path.is_file():
        ck = _load_checkpoint(ckpt_path)
        start = _restore(ck, model, opt, scaler, device, ckpt_path)
        resumed = ck.get("partial")
        for g in opt.param_groups:  # a compiled run saved a tensor lr; an eager step would read it each step
            g["lr"] = float(g["lr"])
    metrics_path = out / "metrics.jsonl"
    if rank == 0:  # keep exactly the epochs the checkpoint holds
        _atomic_write(metrics_path, lambda f: f.write(_kept_metrics(metrics_path, start).encode()))

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

    def save(epoch: int, part: _Partial | None = None) -> None:
        if rank == 0:
            state = _checkpoint(model, opt, scaler, epoch, device, cfg, part)
            _atomic_write(ckpt_path, lambda f: torch.save(state, f))

    show = cfg.progress and rank == 0 and os.environ.get("PSI_PROGRESS", "1") != "0"
    with _Stop(world, device) as stop:
        for epoch in range(start, cfg.epochs):
            part = _Partial(epoch, len(train), device)
            if resumed is not None and resumed["epoch"] == epoch:  # the sums over the processes go to rank 0
                sums = ("loss_sum", "correct", "losses") if rank else ()
                part = _Partial(epoch, len(train), device, **{k: v for k, v in resumed.items()
                                                              if k != "epoch" and k not in sums})
            t0 = time.perf_counter()
            _train_epoch(cfg, net, opt, step, scaler, train, epoch, autocast, show, out.name, part, stop)
            part.seconds += time.perf_counter() - t0
            if part.step < part.steps:  # SIGTERM: this epoch's steps so far, checkpointed, and out
                for t in (part.loss_sum, part.correct, part.losses) if world > 1 else ():
                    torch.distributed.all_reduce(t)  # what every process has added up, in rank 0's checkpoint
                save(epoch - 1, part)
                raise Preempted(f"{out.name}: stopped by SIGTERM at step {part.step} of {part.steps} in epoch "
                                f"{epoch + 1}; a checkpoint of that step is in {ckpt_path}. Run the same command "
                                f"again to resume from it.")
            row = _epoch_row(cfg, epoch, start, part, rank, world, model, opt, evaluation, eval_name, autocast, out)
            if rank == 0:
                _append_line(metrics_path, json.dumps(row))
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
        _write_json(out / "summary.json", summary)
    return json.loads(json.dumps(summary))  # as it reads back from summary.json


def _epoch_row(cfg: Config, epoch: int, start: int, part: _Partial, rank: int, world: int, model: nn.Module,
               opt: torch.optim.Optimizer, evaluation: D.BatchLoader | I.ImageLoader, eval_name: str,
               autocast: Callable[[], Any], out: Path) -> dict[str, Any]:
    """The metrics row of a finished epoch (its evaluation included); :class:`TrainingDiverged` if its
    loss is not finite, naming the first step whose loss was not (one host read per epoch either way)."""
    loss_sum, correct, seen = part.loss_sum, part.correct, part.seen
    if world > 1:
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(correct)
        seen *= world
    train_loss, train_correct = torch.stack([loss_sum, correct.double()]).tolist()
    train_loss /= seen
    if not math.isfinite(train_loss):
        if world > 1:  # a NaN on any process: the sum is NaN at that step on all
            torch.distributed.all_reduce(part.losses)
        bad = (~torch.isfinite(part.losses)).nonzero()
        at = f" at step {int(bad[0]) + 1} of {part.steps}" if len(bad) else ""
        msg = (f"{out.name}: the training loss became {train_loss}{at} in epoch {epoch + 1}; the checkpoint after "
               f"epoch {epoch} and the metrics of the {epoch} epochs before are kept in {out}. Lower the learning "
               f"rate (now {float(opt.param_groups[0]['initial_lr'])}) or check the data; delete {out} to run it "
               f"again.")
        if rank == 0:
            _write_json(out / "failed.json", {"error": msg, "epoch": epoch, "step": int(bad[0]) if len(bad) else None})
        raise TrainingDiverged(msg)
    last = epoch == cfg.epochs - 1
    # a full test pass costs about a third of a training pass per image: on a CPU with a small
    # training subset it can cost more than the epoch, so eval_every may skip it (rows say null)
    eval_loss = eval_acc = None
    t1 = time.perf_counter()
    if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
        eval_loss, eval_acc = evaluate(model, evaluation, autocast)
    eval_seconds = time.perf_counter() - t1
    return {"epoch": epoch, "lr": lr_factor(cfg, epoch) * float(opt.param_groups[0]["initial_lr"]),
            "train_loss": train_loss, "train_acc": train_correct / seen,
            f"{eval_name}_loss": eval_loss, f"{eval_name}_acc": eval_acc,
            "epoch_seconds": part.seconds, "images_per_second": seen / part.seconds, "eval_seconds": eval_seconds,
            "warmup": epoch == start,  # this process's first epoch: compilation, cuDNN benchmarking
            "psi_layers": _psi_layer_stats(opt, cfg.optimizer)}


def _split(cfg: Config, ds: D.Dataset | I.FileDataset) -> tuple[Tensor, Tensor | None]:
    """Indices of the training images (after ``val_size`` held out and ``subset``) and of the held-out
    validation images (None: the dataset's own test split is evaluated)."""
    train_idx, val_idx = torch.arange(len(ds.train_y)), None
    if cfg.val_size:
        train_idx, val_idx = D.split_validation(ds.train_y, cfg.val_size)
    if cfg.subset:
        train_idx = train_idx[D.balanced_subset(ds.train_y[train_idx], cfg.subset)]
    return train_idx, val_idx


def _loaders(cfg: Config, ds: D.Dataset | I.FileDataset, device: torch.device, rank: int,
             world: int) -> tuple[D.BatchLoader | I.ImageLoader, D.BatchLoader | I.ImageLoader, str]:
    """The training loader (this process's slice) and the evaluation loader (test or validation).
    CIFAR is held on the device whole; image folders stream from disk, each process decoding only its
    slice of every batch, the evaluation's too (:func:`evaluate` sums the slices over the processes)."""
    train_idx, val_idx = _split(cfg, ds)
    eval_name = "test" if val_idx is None else "val"
    if isinstance(ds, I.FileDataset):
        if world > 1:
            _check_same_files(ds, world)
        files = ds.train_files[train_idx.numpy()]
        eval_files, eval_y = (ds.test_files, ds.test_y) if val_idx is None else (ds.train_files[val_idx.numpy()],
                                                                                 ds.train_y[val_idx])
        kw: dict[str, Any] = dict(device=device, channels_last=cfg.channels_last, image_size=cfg.image_size, rank=rank,
                                  world=world, decoder=cfg.decoder or "auto",
                                  workers=default_workers(world) if cfg.workers is None else cfg.workers)
        train = I.ImageLoader(files, ds.train_y[train_idx], ds.mean, ds.std, cfg.batch_size, train=True, seed=cfg.seed,
                              **kw)
        evaluation = I.ImageLoader(eval_files, eval_y, ds.mean, ds.std, max(cfg.batch_size, world), train=False, **kw)
    else:
        eval_x, eval_y = (ds.test_x, ds.test_y) if val_idx is None else (ds.train_x[val_idx], ds.train_y[val_idx])
        device_kw = dict(device=device, channels_last=cfg.channels_last)
        train = D.BatchLoader(ds.train_x[train_idx], ds.train_y[train_idx], ds.mean, ds.std, cfg.batch_size,
                              train=True, seed=cfg.seed, rank=rank, world=world, **device_kw)
        evaluation = D.BatchLoader(eval_x, eval_y, ds.mean, ds.std, EVAL_BATCH, train=False, **device_kw)
    if len(train) == 0:
        raise ValueError(f"{len(train_idx)} training images give no full batch of {cfg.batch_size}")
    return train, evaluation, eval_name


def default_workers(world: int) -> int:
    """Decoding processes per training process: this machine's CPUs (or the share ``psi.grid`` gives
    its worker, ``PSI_WORKER_CPUS``) shared by the processes on it (``LOCAL_WORLD_SIZE`` under
    torchrun), one left for the training process itself, at most 8."""
    # torchrun sets LOCAL_WORLD_SIZE; under srun, SLURM's tasks per node ("8" or "8(x2)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = int(os.environ.get("PSI_WORKER_CPUS", cpus))
    return max(0, min(8, cpus // max(local, 1) - 1))


def _check_same_files(ds: I.FileDataset, world: int) -> None:
    """Every process must list the same images with the same labels (each node may hold its own copy of
    the dataset): a count that differs gives ranks different numbers of steps (DDP then waits forever),
    and other contents give the same index different images. Compared by a digest of the file names
    relative to the dataset's folder, and of the labels."""
    h = hashlib.sha1()
    for files, labels in ((ds.train_files, ds.train_y), (ds.test_files, ds.test_y)):
        h.update("\n".join(os.path.relpath(f, ds.source) for f in files).encode())
        h.update(labels.numpy().tobytes())
    mine = (socket.gethostname(), ds.source, len(ds.train_files), len(ds.test_files), h.hexdigest())
    views: list[Any] = [None] * world
    torch.distributed.all_gather_object(views, mine)
    if len({v[2:] for v in views}) > 1:
        rows = "; ".join(f"rank {r} on {v[0]}: {v[2]} training and {v[3]} evaluation images in {v[1]}"
                         for r, v in enumerate(views))
        raise D.DataError(f"the processes of this run do not see the same dataset ({rows}). Fix: give every node "
                          f"the same copy (or one shared folder) of {ds.name}.")


def _train_epoch(cfg: Config, net: nn.Module, opt: torch.optim.Optimizer, step: Callable[[], Any],
                 scaler: torch.amp.GradScaler, train: D.BatchLoader, epoch: int, autocast: Callable[[], Any],
                 show: bool, name: str, part: _Partial, stop: _Stop) -> None:
    """The steps of one epoch from ``part.step`` on, added up in ``part`` on the device; stops early
    when ``stop`` says so (SIGTERM). Nothing in it reads a value back to the host (tests/test_gpu_path.py
    counts) in one process; a data-parallel run reads one flag every :data:`STOP_POLL` steps."""
    net.train()
    steps = len(train)
    batches = train.epoch(epoch, start=part.step)
    if show:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, initial=part.step, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False)
    for i, (x, y) in enumerate(batches, part.step):
        if stop.asked(i):
            break
        set_lr(opt, lr_factor(cfg, epoch + i / steps))
        with autocast():
            # bn_split > 1: BN statistics per slice, as that many processes without SyncBatchNorm
            logits = net(x) if cfg.bn_split == 1 else torch.cat([net(c) for c in x.chunk(cfg.bn_split)])
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler.is_enabled():  # fp16: GradScaler reads found_inf on the host once per step (torch's design)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            step()
        part.losses[i] = loss.detach()
        part.loss_sum += loss.detach().double() * len(y)
        part.correct += (logits.detach().argmax(1) == y).sum()
        part.seen += len(y)
        part.step = i + 1


def _summary(cfg: Config, device: torch.device, world: int, ds: D.Dataset, metrics_path: Path,
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
            "kernels": kernels.record()}  # what decides the CPU bits (psi.kernels)


def sweep(configs: list[Config], shard: tuple[int, int] = (1, 1), dataset: D.Dataset | None = None,
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


# -- command line ----------------------------------------------------------------------------

_TYPES = {"int": int, "float": float, "str": str}


def _parser() -> argparse.ArgumentParser:
    """The command line, made from :class:`Config`'s fields (help, choices, defaults; ``sweep``
    fields take one or more values), plus what is not a run's: ``--threads``, ``--shard``, ``--quiet``."""
    ap = argparse.ArgumentParser(prog="python -m psi.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind = f.type.removesuffix(" | None")
        kw: dict[str, Any] = {"help": meta["help"], "default": f.default}
        if "choices" in meta:
            kw["choices"] = list(meta["choices"])
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
            kw.update(type=float, nargs="+")
        else:
            kw["type"] = _TYPES[kind]
            if meta.get("sweep"):
                kw.update(nargs="+", default=[f.default])
        ap.add_argument("--" + f.name.replace("_", "-"), **kw)
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--shard", default="1/1", help="k/n: run only the k-th of n slices of the sweep")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    ap.add_argument("--preset", choices=list(PRESETS), help="the paper's schedule for a dataset, as defaults that "
                    "other options override: " + "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in p.items())
                                                          for k, p in PRESETS.items()))
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``ap.parse_args`` with ``--preset``'s values as the defaults (what the command line gives wins)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS))
    known, _ = pre.parse_known_args(argv)
    if known.preset:
        ap.set_defaults(**PRESETS[known.preset])
    return ap.parse_args(argv)


def configs_from_args(a: argparse.Namespace) -> list[Config]:
    """The runs a command line names: every combination of its sweep fields (model x optimizer x seed)."""
    given = {f.name: getattr(a, f.name) for f in fields(Config) if f.metadata.get("cli", True)}
    given["milestones"] = tuple(given["milestones"])
    sweeps = [f.name for f in fields(Config) if f.metadata.get("sweep")]
    return [Config(**{**given, **dict(zip(sweeps, combo, strict=True))}, progress=not a.quiet)
            for combo in itertools.product(*(given[n] for n in sweeps))]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = _parser()
    a = parse_args(ap, argv)
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
    configs = configs_from_args(a)
    try:
        for c in configs:
            c.validate()
        dataset = D.load_dataset(a.dataset, a.data_dir)
        results = sweep(configs, (k, n), dataset)
    except Preempted as e:  # SIGTERM: checkpointed; the scheduler (or the user) runs the same command again
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT) from e
    except (D.DataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    finally:
        end_process_group()
    for r in results if int(os.environ.get("RANK", "0")) == 0 else []:  # under torchrun, rank 0 reports
        if "failed" in r or "locked" in r:
            print(f"error: {r.get('failed') or r['locked']}", file=sys.stderr)
            continue
        acc = {k: v for k, v in r.items() if k.startswith("final_") and k.endswith("_acc")}
        print(json.dumps({"run": Config.from_dict(r["config"]).run_dir().name,
                          **acc, "final_train_loss": r["final_train_loss"]}))
    if any("failed" in r for r in results):
        raise SystemExit(1)
    if any("locked" in r for r in results):
        raise SystemExit(3)
    return results


if __name__ == "__main__":
    main()
