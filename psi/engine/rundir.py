"""The run folder: one process at a time (:func:`run_lock`, an ``flock`` the kernel releases even on
``kill -9``), the checkpoint and what it restores, the metrics kept on a resume (a torn last line
dropped), and the refusal to resume a folder made with other settings (:class:`ConfigMismatch`)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from psi.engine.config import KEY_IF_SET, NOT_IN_KEY, Config
from psi.engine.stop import Partial


class RunLocked(RuntimeError):
    """Another live process is working in this run folder; nothing was changed."""


class ConfigMismatch(RuntimeError):
    """The run folder's checkpoint was made with other settings (another version of psi, or a hand
    edit): resuming would join two different runs into one. Nothing was changed."""


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


def drop_inherited_locks() -> None:
    """In a forked child: point each held lock's descriptor at /dev/null (the child's copy of the lock
    goes; the number stays valid for whatever the child's copy of the parent's code does with it)."""
    for fd in list(_HELD_LOCKS):
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, fd)
        os.close(null)
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=drop_inherited_locks)  # a forked DataLoader worker must not hold the run's lock


@contextlib.contextmanager
def run_lock(out: Path) -> Iterator[None]:
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


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint, every tensor on the CPU, whatever device wrote it or will run it:
    ``load_state_dict`` then puts model and optimizer state where the parameters are, and the
    RNG states stay CPU byte tensors, as ``torch.set_rng_state`` needs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read means the same thing to the user
        raise RuntimeError(f"checkpoint {path} is unreadable ({type(e).__name__}: {e}). Delete it to start this "
                           f"run over (metrics.jsonl keeps what was measured), or restore a good copy.") from e


def restore_checkpoint(ck: dict[str, Any], model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler,
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


def checkpoint_state(model: nn.Module, opt: torch.optim.Optimizer, scaler: torch.amp.GradScaler, epoch: int,
                device: torch.device, cfg: Config, part: Partial | None = None) -> dict[str, Any]:
    """The state after ``epoch`` (-1: none yet), and ``part``: how far the next epoch got (SIGTERM)."""
    return {"model": model.state_dict(), "optimizer": opt.state_dict(),
            "scaler": scaler.state_dict() if scaler.is_enabled() else None, "epoch": epoch,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            "device_kind": device.type, "config": asdict(cfg),
            "partial": None if part is None else part.state()}


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a ``metrics.jsonl``, without a last line torn by a crash or a full disk (the next
    resume drops it from the file too)."""
    rows = []
    for ln in Path(path).read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(ln))
    return rows


def kept_metrics(metrics_path: Path, start: int) -> str:
    """The metrics of the epochs before ``start`` (what the checkpoint holds): a row of a later epoch
    (written before a crash or a full disk kept its checkpoint from the disk) goes, and so does a line
    torn by one."""
    rows = read_metrics(metrics_path) if metrics_path.is_file() else []
    return "".join(json.dumps(r) + "\n" for r in rows if r["epoch"] < start)


def _same_run(record: dict[str, Any]) -> dict[str, Any]:
    """What of a ``config.json`` decides the numbers: the keyed fields (not where or how fast it runs),
    the device kind and every group's hyperparameters (the kernels and TF32 switches are a record of
    what ran, absent from older runs' files)."""
    return {k: v for k, v in record.items()
            if k not in (*NOT_IN_KEY, "world_size", "kernels", "tf32") and not (k in KEY_IF_SET and v in (None, "none"))}


def check_same_config(out: Path, record: dict[str, Any]) -> None:
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


# The run locks this process holds (their file descriptors). A forked child (a DataLoader worker of an
# image-folder run) would share each one's flock and keep the run folder locked after this process
# died: ``kill -9`` then a run again at once was refused for the seconds a worker takes to notice.
_HELD_LOCKS: set[int] = set()
