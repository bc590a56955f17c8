"""The one entry point to every dataset: CIFAR and synthetic held in memory (:mod:`psi.engine.cifar`),
image folders and ImageNet streamed from disk (:mod:`psi.engine.images`). Only this module imports both."""

from __future__ import annotations

import os

from psi.engine.cifar import load_cifar, synthetic
from psi.engine.dataset import Dataset
from psi.engine.images import IMAGE_DATASETS, FileDataset, load_image_folder

__all__ = ["DATASETS", "load_dataset"]

DATASETS = ("cifar10", "cifar100", "synthetic", *IMAGE_DATASETS)


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 cache_dir: str | os.PathLike | None = None) -> Dataset | FileDataset:
    """``name`` (one of :data:`DATASETS`): CIFAR as :func:`psi.engine.cifar.load_cifar` finds it, the
    synthetic set made on the spot, or an image folder's file lists (:func:`psi.engine.images.load_image_folder`:
    the images stay on disk). ``data_dir`` defaults to ``$PSI_DATA``, else ``./data``."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASETS)}")
    if name == "synthetic":
        return synthetic()
    if name in IMAGE_DATASETS:
        return load_image_folder(name, data_dir)
    return load_cifar(name, data_dir, download=download, cache_dir=cache_dir)
