"""Files that survive crashes: written all or nothing (:func:`atomic_write`: a temporary file, fsync, rename,
the folder fsynced), lines appended and fsynced (:func:`append_line`), and a full disk named as one
(:class:`DiskFull`), never a half-written file."""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


class DiskFull(RuntimeError):
    """A write found no space (ENOSPC) or no quota (EDQUOT) left; every file written before is intact."""


_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _temp_file(path: Path) -> tuple[Any, str]:
    """An open binary file beside ``path`` under a name of its own (``<name>.<random>.tmp``), and that name."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    return os.fdopen(fd, "wb"), tmp


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable: without it a power cut after ``os.replace`` may bring back
    the old name, or none (POSIX: a rename is in the directory, which has its own fsync)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _Recording:
    """A file that remembers the OSError its ``write`` raised: ``torch.save`` turns one into a
    RuntimeError that no longer says the disk was full."""

    def __init__(self, f: Any) -> None:
        self._f, self.error = f, None

    def write(self, b: Any) -> int:
        try:
            return self._f.write(b)
        except OSError as e:
            self.error = e
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)


def _no_space(e: BaseException, f: _Recording | None) -> OSError | None:
    for err in (f.error if f else None, e, e.__cause__, e.__context__):
        if isinstance(err, OSError) and err.errno in _NO_SPACE:
            return err
    return None


def _disk_full(path: Path, err: OSError) -> DiskFull:
    return DiskFull(f"no space left for {path} ({err.strerror}). Nothing written before is lost: the previous "
                    f"{path.name} is intact, the partial one removed. Free space in {path.parent} (or give --out "
                    f"a folder on another disk) and run the same command again: it resumes from the last checkpoint.")


def atomic_write(path: Path, write: Callable[[Any], Any]) -> None:
    """Write ``path`` all or nothing: into a temporary file beside it, flushed to the disk, renamed over
    it, the rename made durable. Killed at any point (kill -9, a power cut), the folder holds the old
    file or the new one, never a part (a temporary file may remain: :func:`clear_stale_temps`).
    A full disk raises :class:`DiskFull` and leaves the old file."""
    f, tmp = _temp_file(path)
    rec = _Recording(f)
    try:
        with f:
            write(rec)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except Exception as e:
        if (err := _no_space(e, rec)) is not None:
            raise _disk_full(path, err) from e
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def append_line(path: Path, line: str) -> None:
    """Append one line to ``path`` (the metrics): a line torn by a crash or a full disk is dropped on the
    next resume (:func:`kept_metrics`)."""
    try:
        with open(path, "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.errno in _NO_SPACE:
            raise _disk_full(path, e) from e
        raise


def clear_stale_temps(out: Path) -> list[Path]:
    """Remove what :func:`atomic_write`s that were killed left behind (only the lock holder writes here)."""
    stale = sorted(out.glob("*.*.tmp"))
    for t in stale:
        t.unlink(missing_ok=True)
    return stale


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=1) + "\n").encode()))
