"""CIFAR-10/100 from whatever copy the user has, held on the device, augmented in batches.
(Image folders and ImageNet, which do not fit on a device: :mod:`psi.engine.images`.)

Where the data is looked for: the folder given by ``data_dir``, else ``$PSI_DATA``, else
``./data``. In that folder, for ``cifar10`` (``cifar100`` likewise), in this order:

1. the official extracted folder ``cifar-10-batches-py/`` (``cifar-100-python/``);
2. the official archive ``cifar-10-python.tar.gz`` (``cifar-100-python.tar.gz``);
3. an image-folder tree ``<any name>/train/<class>/*`` and ``test/<class>/*``, or a ``.tar.gz``
   holding one, whatever its file name (``cifar10-jpeg.tar.gz`` for example); for cifar10 the
   class folders must be the ten CIFAR-10 classes, taken in the official label order; for
   other trees the class order is the sorted folder names (CIFAR-100's official order);
   decoded once (about 10 s) into this library's cache, ``$PSI_CACHE`` or else the project's
   ``data/psi-cache/`` (the user's data folder is never written), keyed by the source's path,
   size and modification time;
4. if nothing is found and ``download=True``, the official archive is downloaded, its md5
   checked, and written under its final name only once complete.

``synthetic`` is a small CIFAR-shaped dataset made on the spot (for tests and smoke runs); it
is used only when asked for by name, never as a fallback. ``imagefolder`` and ``imagenet`` are
streamed from disk (:mod:`psi.engine.images`). ``data/README.md`` tells users the same,
with the errors a missing or corrupt copy gives.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from psi.engine.dataset import (
    EPOCH_SEED_STRIDE,
    DataError,
    Dataset,
    Normalize,
    batch_count,
    check_batch_split,
    default_data_dir,
)
from psi.engine.files import DiskFull, atomic_write

__all__ = ["BatchLoader", "CIFAR10_CLASSES", "synthetic", "load_cifar"]

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_OFFICIAL = {
    "cifar10": ("cifar-10-batches-py", "cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python", "cifar-100-python.tar.gz",
                 "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85"),
}
# per-channel statistics of the official CIFAR training sets (0-255 scale)
_MEAN = {"cifar10": (125.31, 122.95, 113.87), "cifar100": (129.30, 124.07, 112.43)}
_STD = {"cifar10": (62.99, 62.09, 66.70), "cifar100": (68.17, 65.39, 70.42)}


def _unpickle(f) -> dict:
    return pickle.load(f, encoding="latin1")


def _official(name: str, path: Path) -> Dataset:
    c10 = name == "cifar10"
    train_files = [f"data_batch_{i}" for i in range(1, 6)] if c10 else ["train"]
    meta_file, label_key = ("batches.meta", "labels") if c10 else ("meta", "fine_labels")
    with contextlib.ExitStack() as stack:  # the archive, if any, is closed once its members are read
        if path.is_dir():
            def read(member: str) -> dict:
                with open(path / member, "rb") as f:
                    return _unpickle(f)
        else:
            tar = stack.enter_context(tarfile.open(path, "r:gz"))
            top = _OFFICIAL[name][0]

            def read(member: str) -> dict:
                return _unpickle(tar.extractfile(f"{top}/{member}"))

        parts = [read(f) for f in train_files]
        test = read("test_batch" if c10 else "test")
        meta = read(meta_file)
    classes = tuple(meta["label_names" if c10 else "fine_label_names"])

    def images(d: dict) -> Tensor:
        return torch.from_numpy(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).copy())

    return Dataset(name, torch.cat([images(p) for p in parts]),
                   torch.tensor([y for p in parts for y in p[label_key]], dtype=torch.long),
                   images(test), torch.tensor(test[label_key], dtype=torch.long), classes, str(path),
                   _MEAN[name], _STD[name])


def _download(url: str, dest: Path, md5: str) -> None:
    """Download to ``dest`` all or nothing (:func:`psi.engine.files.atomic_write`), its md5 checked
    before it takes the name."""
    dest.parent.mkdir(parents=True, exist_ok=True)

    def fetch(out) -> None:
        h = hashlib.md5()
        with urllib.request.urlopen(url, timeout=60) as resp:
            while chunk := resp.read(1 << 20):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != md5:
            raise OSError(f"md5 of the download is {h.hexdigest()}, expected {md5}")

    atomic_write(dest, fetch)


def _image_trees(root: Path, name: str):
    """Candidate image-folder sources in ``root``: folders with train/ and test/, then .tar.gz files."""
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        for cand in (d, *(sorted(d.iterdir()) if d.is_dir() else ())):
            if cand.is_dir() and (cand / "train").is_dir() and (cand / "test").is_dir() \
                    and _classes_fit(name, [c.name for c in (cand / "train").iterdir() if c.is_dir()]):
                yield cand
                return
    for f in sorted(root.glob("*.tar.gz")) + sorted(root.glob("*.tgz")):
        if f.name not in (_OFFICIAL["cifar10"][1], _OFFICIAL["cifar100"][1]) and _tar_fits(f, name):
            yield f
            return


def _classes_fit(name: str, classes: list[str]) -> bool:
    if name == "cifar10":
        return sorted(classes) == sorted(CIFAR10_CLASSES)
    return len(classes) == 100


def _tar_fits(path: Path, name: str) -> bool:
    classes = set()
    with tarfile.open(path, "r:*") as tar:
        for m in tar:
            parts = Path(m.name).parts
            if m.isfile() and len(parts) >= 3 and parts[-3] == "train":
                classes.add(parts[-2])
            if len(classes) > 100:
                break
    return _classes_fit(name, sorted(classes))


def _cache_dir() -> Path:
    """``$PSI_CACHE``, else the project's ``data/psi-cache`` (never the user's data folder,
    which may be shared or read-only)."""
    return Path(os.environ.get("PSI_CACHE") or Path(__file__).resolve().parents[2] / "data" / "psi-cache")


def _from_image_tree(name: str, src: Path, cache_dir: str | os.PathLike) -> Dataset:
    st = src.stat()
    key = hashlib.sha1(f"{src.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = Path(cache_dir) / f"{name}-{src.name.split('.')[0]}-{key}.npz"
    if cache.is_file():
        try:
            z = np.load(cache)
            return _dataset_from_arrays(name, z, str(src))
        except Exception:  # noqa: BLE001 - our own cache: whatever is wrong with it, rebuild it
            cache.unlink(missing_ok=True)
    arrays = _decode_tree(name, src)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # all or nothing, under a temporary name of its own: two processes decoding the same source at once
    # each write their own file, and a reader sees a whole cache or none
    try:
        atomic_write(cache, lambda f: np.savez(f, **arrays))
    except DiskFull as e:
        raise DataError(f"{name}: no space left for the decoded cache {cache} ({e.__cause__ or e}). Free space "
                        f"there, or set PSI_CACHE to a folder on another disk.") from e
    return _dataset_from_arrays(name, arrays, str(src))


def _dataset_from_arrays(name: str, z, source: str) -> Dataset:
    classes = tuple(str(c) for c in z["classes"])
    t = {k: torch.from_numpy(np.ascontiguousarray(z[k])) for k in ("train_x", "train_y", "test_x", "test_y")}
    return Dataset(name, t["train_x"], t["train_y"].long(), t["test_x"], t["test_y"].long(), classes, source,
                   _MEAN[name], _STD[name])


def _decode_tree(name: str, src: Path) -> dict[str, np.ndarray]:
    from PIL import Image

    files: dict[str, list[tuple[str, bytes]]] = {"train": [], "test": []}
    if src.is_dir():
        for split in files:
            for p in sorted((src / split).glob("*/*")):
                if p.is_file():
                    files[split].append((p.parent.name, p.read_bytes()))
    else:
        with tarfile.open(src, "r:*") as tar:
            for m in tar:
                parts = Path(m.name).parts
                if m.isfile() and len(parts) >= 3 and parts[-3] in files:
                    files[parts[-3]].append((parts[-2], tar.extractfile(m).read()))
    names = sorted({c for c, _ in files["train"]})
    classes = CIFAR10_CLASSES if name == "cifar10" else tuple(names)
    index = {c: i for i, c in enumerate(classes)}
    out: dict[str, np.ndarray] = {"classes": np.array(classes)}
    for split, items in files.items():
        items.sort(key=lambda t: index[t[0]])
        x = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB").resize((32, 32))) for _, b in items])
        out[f"{split}_x"] = x.transpose(0, 3, 1, 2).copy()
        out[f"{split}_y"] = np.array([index[c] for c, _ in items], dtype=np.int64)
    return out


def synthetic(n_train: int = 2000, n_test: int = 500, num_classes: int = 10, seed: int = 0) -> Dataset:
    """CIFAR-shaped images: a fixed random template per class plus noise (learnable, not trivial)."""
    g = torch.Generator().manual_seed(seed)
    templates = torch.rand(num_classes, 3, 8, 8, generator=g)

    def make(n: int) -> tuple[Tensor, Tensor]:
        y = torch.arange(n) % num_classes
        base = torch.nn.functional.interpolate(templates[y], size=32, mode="bilinear", align_corners=False)
        x = (0.6 * base + 0.4 * torch.rand(n, 3, 32, 32, generator=g)) * 255
        return x.round().clamp(0, 255).to(torch.uint8), y

    (trx, try_), (tex, tey) = make(n_train), make(n_test)
    mean = tuple(trx.float().mean((0, 2, 3)).tolist())
    std = tuple(trx.float().std((0, 2, 3)).tolist())
    return Dataset("synthetic", trx, try_, tex, tey, tuple(f"class{i}" for i in range(num_classes)), "synthetic",
                   mean, std)


class BatchLoader:
    """Batches from images kept on the device as one uint8 tensor (cifar10-airbench style).

    Training batches: a seeded permutation per epoch, 4-pixel zero-pad + random 32x32 crop and
    random horizontal flip, done on the whole batch with tensor ops; then normalisation. The
    randomness of epoch ``e`` depends only on ``(seed, e)``, so a resumed run sees the same batches.
    ``rank``/``world`` give each process of a data-parallel run its slice of every batch.
    """

    def __init__(self, x: Tensor, y: Tensor, mean, std, batch_size: int, *, train: bool, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool | None = None, rank: int = 0, world: int = 1) -> None:
        self.device = torch.device(device)
        self.x, self.y = x.to(self.device), y.to(self.device)
        self._normalize = Normalize(mean, std, self.device, dtype, channels_last)
        self.batch_size, self.train, self.seed = batch_size, train, seed
        self.drop_last = train if drop_last is None else drop_last
        self.rank, self.world = rank, world
        check_batch_split(batch_size, world)

    def __len__(self) -> int:
        return batch_count(len(self.x), self.batch_size, self.drop_last)

    def epoch(self, epoch: int, start: int = 0):
        """Yield (images, labels) for one epoch (this process's slice), from batch ``start`` on (a
        resume inside an epoch: the batches before are drawn, not made, so the rest are the same)."""
        n = len(self.x)
        g = torch.Generator(device=self.device).manual_seed(self.seed * EPOCH_SEED_STRIDE + epoch)
        order = torch.randperm(n, generator=g, device=self.device) if self.train else torch.arange(n, device=self.device)
        for b in range(len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if b < start:
                if self.train:
                    self._draws(len(idx), g)
                continue
            x, y = self.x[idx], self.y[idx]
            if self.train:  # the whole batch, so that every process draws the same numbers
                x = self._augment(x, g)
            if self.world > 1:
                per = len(idx) // self.world
                x, y = x[self.rank * per:(self.rank + 1) * per], y[self.rank * per:(self.rank + 1) * per]
            yield self._normalize(x), y

    def _draws(self, b: int, g: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
        """A batch's random numbers, in the order they are drawn: shifts x and y, flips."""
        dx = torch.randint(0, 9, (b,), generator=g, device=self.device)
        dy = torch.randint(0, 9, (b,), generator=g, device=self.device)
        return dx, dy, torch.rand(b, generator=g, device=self.device) < 0.5

    def _augment(self, x: Tensor, g: torch.Generator) -> Tensor:
        b = len(x)
        padded = torch.nn.functional.pad(x, (4, 4, 4, 4))
        dx, dy, flip = self._draws(b, g)
        ar = torch.arange(32, device=self.device)
        rows = (dy[:, None] + ar)[:, None, :, None]
        cols = (dx[:, None] + ar)[:, None, None, :]
        crop = padded[torch.arange(b, device=self.device)[:, None, None, None],
                      torch.arange(3, device=self.device)[None, :, None, None], rows, cols]
        return torch.where(flip[:, None, None, None], crop.flip(3), crop)


def load_cifar(name: str, data_dir: str | os.PathLike | None = None, *, download: bool = True,
               cache_dir: str | os.PathLike | None = None) -> Dataset:
    """CIFAR-10 or CIFAR-100 from the first copy found in the order of the module docstring,
    downloaded (md5 checked) when none is and ``download``; :class:`DataError` names where it looked."""
    root = default_data_dir(data_dir)
    folder, archive, url, md5 = _OFFICIAL[name]
    looked = []
    try:
        if (root / folder).is_dir():
            return _official(name, root / folder)
        looked.append(f"{root / folder}/ (official extracted folder)")
        if (root / archive).is_file():
            return _official(name, root / archive)
        looked.append(f"{root / archive} (official archive)")
        for src in _image_trees(root, name):
            return _from_image_tree(name, src, cache_dir or _cache_dir())
        looked.append(f"{root}/*/train/<class>/ or {root}/*.tar.gz holding one (image folder)")
    except (OSError, pickle.UnpicklingError, tarfile.TarError, KeyError, ValueError, EOFError) as e:
        raise DataError(f"{name}: the copy found under {root} is unreadable ({type(e).__name__}: {e}). "
                        f"Delete it and run again to download a fresh one, or point --data-dir/PSI_DATA "
                        f"at a good copy.") from e
    if download:
        try:
            _download(url, root / archive, md5)
            return _official(name, root / archive)
        except (OSError, DiskFull) as e:
            looked.append(f"download from {url} failed ({e})")
    where = "\n  - ".join(looked)
    raise DataError(f"{name} not found. Looked in:\n  - {where}\nFix: pass --data-dir DIR (or set PSI_DATA=DIR) "
                    f"to a folder holding {archive}, {folder}/ or an image-folder tree (or a .tar.gz of one); "
                    f"or run on a machine with a network to download it.")
