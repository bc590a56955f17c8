"""Processes and devices: the run's device and process group (gloo for the CPU, NCCL for CUDA), ended on
every way out; determinism and TF32 switches; and what the processes of a data-parallel run must agree on before
they train (one shared run folder, the same image files, rank 0 alone writing)."""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from psi.engine.config import Config
from psi.engine.dataset import DataError
from psi.engine.files import write_json
from psi.engine.images import FileDataset
from psi.engine.rundir import RunLocked, run_lock


def backend_for(device: torch.device) -> str:
    """The process-group backend for a run on ``device``: NCCL for CUDA tensors, gloo otherwise
    (the run's device decides, not whether the machine has a GPU)."""
    return "nccl" if device.type == "cuda" else "gloo"


def run_device(name: str) -> torch.device:
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
    active exception", SIGABRT) after its work is done. :func:`init_distributed` registers it with
    atexit; :func:`main` and ``psi.grid work`` call it when they finish."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def init_distributed(device: torch.device) -> tuple[int, int]:
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


def set_determinism(cfg: Config, device: torch.device) -> None:
    """``--deterministic``: torch's documented switches (reproducibility notes); else cuDNN may
    benchmark and pick the fastest algorithm for each shape."""
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # read at cuBLAS's first use
    torch.use_deterministic_algorithms(cfg.deterministic)
    if device.type == "cuda":
        torch.backends.cudnn.deterministic = cfg.deterministic
        torch.backends.cudnn.benchmark = not cfg.deterministic


@contextlib.contextmanager
def tf32_switches(cfg: Config, device: torch.device) -> Iterator[dict[str, bool | None]]:
    """``--amp none`` on CUDA is strict fp32: TF32 off for cuDNN's convolutions (on by torch's default)
    and for cuBLAS's matmuls (off by default) while the run lasts, set back after it (a sweep trains its
    runs in one process). Other amp modes, and the CPU, leave the switches as the process has them.
    Yields both as the run has them, ``config.json``'s ``tf32`` (None: unreadable, the process mixed
    torch's ``fp32_precision`` settings with these)."""
    saved = None
    if device.type == "cuda" and cfg.amp == "none":
        saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield {"cudnn_allow_tf32": _read(lambda: torch.backends.cudnn.allow_tf32),
               "cuda_matmul_allow_tf32": _read(lambda: torch.backends.cuda.matmul.allow_tf32)}
    finally:
        if saved is not None:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def _read(switch: Callable[[], bool]) -> bool | None:
    try:
        return bool(switch())
    except RuntimeError:  # torch refuses to say when both of its APIs set the flags
        return None


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


def check_shared_folder(out: Path, rank: int, world: int) -> None:
    """Every process of a data-parallel run reads the run folder (the checkpoint to resume from, the
    metrics for the summary) that rank 0 writes: across machines it must be one shared file system.
    Rank 0 writes a token there; a process that cannot read it back stops them all, with a message."""
    token = f"{os.getpid()}-{time.time_ns()}"
    if rank == 0:
        write_json(out / ".world", {"token": token, "world_size": world})
    token = from_rank0(token, world)
    seen = _sees_token(out / ".world", token, patience=0 if rank == 0 else SHARED_FOLDER_PATIENCE)
    views: list[Any] = [None] * world
    torch.distributed.all_gather_object(views, (socket.gethostname(), seen))
    blind = sorted({host for host, ok in views if not ok})
    if blind:
        raise RuntimeError(f"{out} is not the same folder on every machine of this run: the processes on "
                           f"{', '.join(blind)} cannot read what rank 0 writes there. Fix: give --out a folder on a "
                           f"file system that all nodes share (NFS, Lustre, ...).")


def from_rank0(value: Any, world: int) -> Any:
    """Rank 0's ``value`` on every process (what it saw decides for all, so that they take one branch)."""
    if world == 1:
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def rank0_lock(out: Path, rank: int, world: int) -> Iterator[None]:
    """Rank 0 holds the run folder's lock for all ranks; every rank learns whether it got it."""
    with contextlib.ExitStack() as stack:
        refused = None
        if rank == 0:
            try:
                stack.enter_context(run_lock(out))
            except RunLocked as e:
                refused = str(e)
        refused = from_rank0(refused, world)
        if refused:
            raise RunLocked(refused)
        yield


def default_workers(world: int) -> int:
    """Decoding processes per training process: this machine's CPUs (or the share ``psi.grid`` gives
    its worker, ``PSI_WORKER_CPUS``) shared by the processes on it (``LOCAL_WORLD_SIZE`` under
    torchrun), one left for the training process itself, at most 8."""
    # torchrun sets LOCAL_WORLD_SIZE; under srun, SLURM's tasks per node ("8" or "8(x2)")
    local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE", str(world)).split("(")[0])
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    cpus = int(os.environ.get("PSI_WORKER_CPUS", cpus))
    return max(0, min(8, cpus // max(local, 1) - 1))


def check_same_files(ds: FileDataset, world: int) -> None:
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
        raise DataError(f"the processes of this run do not see the same dataset ({rows}). Fix: give every node "
                          f"the same copy (or one shared folder) of {ds.name}.")
