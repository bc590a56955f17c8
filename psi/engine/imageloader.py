"""Batches from image files: the random boxes of training and the centre crop of evaluation, drawn from
``(seed, epoch, index)`` alone; decoding by PIL in worker processes (from a fork server: forking a
training process that runs threads can deadlock the child) or by nvjpeg on the GPU (:class:`ImageLoader`)."""

from __future__ import annotations

import functools
import io
import math
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from psi.engine.dataset import EPOCH_SEED_STRIDE, Normalize, batch_count, check_batch_split


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
    """Item ``(epoch, indices)`` is that batch of that epoch, decoded (pil) or read as bytes with its boxes
    (nvjpeg). The epoch comes with each item, so one set of workers serves every epoch."""

    def __init__(self, files: np.ndarray, labels: Tensor, *, train: bool, seed: int, size: int, raw: bool,
                 draft: bool = True) -> None:
        self.files, self.labels = files, labels
        self.train, self.seed, self.size, self.raw, self.draft = train, seed, size, raw, draft

    def _box_of(self, epoch: int, i: int):
        if self.train:
            return lambda w, h: train_box(w, h, _rng(self.seed, epoch, i))
        return lambda w, h: (eval_box(w, h, self.size), False)

    def __getitem__(self, key: tuple[int, list[int]]):
        epoch, idx = key
        y = self.labels[idx]
        if not self.raw:
            x = np.stack([_decode_pil(self.files[i], self._box_of(epoch, i), self.size, self.draft) for i in idx])
            return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), y
        return self._raw(epoch, idx) + (y,)

    def _raw(self, epoch: int, idx: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
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
                box, flip = self._box_of(epoch, i)(*size)
                blobs.append(Path(self.files[i]).read_bytes())
                boxes.append(box)
                flips.append(flip)
            else:
                done.append(torch.from_numpy(_decode_pil(self.files[i], self._box_of(epoch, i), self.size,
                                                         self.draft)))
        joined = b"".join(blobs)
        data = torch.frombuffer(bytearray(joined), dtype=torch.uint8) if joined else torch.empty(0, dtype=torch.uint8)
        lengths = torch.tensor([len(b) for b in blobs], dtype=torch.long)
        side = self.size
        decoded = (torch.stack(done).permute(0, 3, 1, 2).contiguous() if done
                   else torch.empty(0, 3, side, side, dtype=torch.uint8))
        return (data, lengths, torch.tensor(boxes, dtype=torch.float64).reshape(-1, 4),
                torch.tensor(flips, dtype=torch.bool), torch.tensor(on_gpu, dtype=torch.bool), decoded)


class _Keys(torch.utils.data.Sampler):
    """The items of the pass asked for last (:meth:`ImageLoader.epoch` sets them before each pass; each
    pass takes its own iterator over them, in the training process)."""

    def __init__(self) -> None:
        self.keys: list[tuple[int, list[int]]] = []

    def __iter__(self) -> Iterator[tuple[int, list[int]]]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """``t`` copied to ``device`` without holding the host: on CUDA from pinned memory (pinned here
    when it is not; a copy from pageable memory is staged by the driver, in step with the host)."""
    if device.type == "cuda" and t.device.type == "cpu" and t.numel() and not t.is_pinned():
        t = t.pin_memory()
    return t.to(device, non_blocking=True)


def _worker_init(trainer_pid: int, _: int) -> None:
    torch.set_num_threads(1)  # the workers decode with PIL; torch's threads would only compete
    threading.Thread(target=_exit_with, args=(trainer_pid,), daemon=True, name="psi-exit-with-trainer").start()


def _exit_with(trainer_pid: int, every: float = 1.0) -> None:
    """End this worker when the training process is gone. torch's workers watch their parent, which
    under the fork server is the server, not the trainer; and the server lives while a worker holds
    its pipe: after a ``kill -9`` of the trainer both would live on for ever, without this."""
    while True:
        time.sleep(every)
        try:
            os.kill(trainer_pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or its pid now another user's process
            os._exit(0)


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
    """Batches of an image dataset streamed from disk, with :class:`psi.engine.cifar.BatchLoader`'s interface
    (``len``, ``epoch(e)``, ``device``): normalised images on ``device`` and int64 labels.

    ``rank``/``world``: each process loads and decodes only its slice of every batch. ``decode``
    replaces the GPU decoder (a function ``(list of byte tensors, device) -> list of (3, H, W)
    uint8 tensors``): the tests run the nvjpeg path on the CPU with a PIL stand-in. ``draft=False``
    decodes every JPEG at full resolution (as torchvision's PIL pipeline does; slower, for comparison).

    The workers are started at the first epoch and serve every later one (``persistent_workers``), the
    evaluation loader's beside the training loader's: one pass over a loader at a time (a new pass
    ends the one before)."""

    SYNCS_PER_BATCH = 1
    """Host waits per batch by design, on nvjpeg on CUDA alone: the loader's stream is synchronized
    before each batch's decode (:meth:`_on_device`; torch's sync debug mode reports it). The PIL path
    and the CPU wait for nothing. ``host_syncs`` counts the waits this loader made."""

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
        check_batch_split(batch_size, world)
        self.host_syncs = 0
        self._keys, self._workers = _Keys(), None

    def _items(self) -> torch.utils.data.DataLoader:
        """The DataLoader of every epoch, made at the first: its workers (if any) live as long as this loader."""
        if self._workers is None:
            raw = self.decoder == "nvjpeg"
            items = _Batches(self.files, self.labels, train=self.train, seed=self.seed, size=self.image_size, raw=raw,
                             draft=self.draft)
            self._workers = torch.utils.data.DataLoader(
                items, batch_size=None, sampler=self._keys, num_workers=self.workers,
                worker_init_fn=functools.partial(_worker_init, os.getpid()),
                multiprocessing_context=_worker_context() if self.workers else None,
                pin_memory=self.device.type == "cuda" and not raw, prefetch_factor=4 if self.workers else None,
                persistent_workers=self.workers > 0)
        return self._workers

    def __len__(self) -> int:
        return batch_count(len(self.files), self.batch_size, self.drop_last)

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
        loader = self._items()
        self._keys.keys = [(epoch, s.tolist()) for s in self._slices(epoch)[start:] if len(s)]
        for item in loader:
            if self.decoder == "nvjpeg":
                x, y = self._on_device(*item)  # x on the device already
            else:
                x, y = item
                x = _to_device(x, self.device)  # pinned by the DataLoader's thread on CUDA
            yield self._normalize(x), _to_device(y, self.device)

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
        self.host_syncs += 1  # SYNCS_PER_BATCH
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
        cpu = iter(_to_device(decoded, self.device))  # the images PIL decoded (PNGs, CMYK JPEGs): pinned first
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
        items = _Batches(self.files, self.labels, train=self.train, seed=self.seed, size=self.image_size,
                         raw=self.decoder == "nvjpeg", draft=self.draft)
        item = items[(0, self._slices(0)[0][:n].tolist())]
        x = self._on_device(*item)[0] if items.raw else item[0]
        return self._normalize(x.to(self.device))


CROP_SCALE, CROP_RATIO = (0.08, 1.0), (3 / 4, 4 / 3)
DECODERS = ("auto", "pil", "nvjpeg")


EVAL_CROP_FRACTION = 0.875  # 224 of 256
