"""Image-folder loading against training, side by side: is the loader what limits a run?

    python -m psi.bench loader [--data-dir DIR] [--images 256] [--workers 0 1 2] [--models resnet18]

Without ``--data-dir`` it writes a folder of ImageNet-like JPEGs (500x375, quality 90, the median
shape of ILSVRC-2012's training images) to a temporary directory. It reports images per second of
:class:`psi.engine.imageloader.ImageLoader` alone (training transform at 224, on the CPU: decode, random
resized crop, flip, normalise), for each number of worker processes, with and without PIL's draft
decoding; the evaluation transform; and one epoch of training steps of each model fed by the loader
(the engine's own step: forward, backward, PSI-SGDM). The ratio of the two says whether decoding
or computing limits a run on this machine; a GPU needs the loader's rate to reach its training rate.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from psi.engine.imageloader import ImageLoader
from psi.engine.images import load_image_folder
from psi.engine.models import build_model
from psi.engine.optimizers import build_optimizer


def write_folder(root: Path, n: int, size: tuple[int, int] = (500, 375), classes: int = 4) -> Path:
    """``n`` JPEGs of ``size`` in ``classes`` class folders of ``root/train`` (and a few in ``val``)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for split, count in (("train", n), ("val", max(classes, n // 8))):
        for i in range(count):
            c = i % classes
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            base = np.stack([xx * 255 / w, yy * 255 / h, np.full((h, w), 60.0 * c)], -1)
            img = (0.6 * base + 0.4 * rng.random((h, w, 3)) * 255).astype(np.uint8)
            Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root


def _rate(loader: ImageLoader, rounds: int) -> float:
    """Median images/s over ``rounds`` epochs of the loader."""
    rates = []
    for e in range(rounds):
        t0, n = time.perf_counter(), 0
        for x, _ in loader.epoch(e):
            n += len(x)
        rates.append(n / (time.perf_counter() - t0))
    return statistics.median(rates)


def _train_rate(loader: ImageLoader, model_name: str, classes: int) -> float:
    """Images/s of one epoch of training steps fed by ``loader`` (after one untimed batch)."""
    model = build_model(model_name, classes)
    batches = loader.epoch(0)
    x, y = next(batches)
    opt = build_optimizer("psi-sgdm", model, x[:16])

    def step(x, y) -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    step(x, y)
    t0, n = time.perf_counter(), 0
    for x, y in batches:
        step(x, y)
        n += len(x)
    return n / (time.perf_counter() - t0)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m psi.bench loader", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", help="an image folder (train/<class>/*); default: generated JPEGs")
    ap.add_argument("--images", type=int, default=256, help="generated training images (default 256)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 0 1 .. cores)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", nargs="+", default=["resnet18", "resnet50"], help="trained from the loader ([] none)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads of the training process")
    a = ap.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if a.threads:
        torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(a.data_dir) if a.data_dir else write_folder(Path(tmp), a.images)
        ds = load_image_folder("imagefolder", root)
        print(f"torch {torch.__version__}, {cores} cores, {torch.get_num_threads()} torch threads; {len(ds.train_files)} "
              f"training images from {'generated 500x375 JPEGs' if not a.data_dir else root}; batch {a.batch_size}, "
              f"{a.image_size}px; median of {a.rounds} epochs")

        def loader(workers: int, train: bool = True, draft: bool = True) -> ImageLoader:
            files, y = (ds.train_files, ds.train_y) if train else (ds.test_files, ds.test_y)
            return ImageLoader(files, y, ds.mean, ds.std, a.batch_size, train=train, image_size=a.image_size,
                                 workers=workers, decoder="pil", draft=draft)

        rows = []
        for w in a.workers if a.workers is not None else range(cores + 1):
            rows.append((f"loader, train transform, {w} worker(s)", _rate(loader(w), a.rounds)))
            rows.append(("  the same without draft decoding", _rate(loader(w, draft=False), a.rounds)))
        rows.append(("loader, eval transform, 0 workers", _rate(loader(0, train=False), a.rounds)))
        base = rows[0][1]
        print(f"  {'contender':<46} {'images/s':>9} {'/ first':>8}")
        for name, rate in rows:
            print(f"  {name:<46} {rate:9.1f} {rate / base:8.2f}")
        best = max(r for _, r in rows)
        for m in a.models:
            rate = _train_rate(loader(max(1, cores - 1)), m, ds.num_classes)
            print(f"  training {m} (psi-sgdm) fed by {max(1, cores - 1)} worker(s): {rate:.1f} images/s, "
                  f"{best / rate:.1f}x below the loader's best")
