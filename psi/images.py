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
import functools
import io
import math
import multiprocessing
import os
import re
import sys
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .data import EPOCH_SEED_STRIDE, DataError, Normalize

__all__ = ["FileDataset", "load_image_folder", "ImageLoader", "resolve_decoder", "IMAGE_DATASETS", "IMAGENET_MEAN",
           "IMAGENET_STD", "EXTENSIONS", "DECODERS", "train_box", "eval_box"]

IMAGE_DATASETS = ("imagefolder", "imagenet")
DECODERS = ("auto", "pil", "nvjpeg")
EXTENSIONS = (".jpg", ".jpeg", ".png")
# ImageNet's per-channel statistics (0-255 scale), the usual ones for any natural-image folder too
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)
CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
EVAL_CROP_FRACTION = 0.875  # 224 of 256
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


# -- finding the files -------------------------------------------------------------------------

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


# -- transforms: boxes drawn from (seed, epoch, index), applied by PIL or on the GPU -----------

def _rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, epoch, index])


def train_box(width: int, height: int, rng: np.random.Generator) -> tuple[tuple[int, int, int, int], bool]:
    """A random resized crop's box (left, top, right, bottom) and a flip: torchvision's rule (10 tries
    at scale 0.08-1 and log-uniform ratio 3/4-4/3, else the centre crop at the clamped ratio)."""
    area = width * height
    log_ratio = (math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]))
    for _ in range(10):
        target = area * rng.uniform(*CROP_SCALE)
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return (left, top, left + w, top + h), bool(rng.random() < 0.5)
    ratio = width / height
    if ratio < CROP_RATIO[0]:
        w, h = width, round(width / CROP_RATIO[0])
    elif ratio > CROP_RATIO[1]:
        w, h = round(height * CROP_RATIO[1]), height
    else:
        w, h = width, height
    left, top = (width - w) // 2, (height - h) // 2
    return (left, top, left + w, top + h), bool(rng.random() < 0.5)


def eval_box(width: int, height: int, size: int) -> tuple[float, float, float, float]:
    """The centre crop of the image resized to shorter side ``size / 0.875``, in the image's coordinates."""
    side = min(width, height) * EVAL_CROP_FRACTION
    left, top = (width - side) / 2, (height - side) / 2
    return left, top, left + side, top + side


def _decode_pil(path: str, box_of: Callable[[int, int], tuple], size: int, draft: bool = True) -> np.ndarray:
    """Open, draft-decode and crop-resize (and flip) one image with PIL; (size, size, 3) uint8."""
    from PIL import Image

    with Image.open(path) as img:
        width, height = img.size
        box, flip = box_of(width, height)
        if draft and img.format == "JPEG":  # decode at 1/2, 1/4 or 1/8 when the crop keeps at least `size` pixels
            bw, bh = box[2] - box[0], box[3] - box[1]
            img.draft("RGB", (math.ceil(width * size / bw), math.ceil(height * size / bh)))
            fx, fy = img.size[0] / width, img.size[1] / height
            box = (box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy)
        out = img.convert("RGB").resize((size, size), Image.BILINEAR, box=box)
        if flip:
            out = out.transpose(Image.FLIP_LEFT_RIGHT)
        return np.asarray(out)


class _Batches(torch.utils.data.Dataset):
    """Item ``b`` is batch ``b`` of one epoch, decoded (pil) or read as bytes with its boxes (nvjpeg)."""

    def __init__(self, files: np.ndarray, labels: Tensor, batches: list[Tensor], *, train: bool, seed: int,
                 epoch: int, size: int, raw: bool, draft: bool = True) -> None:
        self.files, self.labels, self.batches = files, labels, batches
        self.train, self.seed, self.epoch, self.size, self.raw, self.draft = train, seed, epoch, size, raw, draft

    def __len__(self) -> int:
        return len(self.batches)

    def _box_of(self, i: int):
        if self.train:
            return lambda w, h: train_box(w, h, _rng(self.seed, self.epoch, i))
        return lambda w, h: (eval_box(w, h, self.size), False)

    def __getitem__(self, b: int):
        idx = self.batches[b].tolist()
        y = self.labels[self.batches[b]]
        if not self.raw:
            x = np.stack([_decode_pil(self.files[i], self._box_of(i), self.size, self.draft) for i in idx])
            return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y
        return self._raw(idx) + (y,)

    def _raw(self, idx: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """nvjpeg's item: the batch's JPEG files as one byte buffer with their lengths (one shared-memory
        tensor per batch, not one file descriptor per image), their boxes and flips; every other image
        (a PNG, a CMYK or other non-RGB JPEG, which nvjpeg would reject or miscolour) is decoded and
        cropped here by PIL, ``done`` (N, 3, size, size), and ``on_gpu`` says which are which."""
        from PIL import Image

        blobs, boxes, flips, on_gpu, done = [], [], [], [], []
        for i in idx:
            with Image.open(self.files[i]) as img:  # the header only: the size, for the box, and the format
                jpeg = img.format == "JPEG" and img.mode in ("RGB", "L")
                size = img.size
            on_gpu.append(jpeg)
            if jpeg:
                box, flip = self._box_of(i)(*size)
                blobs.append(Path(self.files[i]).read_bytes())
                boxes.append(box)
                flips.append(flip)
            else:
                done.append(torch.from_numpy(_decode_pil(self.files[i], self._box_of(i), self.size, self.draft)))
        joined = b"".join(blobs)
        data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        lengths = torch.tensor([len(b) for b in blobs], dtype=torch.long)
        side = self.size
        decoded = (torch.stack(done).permute(0, 3, 1, 2).contiguous() if done
                   else torch.empty(0, 3, side, side, dtype=torch.uint8))
        return (data, lengths, torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                torch.tensor(flips, dtype=torch.bool), torch.tensor(on_gpu, dtype=torch.bool), decoded)


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers decode with PIL; torch's threads would only compete


@functools.cache
def _worker_context() -> multiprocessing.context.BaseContext:
    """Where the decoding workers come from: a fork server, a clean single-threaded process started
    once, this module loaded in it. Forking the training process itself, which runs threads (gloo's,
    torch's), deadlocked a worker now and then inside CPython's after-fork code (a lock another thread
    held at the fork; seen under torchrun in about 1 of 10 runs on a loaded machine)."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload([__name__])
    return ctx


@functools.cache
def _torchvision_decoder() -> Callable[[list[Tensor], torch.device], list[Tensor]] | None:
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except Exception:  # noqa: BLE001 - not installed, or built against another torch: no GPU decoder
        return None

    def decode(data: list[Tensor], device: torch.device) -> list[Tensor]:
        return decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return decode


def resolve_decoder(decoder: str, device: torch.device) -> str:
    """``auto``: ``nvjpeg`` on CUDA when torchvision's GPU decoder is installed, else ``pil``. Asking for
    ``nvjpeg`` where it cannot run is an error that says why. (Under nvjpeg, the files it cannot take,
    PNGs and non-RGB JPEGs, are decoded by PIL in the workers.)"""
    if decoder not in DECODERS:
        raise ValueError(f"invalid decoder {decoder!r}; valid: {', '.join(DECODERS)}")
    why = ("it needs a CUDA device" if device.type != "cuda" else
           "torchvision (torchvision.io.decode_jpeg) is not installed" if _torchvision_decoder() is None else None)
    if decoder == "nvjpeg" and why:
        raise ValueError(f"decoder nvjpeg: {why}. Use --decoder pil (or auto).")
    if decoder == "auto":
        return "pil" if why else "nvjpeg"
    return decoder


class ImageLoader:
    """Batches of an image dataset streamed from disk, with :class:`psi.data.BatchLoader`'s interface
    (``len``, ``epoch(e)``, ``device``): normalised images on ``device`` and int64 labels.

    ``rank``/``world``: each process loads and decodes only its slice of every batch. ``decode``
    replaces the GPU decoder (a function ``(list of byte tensors, device) -> list of (3, H, W)
    uint8 tensors``): the tests run the nvjpeg path on the CPU with a PIL stand-in. ``draft=False``
    decodes every JPEG at full resolution (as torchvision's PIL pipeline does; slower, for comparison)."""

    def __init__(self, files: np.ndarray, labels: Tensor, mean, std, batch_size: int, *, train: bool, seed: int = 0,
                 image_size: int = 224, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool | None = None, rank: int = 0, world: int = 1,
                 workers: int = 0, decoder: str = "auto",
                 decode: Callable[[list[Tensor], torch.device], list[Tensor]] | None = None,
                 draft: bool = True) -> None:
        self.device = torch.device(device)
        self.files, self.labels = files, labels
        self.batch_size, self.train, self.seed, self.image_size = batch_size, train, seed, image_size
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world, self.workers, self.draft = rank, world, workers, draft
        self.decoder = decoder if decode is not None else resolve_decoder(decoder, self.device)
        # nvjpeg on CUDA: decoding and cropping run on a stream of their own (see _on_device)
        self._stream = torch.cuda.Stream(self.device) if self.decoder == "nvjpeg" and self.device.type == "cuda" \
            else None
        self._decode = decode or (_torchvision_decoder() if self.decoder == "nvjpeg" else None)
        self._normalize = Normalize(mean, std, self.device, dtype, channels_last)
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} must be divisible by the number of processes {world}")

    def __len__(self) -> int:
        n = len(self.files)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _slices(self, epoch: int) -> list[Tensor]:
        """This process's indices of every batch of ``epoch`` (a seeded permutation when training)."""
        n = len(self.files)
        g = torch.Generator().manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
        order = torch.randperm(n, generator=g) if self.train else torch.arange(n)
        out = []
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            per = -(-len(idx) // self.world)  # the last evaluation batch may be short: ranks split what there is
            out.append(idx[self.rank * per:(self.rank + 1) * per])
        return out

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor]]:
        """Yield (images, labels) of one epoch, this process's slice of each batch, from batch ``start``
        on (each image's augmentation depends on the seed, the epoch and its index only)."""
        slices = [s for s in self._slices(epoch)[start:] if len(s)]
        raw = self.decoder == "nvjpeg"
        items = _Batches(self.files, self.labels, slices, train=self.train, seed=self.seed, epoch=epoch,
                         size=self.image_size, raw=raw, draft=self.draft)
        loader = torch.utils.data.DataLoader(
            items, batch_size=None, shuffle=False, num_workers=self.workers, worker_init_fn=_worker_init,
            multiprocessing_context=_worker_context() if self.workers else None,
            pin_memory=self.device.type == "cuda" and not raw, prefetch_factor=4 if self.workers else None)
        for item in loader:
            if raw:
                x, y = self._on_device(*item)
            else:
                x, y = item
            x = x.to(self.device, non_blocking=True)
            yield self._normalize(x), y.to(self.device, non_blocking=True)

    def _on_device(self, data: Tensor, lengths: Tensor, boxes: Tensor, flips: Tensor, on_gpu: Tensor,
                   decoded: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """nvjpeg: decode the batch's JPEGs on the device, then crop, resize (bilinear, antialiased, as
        PIL does; the crop at whole pixels, within a pixel of PIL's box) and flip each one there; the
        images PIL decoded in the worker join them in batch order.

        On CUDA this runs on the loader's own stream, after waiting for that stream's previous batch:
        torchvision's decoder writes its outputs from a stream that does not wait for the caller's, so
        on the training stream it could be handed memory the last, still queued, training step reads
        (pytorch/vision#9606). The training stream then waits for this one, and the batch is marked
        as used there."""
        if self._stream is None:
            return self._crop_all(data, lengths, boxes, flips, on_gpu, decoded), y
        self._stream.synchronize()  # its previous batch is done: memory freed on it is free for nvjpeg
        with torch.cuda.stream(self._stream):
            x = self._crop_all(data, lengths, boxes, flips, on_gpu, decoded)
        main = torch.cuda.current_stream(self.device)
        main.wait_stream(self._stream)
        x.record_stream(main)
        return x, y

    def _crop_all(self, data: Tensor, lengths: Tensor, boxes: Tensor, flips: Tensor, on_gpu: Tensor,
                  decoded: Tensor) -> Tensor:
        blobs = list(data.split(lengths.tolist())) if len(lengths) else []
        try:
            images = self._decode(blobs, self.device) if blobs else []
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:  # a JPEG the GPU decoder refuses: the others on the GPU, that one by PIL
            images = [self._decode_one(d) for d in blobs]
        crops = iter(self._crop(img, box, flip) for img, box, flip in zip(images, boxes.tolist(), flips.tolist(),
                                                                          strict=True))
        cpu = iter(decoded.to(self.device, non_blocking=True))
        return torch.stack([next(crops) if g else next(cpu) for g in on_gpu.tolist()])

    def _crop(self, img: Tensor, box: list[float], flip: bool) -> Tensor:
        left, top, right, bottom = box
        crop = img[:, int(top):max(int(top) + 1, round(bottom)), int(left):max(int(left) + 1, round(right))]
        crop = F.interpolate(crop[None].float(), size=(self.image_size,) * 2, mode="bilinear", antialias=True,
                             align_corners=False)[0]
        return (crop.flip(2) if flip else crop).round_().clamp_(0, 255).to(torch.uint8)

    def _decode_one(self, data: Tensor) -> Tensor:
        try:
            return self._decode([data], self.device)[0]
        except torch.OutOfMemoryError:
            raise
        except RuntimeError:
            from PIL import Image

            img = np.array(Image.open(io.BytesIO(data.numpy().tobytes())).convert("RGB"))
            return torch.from_numpy(img).permute(2, 0, 1).to(self.device)

    def sample(self, n: int) -> Tensor:
        """The first ``n`` images of epoch 0's first batch (this process's slice), decoded in this
        process: an example batch (for discovery) without starting the workers."""
        items = _Batches(self.files, self.labels, [self._slices(0)[0][:n]], train=self.train, seed=self.seed,
                         epoch=0, size=self.image_size, raw=self.decoder == "nvjpeg", draft=self.draft)
        item = items[0]
        x = self._on_device(*item)[0] if items.raw else item[0]
        return self._normalize(x.to(self.device))
