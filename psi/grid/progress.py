"""Where a grid stands, read from the run folders alone: each run's state (done, running, waiting), its
epochs done and seconds per epoch, and the view ``python -m psi.grid status`` prints."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from psi.engine.config import Config
from psi.engine.rundir import lock_holder
from psi.study.plan import images_per_epoch


def progress_of(run_dir: Path) -> tuple[int, list[float]]:
    """(epochs done, images/s of its epochs after a process's first); each file is read once
    per change."""
    path = run_dir / "metrics.jsonl"
    try:
        st = path.stat()
    except FileNotFoundError:
        return 0, []
    hit = _metrics_cache.get(path)
    if hit is None or hit[0] != st.st_mtime_ns:
        lines = path.read_text().split("\n")[:-1]  # not a last line still being written
        rows = [json.loads(ln) for ln in lines if ln.strip()]
        hit = (st.st_mtime_ns, len(rows), [r["images_per_second"] for r in rows if not r.get("warmup")])
        _metrics_cache[path] = hit
    return hit[1], hit[2]


def run_states(configs: list[Config]) -> dict[str, list[Config]]:
    """Each run's state: done (``summary.json``), running (a live process holds its lock),
    failed (``failed.json``), partial (some epochs, nobody on it) or waiting (nothing yet)."""
    out: dict[str, list[Config]] = {k: [] for k in ("done", "running", "failed", "partial", "waiting")}
    for c in configs:
        d = c.run_dir()
        if (d / "summary.json").is_file():
            state = "done"
        elif lock_holder(d) is not None:
            state = "running"
        elif (d / "failed.json").is_file():
            state = "failed"
        elif progress_of(d)[0]:
            state = "partial"
        else:
            state = "waiting"
        out[state].append(c)
    return out


def _hours(seconds: float) -> str:
    return f"{int(seconds // 3600)}:{int(seconds % 3600 // 60):02d}:{int(seconds % 60):02d}"


def view(configs: list[Config], concurrent: int, title: str = "grid") -> str:
    """One line: counts by state, and an ETA from the epoch seconds measured so far in these runs
    (remaining epochs x seconds per epoch of the run's model, over ``concurrent`` runs at a time)."""
    states = run_states(configs)
    ips: dict[str, list[float]] = {}
    for c in configs:
        ips.setdefault(c.model, []).extend(progress_of(c.run_dir())[1])
    left, unmeasured = 0.0, set()
    for c in [c for s in ("running", "partial", "waiting") for c in states[s]]:
        if ips[c.model]:
            left += (c.epochs - progress_of(c.run_dir())[0]) * images_per_epoch(c) / statistics.median(ips[c.model])
        else:
            unmeasured.add(c.model)
    counts = ", ".join(f"{len(v)} {k}" for k, v in states.items())
    if not left and not unmeasured:
        eta = ""
    elif unmeasured:
        eta = f"; ETA > {_hours(left / max(concurrent, 1))} (no epoch of {', '.join(sorted(unmeasured))} yet)"
    else:
        eta = f"; ETA {_hours(left / max(concurrent, 1))} at {concurrent} at a time"
    return f"{title}: {len(configs)} runs: {counts}{eta}"


def status_lines(configs: list[Config]) -> list[str]:
    """The failed runs with their error, and who holds each running one."""
    states = run_states(configs)
    lines = []
    for c in states["failed"]:
        err = json.loads((c.run_dir() / "failed.json").read_text()).get("error", "")
        what = "failed (a selection rate: not chosen)" if c.val_size else "failed"
        lines.append(f"  {what}: {c.run_dir()}: {err.splitlines()[0] if err else ''}")
    for c in states["running"]:
        h = lock_holder(c.run_dir()) or {}
        lines.append(f"  running: {c.run_dir().name} (pid {h.get('pid')} on {h.get('host')} since {h.get('since')})")
    return lines


_metrics_cache: dict[Path, tuple[int, int, list[float]]] = {}
