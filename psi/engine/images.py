"""Image-folder datasets and ILSVRC-2012 (ImageNet), streamed from disk and decoded in workers.

Two names, one layout idea (``DIR`` from ``--data-dir``, else ``$PSI_DATA``, else ``./data``):

- ``imagefolder``: any tree ``DIR/train/<class>/*`` and ``DIR/val/<class>/*`` (``test/`` when
  there is no ``val/``) of JPEG or PNG files; classes are the sorted folder names of ``train``.
- ``imagenet``: ILSVRC-2012 as users have it: ``DIR/train/<wnid>/*.JPEG`` (``DIR`` may also hold it
  one level down, e.g. ``DIR/imagenet/``), and the validation images either in class folders
  ``DIR/val/<wnid>/`` or flat in ``DIR/val/`` with the official labels: the devkit
  (``ILSVRC2012_devkit_t12/`` or its ``.tar.gz``: ``data/ILSVRC2012_validation_ground_truth.txt``
  read through ``data/meta.mat``) or Kaggle's ``LOC_val_solution.csv``.

The evaluation split is the dataset's ``val`` split, which plays the test set's role (the paper
reports ImageNet's validation accuracy as its test accuracy); a run's ``--val-size`` holds out
training images instead, as for CIFAR.

Transforms are the standard ones (torchvision's reference recipe, written here on PIL so that the
project needs no torchvision): training, a random resized crop (scale 0.08-1, ratio 3/4-4/3) to
``image_size`` and a horizontal flip with probability 1/2; evaluation, the shorter side resized to
``image_size / 0.875`` (256 for 224) and a centre crop. JPEGs are decoded with PIL's ``draft``
(the decoder's own 1/2, 1/4, 1/8 downscaling, never below the crop's resolution): it pays only for
images at least twice the crop's size (measured on 500x375 JPEGs at 224: 0.9-1.25x, ``python -m
psi.bench loader``), and costs nothing otherwise. Every image's randomness is
a function of ``(seed, epoch, image index)`` alone, so a batch is the same whichever worker
decodes it, a resumed run sees the batches it would have, and the processes of a data-parallel
run together see exactly the batches of one process.

Decoders (``decoder=``): ``pil`` decodes in ``workers`` processes, batches pinned for a fast copy
to a GPU; ``nvjpeg`` (CUDA, when torchvision is installed) reads the files in workers and decodes
the JPEGs on the GPU with ``torchvision.io.decode_jpeg(device=...)``, then crops and resizes there;
``auto`` takes ``nvjpeg`` when it can and says which it took (``ImageLoader.decoder``).
"""

from __future__ import annotations

import csv
import io
import os
import re
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from psi.engine.dataset import DataError

__all__ = ["FileDataset", "load_image_folder", "IMAGE_DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "EXTENSIONS"]

IMAGE_DATASETS = ("imagefolder", "imagenet")
EXTENSIONS = (".jpg", ".jpeg", ".png")
# ImageNet's per-channel statistics (0-255 scale), the usual ones for any natural-image folder too
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
_WNID = re.compile(r"^n\d{8}$")


@dataclass
class FileDataset:
    """File paths and labels of an image dataset (the images stay on disk)."""

    name: str
    train_files: np.ndarray  # str paths
    train_y: Tensor
    test_files: np.ndarray
    test_y: Tensor
    classes: tuple[str, ...]
    source: str
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def _images_in(folder: Path) -> list[str]:
    with os.scandir(folder) as it:
        return sorted(e.path for e in it if e.is_file() and e.name.lower().endswith(EXTENSIONS))


def _class_tree(split: Path, what: str) -> tuple[list[str], dict[str, list[str]]]:
    classes = sorted(e.name for e in os.scandir(split) if e.is_dir())
    if not classes:
        raise DataError(f"{what}: {split} has no class folders. Fix: put the images in {split}/<class>/*.jpg "
                        f"(one folder per class).")
    files = {c: _images_in(split / c) for c in classes}
    empty = [c for c, fs in files.items() if not fs]
    if empty:
        shown = ", ".join(empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5 else "")
        raise DataError(f"{what}: class folder(s) with no {'/'.join(EXTENSIONS)} image in {split}: {shown}. Fix: "
                        f"add their images, or remove the empty folders.")
    return classes, files


def _labelled(classes: list[str], files: dict[str, list[str]], index: dict[str, int]) -> tuple[np.ndarray, Tensor]:
    paths = [p for c in classes for p in files[c]]
    labels = [index[c] for c in classes for _ in files[c]]
    return np.array(paths), torch.tensor(labels, dtype=torch.long)


def _find_root(root: Path, name: str) -> Path:
    """``root`` itself when it holds ``train/``, else its one subfolder that does."""
    if (root / "train").is_dir():
        return root
    if root.is_dir():
        for d in sorted(root.iterdir()):
            if d.is_dir() and (d / "train").is_dir() and not (name == "imagenet" and not _looks_imagenet(d / "train")):
                return d
    layout = ("DIR/train/<wnid>/*.JPEG and DIR/val/<wnid>/*.JPEG (or DIR/val/*.JPEG with the devkit or "
              "LOC_val_solution.csv)") if name == "imagenet" else "DIR/train/<class>/* and DIR/val/<class>/*"
    what = "does not exist" if not root.exists() else "has no train/ split (nor a subfolder holding one)"
    raise DataError(f"{name}: {root} {what}. Expected {layout}. Fix: pass --data-dir DIR (or set PSI_DATA=DIR) to "
                    f"the folder that holds train/.")


def _looks_imagenet(train: Path) -> bool:
    return any(_WNID.match(e.name) for e in os.scandir(train) if e.is_dir())


def load_image_folder(name: str, data_dir: str | os.PathLike | None = None) -> FileDataset:
    """The file lists of ``name`` (``imagefolder`` or ``imagenet``) under ``data_dir``; see the module docstring."""
    if name not in IMAGE_DATASETS:
        raise ValueError(f"unknown image dataset {name!r}; valid: {', '.join(IMAGE_DATASETS)}")
    root = _find_root(Path(data_dir or os.environ.get("PSI_DATA") or "data").expanduser(), name)
    classes, train = _class_tree(root / "train", f"{name} train split")
    index = {c: i for i, c in enumerate(classes)}
    if name == "imagenet":
        bad = [c for c in classes if not _WNID.match(c)]
        if bad:
            raise DataError(f"imagenet: {root / 'train'} holds folders that are not WordNet ids (n########): "
                            f"{', '.join(bad[:5])}. Fix: use --dataset imagefolder for other class names.")
        if len(classes) != 1000:
            print(f"note: imagenet: {len(classes)} classes in {root / 'train'}, not ILSVRC-2012's 1000",
                  file=sys.stderr)
    train_files, train_y = _labelled(classes, train, index)
    test_files, test_y = _eval_split(name, root, classes, index)
    return FileDataset(name, train_files, train_y, test_files, test_y, tuple(classes), str(root))


def _eval_split(name: str, root: Path, classes: list[str], index: dict[str, int]) -> tuple[np.ndarray, Tensor]:
    split = root / "val" if (root / "val").is_dir() else root / "test"
    if not split.is_dir():
        raise DataError(f"{name}: {root} has train/ but no val/ (nor test/) split. Fix: put the evaluation images in "
                        f"{root}/val/<class>/* (ImageNet: or flat in {root}/val/ with the devkit or "
                        f"LOC_val_solution.csv beside it).")
    has_classes = any(e.is_dir() for e in os.scandir(split))
    if has_classes:
        val_classes, files = _class_tree(split, f"{name} {split.name} split")
        unknown = sorted(set(val_classes) - set(classes))
        if unknown:
            raise DataError(f"{name}: {split} has class folders that train/ lacks: {', '.join(unknown[:5])}. Fix: "
                            f"the two splits must name the same classes.")
        return _labelled(val_classes, files, index)
    if name != "imagenet":
        raise DataError(f"{name}: {split} holds no class folders. Fix: put its images in {split}/<class>/*.")
    flat = _images_in(split)
    if not flat:
        raise DataError(f"imagenet: {split} holds neither class folders nor images.")
    wnid_of = _imagenet_val_labels(root, split)
    missing = [p for p in flat if Path(p).stem not in wnid_of]
    if missing:
        raise DataError(f"imagenet: {len(missing)} validation images have no label in the label file (first: "
                        f"{missing[0]}). Fix: use the label file of ILSVRC-2012's validation set.")
    unknown = sorted({wnid_of[Path(p).stem] for p in flat} - set(classes))
    if unknown:
        raise DataError(f"imagenet: the validation labels name classes train/ lacks: {', '.join(unknown[:5])}.")
    return np.array(flat), torch.tensor([index[wnid_of[Path(p).stem]] for p in flat], dtype=torch.long)


def _imagenet_val_labels(root: Path, split: Path) -> dict[str, str]:
    """{image stem: wnid} from Kaggle's LOC_val_solution.csv or the official devkit (folder or .tar.gz)."""
    for folder in (root, split, root.parent):
        csv_path = folder / "LOC_val_solution.csv"
        if csv_path.is_file():
            with open(csv_path, newline="") as f:
                return {row["ImageId"]: row["PredictionString"].split()[0] for row in csv.DictReader(f)}
        devkit = folder / "ILSVRC2012_devkit_t12"
        if devkit.is_dir():
            return _devkit_labels((devkit / "data" / "meta.mat").read_bytes(),
                                  (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").read_text(), split)
        archive = folder / "ILSVRC2012_devkit_t12.tar.gz"
        if archive.is_file():
            with tarfile.open(archive) as tar:
                meta = tar.extractfile("ILSVRC2012_devkit_t12/data/meta.mat").read()
                truth = tar.extractfile("ILSVRC2012_devkit_t12/data/ILSVRC2012_validation_ground_truth.txt").read()
            return _devkit_labels(meta, truth.decode(), split)
    raise DataError(f"imagenet: the validation images lie flat in {split}, and no label file was found. Fix: put "
                    f"ILSVRC2012_devkit_t12.tar.gz (or the extracted ILSVRC2012_devkit_t12/) or Kaggle's "
                    f"LOC_val_solution.csv in {root}, or sort the images into {split}/<wnid>/ folders.")


def _devkit_labels(meta_mat: bytes, truth: str, split: Path) -> dict[str, str]:
    """The devkit's labels are ILSVRC2012_IDs in file-name order; meta.mat maps each id to its wnid."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0}
    ids = [int(v) for v in truth.split()]
    return {f"ILSVRC2012_val_{i + 1:08d}": wnid[v] for i, v in enumerate(ids)}


