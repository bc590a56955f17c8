"""What both loaders share: the :class:`Dataset` held in memory, :class:`DataError` for a missing or
unreadable copy, the seeds of subsets, validation splits and epochs, the last step of every loader
(:class:`Normalize`), and how a batch is split over processes (:func:`check_batch_split`, :func:`batch_count`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

# split_validation draws its held-out images with seed + this: a permutation of its own, so that they
# are not the images a subset drawn with the same seed from the same labels would pick
# (balanced_subset(y, n, seed): both take each class's first images in their seed's permutation).
VALIDATION_SEED_OFFSET = 1000


# BatchLoader seeds epoch e's generator with seed * EPOCH_SEED_STRIDE + e: one stream per (seed, epoch),
# distinct for every pair while epochs stay below the stride (a prime, far above any schedule's
# epochs), and a function of the pair alone, so that a resumed run draws the batches it would have.
EPOCH_SEED_STRIDE = 100003


class DataError(RuntimeError):
    """The dataset is missing or unreadable; the message says where we looked and what to do."""


@dataclass
class Dataset:
    """Images as uint8 (N, 3, 32, 32) tensors, labels as int64, and where they came from."""

    name: str
    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...]
    source: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    return Path(data_dir or os.environ.get("PSI_DATA") or "data").expanduser()


def balanced_subset(y: Tensor, n: int, seed: int = 0) -> Tensor:
    """Indices of ``n`` training images, the same number per class (fixed by ``seed``)."""
    classes = int(y.max()) + 1
    if n % classes or n <= 0:
        raise ValueError(f"subset size {n} must be a positive multiple of the number of classes ({classes})")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    picks = []
    for c in range(classes):
        idx = perm[y[perm] == c][: n // classes]
        if len(idx) < n // classes:
            raise ValueError(f"class {c} has only {len(idx)} images, {n // classes} asked for")
        picks.append(idx)
    return torch.cat(picks).sort().values


def split_validation(y: Tensor, n_val: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """(train indices, validation indices): a class-balanced held-out part of the training images."""
    val = balanced_subset(y, n_val, seed=seed + VALIDATION_SEED_OFFSET)
    mask = torch.ones(len(y), dtype=torch.bool)
    mask[val] = False
    return mask.nonzero().squeeze(1), val


class Normalize:
    """uint8-scale images to ``(x - mean) / std`` per channel, in ``dtype`` and, with ``channels_last``,
    that memory format: the last step of every loader (CIFAR's here, image folders' in psi.engine.images)."""

    def __init__(self, mean, std, device: torch.device, dtype: torch.dtype, channels_last: bool) -> None:
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.dtype, self.channels_last = dtype, channels_last

    def __call__(self, x: Tensor) -> Tensor:
        x = (x.to(self.dtype) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def check_batch_split(batch_size: int, world: int) -> None:
    """Every process of a data-parallel run takes an equal slice of each batch: refuse a batch that does not split."""
    if batch_size % world:
        raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world}")


def batch_count(n: int, batch_size: int, drop_last: bool) -> int:
    """Batches in an epoch of ``n`` images: the full ones, and the last short one unless ``drop_last``."""
    return n // batch_size if drop_last else -(-n // batch_size)
