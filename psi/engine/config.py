"""What defines a run: :class:`Config` (each field with its command-line help), its key (the run
folder's name), the paper's presets, the learning-rate schedule (:func:`lr_factor`, :func:`set_lr`) and the
optimizer a config names (:func:`optimizer_for`)."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from psi.core.psisgd import MAX_NORM
from psi.engine.imageloader import DECODERS, resolve_decoder
from psi.engine.images import IMAGE_DATASETS
from psi.engine.loaders import DATASETS
from psi.engine.models import MODELS
from psi.engine.optimizers import OPTIMIZERS, SETTINGS, build_optimizer

SCHEDULES = ("step", "cosine", "constant")


AMP_MODES = ("auto", "none", "bf16", "fp16")


# Optimizers whose step is compiled when the model is: their steps trace to one graph with a tensor
# learning rate (tested on the CPU). Adam's foreach step refuses a tensor learning rate unless its
# state is capturable (which a resume does not restore reliably), SGDG's has not been checked under
# the compiler, and SGDP's reads values on the host: those run eager.
COMPILED_STEP = ("sgd", "psi-sgd", "psi-sgdm")


# not in the run's key: where it runs and how fast, not what it computes (the device *kind* is)
# nor how often it is evaluated: training never reads the evaluation, so the run is the same
NOT_IN_KEY = ("data_dir", "out", "progress", "device", "compile", "channels_last", "deterministic", "eval_every",
               "workers")


# in the key only when set: fields added after runs were made, None or "none" for every CIFAR run,
# so that those runs keep their folders
KEY_IF_SET = ("image_size", "decoder", "lr_scaling")


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


def _field(default: Any, help: str, **cli: Any) -> Any:
    """A :class:`Config` field and its command line: ``help`` and argparse's ``choices``, ``sweep``
    (one or more values: a sweep), ``cli=False`` (not an option)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass
class Config:
    """Everything that defines a run. ``setting`` names the paper's conditions (``table1``: no
    regularizer; ``table2``: L2 / SGDG's orthogonality term; ``tuned``: table1's with a selected
    ``lr``; see :mod:`psi.engine.optimizers`); ``lr=None`` etc. take the setting's value; ``amp``,
    ``channels_last`` and ``compile`` left at auto take the device's best (see :meth:`resolved`).
    Each field's help is its command-line option's (:func:`_parser` is made from these)."""

    dataset: str = _field("cifar10", "the dataset", choices=DATASETS)
    model: str = _field("resnet20", "the network (one or more: a sweep)", choices=tuple(MODELS), sweep=True)
    optimizer: str = _field("psi-sgdm", "the method (one or more: a sweep)", choices=OPTIMIZERS, sweep=True)
    setting: str = _field("table1", "table1: no regularizer (Table 1); table2: L2 5e-4 in the loss, SGDG's "
                          "orthogonality omega 0.1 (supplement Table 2); tuned: table1 with the --lr a selection "
                          "chose (psi.engine.optimizers says where every value comes from)", choices=SETTINGS)
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
                                 "torchvision), auto (default: nvjpeg on CUDA when it can)", choices=DECODERS)
    subset: int | None = _field(None, "a fixed class-balanced subset of N training images (default: all)")
    val_size: int = _field(0, "hold out N training images as a validation split, evaluated instead of the test set")
    eval_every: int = _field(1, "evaluate after every k-th epoch and after the last (0: the last only; a test pass "
                             "costs about a third of a training pass per image)")
    max_norm: float | None = _field(MAX_NORM, "PSI-SGD(M)'s overflow safeguard (section 6.2, p. 1135)")
    bn_split: int = _field(1, "BatchNorm statistics over N slices of each batch (what N processes compute without "
                           "SyncBatchNorm, which needs CUDA)")
    amp: str = _field("auto", "mixed precision (autocast): auto = bf16 on CUDA (pass fp16 on GPUs older than "
                      "Ampere), none on the CPU; none is strict fp32 (on CUDA: TF32 off for convolutions and "
                      "matmuls)", choices=AMP_MODES)
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
        checks = [("dataset", self.dataset, DATASETS), ("model", self.model, tuple(MODELS)),
                  ("optimizer", self.optimizer, OPTIMIZERS), ("setting", self.setting, SETTINGS),
                  ("schedule", self.schedule, SCHEDULES),
                  ("amp", self.amp, (*AMP_MODES, None))]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"invalid {name} {value!r}; valid: {', '.join(str(v) for v in valid)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        images = self.dataset in IMAGE_DATASETS
        for name in ("image_size", "workers", "decoder"):
            if getattr(self, name) is not None and not images:
                raise ValueError(f"{name} is for the image datasets ({', '.join(IMAGE_DATASETS)}), not "
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
        images = self.dataset in IMAGE_DATASETS
        return replace(self, amp=amp, channels_last=cuda if self.channels_last is None else self.channels_last,
                       compile=(cuda and world == 1) if self.compile is None else self.compile,
                       milestones=tuple(self.milestones),
                       image_size=(self.image_size or 224) if images else None,
                       decoder=resolve_decoder(self.decoder or "auto", device) if images else None)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The config a ``config.json`` or a summary's ``config`` holds (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def key(self) -> str:
        r = self.resolved()
        d = {k: v for k, v in asdict(r).items()
             if k not in NOT_IN_KEY and not (k in KEY_IF_SET and v in (None, "none"))}
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
