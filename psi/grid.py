"""The CIFAR study's grid in one place, and a tool that runs it on many GPUs, CPU workers or a SLURM array.

    python -m psi.grid run --profile paper --device cuda --gpus 0,1,2,3 --runs-per-gpu 4 --out results/paper
    python -m psi.grid run --profile smoke --device cpu --workers 2 --out results/smoke
    python -m psi.grid status --out results/paper
    python -m psi.grid slurm --profile paper --out results/paper --array 25 --partition gpu --time 24:00:00
    python -m psi.grid run --profile paper --device cuda --gpus 0 --out results/paper --dry-run

Notebook 04 and this tool build the same runs from the same functions (:func:`base_config`,
:func:`select_lrs`, :func:`study_configs`), so the run folders one makes are the ones the other
reuses: ``./run_all.sh --profile paper --out DIR`` after ``run`` or ``slurm`` trains nothing again.

Profiles with a learning-rate selection (``lr_grids``: smoke, quick) run it first: ``run`` spreads
the grid's starting rates over its workers, then one worker finishes the selection (the rates
past an edge of the grid, at most two more per optimizer); ``slurm`` runs the selection in the
submitting process. The paper profile has none.

Each worker runs its shard ``k/N`` of the list (:func:`psi.train.sweep`), then every run still
waiting, last first: an idle worker takes over the others' tails. Two processes never train one
run (the run folder's lock, :class:`psi.train.RunLocked`), and a finished run is read back, not
trained: running a command again only does what is missing, and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import fcntl
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import torch

from . import data as D
from . import kernels
from .models import MODELS, build_model
from .notebook import PROFILES, ParameterError, check_choice, check_positive, parse_shard, study_settings
from .optimizers import LR, OPTIMIZERS
from .study import read_selected_files, select_lr, selection_config, write_selected
from .train import (
    PREEMPTED_EXIT,
    SCHEDULES,
    Config,
    Preempted,
    discovery_examples,
    end_process_group,
    lock_holder,
    optimizer_for,
    sweep,
)

__all__ = ["base_config", "check_settings", "select_lrs", "read_selected", "study_configs", "distinct", "plan",
           "cost_order", "run_states", "epoch_seconds", "main"]

# notebook 04's study parameters; --set NAME=VALUE takes these
SETTINGS = ("dataset", "models", "optimizers", "seeds", "epochs", "schedule", "subset", "batch_size", "lr_grids",
            "val_size", "select_subset", "lr_extend", "paper_settings", "eval_every", "milestones", "image_size",
            "lr_scaling")
PAPER_SETTINGS = ("table1", "table2")  # the named settings a study runs at Table 3's rates (psi.optimizers)
TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "synthetic": 2000, "imagenet": 1281167}  # training sets
MPS_COMMAND = "nvidia-cuda-mps-control -d"


# -- the grid --------------------------------------------------------------------------------

def check_settings(settings: dict[str, Any]) -> None:
    """Notebook 04's checks of the study settings; a wrong one names itself and the valid values."""
    check_choice("dataset", settings["dataset"], D.DATASETS)
    check_choice("models", settings["models"], list(MODELS))
    check_choice("optimizers", settings["optimizers"], OPTIMIZERS)
    check_choice("schedule", settings["schedule"], SCHEDULES)
    check_choice("lr_grids", list(settings["lr_grids"]), settings["optimizers"])
    if not isinstance(settings["paper_settings"], (list, tuple)):
        raise ParameterError(f"parameter paper_settings={settings['paper_settings']!r} must be a list of settings, "
                             f"e.g. ['table1'] or ['table1', 'table2'] ([] for none)")
    check_choice("paper_settings", list(settings["paper_settings"]), PAPER_SETTINGS)
    check_positive("epochs", settings["epochs"], integer=True)
    check_positive("batch_size", settings["batch_size"], integer=True)
    if settings["lr_grids"]:
        check_positive("val_size", settings["val_size"], integer=True)
    if settings["select_subset"] is not None:
        check_positive("select_subset", settings["select_subset"], integer=True)
    if not (isinstance(settings["lr_extend"], int) and settings["lr_extend"] >= 0):
        raise ParameterError(f"parameter lr_extend={settings['lr_extend']!r} must be an integer >= 0 (how many "
                             f"times the selection may extend a grid past its edge)")
    if not (isinstance(settings["eval_every"], int) and settings["eval_every"] >= 0):
        raise ParameterError(f"parameter eval_every={settings['eval_every']!r} must be an integer >= 0 "
                             f"(0: evaluate after the last epoch only)")


def base_config(settings: dict[str, Any], runs_dir: str | os.PathLike, device: str = "cpu", amp: str = "auto",
                channels_last: bool | None = None, compile: bool | None = None, deterministic: bool = False,
                data_dir: str | None = None) -> Config:
    """The config every run of the study starts from (model, optimizer, seed and lr are set per run)."""
    defaults = Config()  # a CIFAR profile names no milestones, crop or scaling rule: the engine's (the paper's CIFAR)
    base = Config(dataset=settings["dataset"], epochs=settings["epochs"], batch_size=settings["batch_size"],
                  schedule=settings["schedule"], subset=settings["subset"] or None, eval_every=settings["eval_every"],
                  milestones=tuple(settings.get("milestones") or defaults.milestones),
                  image_size=settings.get("image_size"), lr_scaling=settings.get("lr_scaling") or defaults.lr_scaling,
                  device=device, amp=amp,
                  channels_last=channels_last, compile=compile, deterministic=deterministic, data_dir=data_dir,
                  out=str(runs_dir), progress=False)
    base.validate()
    return base


@contextlib.contextmanager
def _flock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an flock on ``path`` (waiting for it); the kernel drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _trained_here(c: Config) -> bool:
    """Whether this process finished the run (its summary names the process), not read it back."""
    try:
        by = json.loads((c.run_dir() / "summary.json").read_text()).get("trained_by") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return by.get("pid") == os.getpid() and by.get("host") == socket.gethostname()


def _selection_lock(base: Config, shared: bool = False) -> contextlib.AbstractContextManager[None]:
    """The selection is made once per runs folder: its maker holds this exclusively, so that a
    concurrent shard waits and then reads back the finished runs; workers that train the grid's
    starting rates hold it shared (they may run together, never while a selection is made)."""
    return _flock(Path(base.out) / ".selection.lock", shared)


def selection_configs(settings: dict[str, Any], base: Config) -> list[Config]:
    """The selection's starting runs: every (model, optimizer) with a grid, at each of its rates
    (what :func:`psi.study.select_lr` trains first; it may add up to two rates past an edge)."""
    return [selection_config(replace(base, model=m), o, lr, settings["val_size"], subset=settings["select_subset"])
            for m in settings["models"] for o in settings["optimizers"] if o in settings["lr_grids"]
            for lr in sorted(settings["lr_grids"][o])]


def select_lrs(settings: dict[str, Any], base: Config,
               dataset: D.Dataset | None = None) -> tuple[dict[tuple[str, str], float], list[Any]]:
    """Each (model, optimizer) with a grid: its learning rate chosen on the validation split
    (:func:`psi.study.select_lr`), written to the runs folder (:func:`psi.study.write_selected`);
    returns ``{(model, optimizer): lr}`` and the tables of every rate tried. Finished
    runs are read back, so a second call (or a second shard) trains nothing."""
    selected: dict[tuple[str, str], float] = {}
    tables = []
    if not settings["lr_grids"]:
        return selected, tables
    runs_dir = Path(base.out)
    with _selection_lock(base):
        for model in settings["models"]:
            for opt in settings["optimizers"]:
                if opt in settings["lr_grids"]:
                    lr, table = select_lr(replace(base, model=model), opt, settings["lr_grids"][opt],
                                          settings["val_size"], dataset=dataset, extend=settings["lr_extend"],
                                          subset=settings["select_subset"])
                    selected[(model, opt)] = lr
                    tables.append(table.assign(model=model))
            chosen = {o: lr for (m, o), lr in selected.items() if m == model}
            if chosen:
                write_selected(runs_dir, settings["dataset"], model, chosen)
    return selected, tables


def read_selected(settings: dict[str, Any], base: Config) -> dict[tuple[str, str], float]:
    """The rates a finished selection chose, read from its files without training: a rate counts
    only when its selection run for these settings is finished (a file left by a study with
    other settings does not)."""
    selected = {}
    for (dataset, model, opt), lr in read_selected_files(base.out).items():
        run = selection_config(replace(base, model=model), opt, lr, settings["val_size"], subset=settings["select_subset"])
        if (dataset == settings["dataset"] and model in settings["models"] and opt in settings["lr_grids"]
                and (run.run_dir() / "summary.json").is_file()):
            selected[(model, opt)] = lr
    return selected


def study_configs(settings: dict[str, Any], base: Config,
                  selected: dict[tuple[str, str], float]) -> list[tuple[str, Config]]:
    """The study's (setting, config) pairs: each model x optimizer at its selected rate
    (setting ``tuned``, when there is one) and under each named setting of ``paper_settings``
    (``table1``, ``table2``: Table 3's rates, resolved by :mod:`psi.optimizers` and recorded by
    the run), each seed; :func:`distinct` drops repeats. A selected rate equal to Table 3's makes
    the same run as ``table1``: the pair labelled ``tuned`` then holds the ``table1`` config, one
    run for both (:func:`psi.study.label_tuned` labels it back in the analysis)."""
    pairs = []
    for model in settings["models"]:
        for opt in settings["optimizers"]:
            runs: list[tuple[str, str, float | None]] = []
            if (model, opt) in selected:
                lr = selected[(model, opt)]
                same = "table1" in settings["paper_settings"] and lr == LR[opt]
                runs.append(("tuned", "table1", None) if same else ("tuned", "tuned", lr))
            runs += [(name, name, None) for name in settings["paper_settings"]]
            for label, setting, lr in runs:
                for seed in settings["seeds"]:
                    pairs.append((label, replace(base, model=model, optimizer=opt, setting=setting, seed=seed,
                                                 lr=lr)))
    return pairs


def distinct(pairs: list[tuple[str, Config]]) -> list[Config]:
    """The distinct runs of ``pairs``, in their first order (a run folder is a run)."""
    return list({c.run_dir(): c for _, c in pairs}.values())


def cost_order(configs: list[Config]) -> list[Config]:
    """Longest runs first (epochs x training images x parameters), so that the last runs a
    worker takes are short ones; stable, so every process derives the same order."""
    params = {m: sum(p.numel() for p in build_model(m).parameters()) for m in {c.model for c in configs}}
    return sorted(configs, key=lambda c: -c.epochs * _train_images(c) * params[c.model])


def _train_images(cfg: Config) -> int:
    return cfg.subset or TRAIN_IMAGES.get(cfg.dataset, 1) - cfg.val_size  # an image folder: unknown until read


def plan(settings: dict[str, Any], base: Config) -> dict[str, Any]:
    """What the grid holds now: ``select`` (the selection's starting runs), ``study`` (the
    distinct runs of :func:`study_configs`, in notebook 04's order, so that a shard ``k/n`` is
    the same slice here and there) and ``pending`` (tuned (setting, seed) pairs whose rate is
    not chosen yet)."""
    selected = read_selected(settings, base)
    missing = [(m, o) for m in settings["models"] for o in settings["optimizers"]
               if o in settings["lr_grids"] and (m, o) not in selected]
    return {"select": selection_configs(settings, base),
            "study": distinct(study_configs(settings, base, selected)),
            "pending": len(missing) * len(settings["seeds"])}


# -- progress --------------------------------------------------------------------------------

_metrics_cache: dict[Path, tuple[int, int, list[float]]] = {}


def _metrics(run_dir: Path) -> tuple[int, list[float]]:
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
        elif _metrics(d)[0]:
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
        ips.setdefault(c.model, []).extend(_metrics(c.run_dir())[1])
    left, unmeasured = 0.0, set()
    for c in [c for s in ("running", "partial", "waiting") for c in states[s]]:
        if ips[c.model]:
            left += (c.epochs - _metrics(c.run_dir())[0]) * _train_images(c) / statistics.median(ips[c.model])
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


def _status_lines(configs: list[Config]) -> list[str]:
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


# -- epoch seconds: measured in finished epochs, or by a few training steps -------------------

def _device_kind(device: str) -> str:
    return torch.device(device).type


def _measured_ips(runs_dir: Path, model: str, device_kind: str, batch_size: int) -> list[float]:
    """Images/s of every epoch (after a process's first) of the runs in ``runs_dir`` of this
    model, device kind and batch size."""
    out = []
    for p in sorted(runs_dir.glob("*/config.json")):
        c = json.loads(p.read_text())
        if (c.get("model"), c.get("device_kind", _device_kind(c.get("device", "cpu"))), c.get("batch_size")) == (
                model, device_kind, batch_size):
            out.extend(_metrics(p.parent)[1])
    return out


def _timed_ips(cfg: Config, steps: int) -> float:
    """Images/s of ``steps`` training steps (after 3 untimed ones) of ``cfg``'s model and optimizer
    on random images, eager (a compiled run is faster), with its autocast and memory format."""
    r = cfg.resolved()
    device = torch.device(r.device)
    model = build_model(r.model, {"cifar100": 100, "imagenet": 1000}.get(r.dataset, 10)).to(device)
    fmt = torch.channels_last if r.channels_last else torch.contiguous_format
    model = model.to(memory_format=fmt)
    side = r.image_size or 32  # ImageNet's crops, else CIFAR's images
    x = torch.randn(r.batch_size, 3, side, side, device=device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (r.batch_size,), device=device)
    opt = optimizer_for(r, model, x[:discovery_examples(side)])
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.amp)
    model.train()

    def step() -> None:
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(3):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps * r.batch_size / (time.perf_counter() - t0)


def epoch_seconds(configs: list[Config], steps: int = 20) -> dict[str, tuple[float | None, str]]:
    """Per model of ``configs``: seconds per epoch of 50000 images (training only; evaluation adds
    a little), and where that number comes from: the median over the finished epochs of runs
    already in the runs folder (same model, device kind, batch size), else ``steps`` timed steps
    (None when the runs' device is not here: a CUDA grid planned on a login node)."""
    out: dict[str, tuple[float | None, str]] = {}
    for model in dict.fromkeys(c.model for c in configs):
        c = next(c for c in configs if c.model == model)
        ips = _measured_ips(Path(c.out), model, _device_kind(c.device), c.batch_size)
        if ips:
            out[model] = (50000 / statistics.median(ips), f"measured: median of {len(ips)} epochs in {c.out}")
        elif _device_kind(c.device) == "cuda" and not torch.cuda.is_available():
            out[model] = (None, "unknown: no CUDA device here to time it (plan on a GPU machine, or once runs "
                                "have finished epochs)")
        else:
            opt = "psi-sgdm" if any(x.optimizer == "psi-sgdm" for x in configs) else c.optimizer
            cfg = replace(c, optimizer=opt, setting="table1", lr=None, omega=None)  # Table 3's rate
            r = cfg.resolved()
            out[model] = (50000 / _timed_ips(cfg, steps),
                          f"estimate from {steps} steps of {opt} on {r.device} (eager, amp {r.amp}, channels-last "
                          f"{r.channels_last}, batch {r.batch_size})")
    return out


# -- workers ---------------------------------------------------------------------------------

def _plan_file(out: Path, phase: str, tag: str, settings: dict[str, Any], base: Config,
               configs: list[Config]) -> Path:
    path = out / "logs" / f"{phase}{tag}.plan.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"phase": phase, "settings": settings, "base": asdict(base),
                                "configs": [asdict(c) for c in configs]}, indent=1))
    return path


def work(plan_path: str | os.PathLike, shard: tuple[int, int] = (1, 1), threads: int | None = None,
         steal: bool = True) -> int:
    """A worker: the runs of a plan file's shard ``k/n``, then (``steal``) every run of the plan
    still not done, last first (its own included: one refused because a status probe held its
    lock for a moment is tried again). In the ``select`` phase, worker 1 then makes the selection
    (:func:`select_lrs`, once the other workers are done). Returns the number of the study's runs
    that failed (diverged). Under torchrun, the process group its runs joined ends with it, however it
    ends (an error included: gloo may abort a process that exits with a live group)."""
    try:
        return _work(plan_path, shard, threads, steal)
    finally:
        end_process_group()


def _work(plan_path: str | os.PathLike, shard: tuple[int, int], threads: int | None, steal: bool) -> int:
    p = json.loads(Path(plan_path).read_text())
    if threads:
        torch.set_num_threads(threads)
    base = Config.from_dict(p["base"])
    ds = D.load_dataset(base.dataset, base.data_dir)
    configs = [Config.from_dict(c) for c in p["configs"]]
    k, n = shard
    mine = [c for i, c in enumerate(configs) if i % n == k - 1]
    selecting = p["phase"] == "select"
    failed = set()
    # a data-parallel worker (under torchrun): its processes must take the same runs in the same order, so
    # one pass over its own shard; a second look at a run one of them just finished could differ between them
    together = int(os.environ.get("WORLD_SIZE", "1")) > 1
    passes_of = [mine] if together else [mine, configs[::-1] if steal else mine]
    with _selection_lock(base, shared=True) if selecting else contextlib.nullcontext():
        for passes, todo in enumerate(passes_of):
            for c in todo:
                name = c.run_dir().name
                if (c.run_dir() / "summary.json").is_file() or name in failed or (
                        passes and (c.run_dir() / "failed.json").is_file()):  # diverged: again would diverge again
                    continue
                t0 = time.perf_counter()
                if not passes:
                    print(f"{time.strftime('%H:%M:%S')} {name}: start", flush=True)
                [r] = sweep([c], dataset=ds)
                if passes and "locked" in r:  # another worker is on it: nothing to say
                    continue
                if "failed" not in r and "locked" not in r and not _trained_here(c):
                    continue  # another worker finished it between our look and our start: read back
                state = "failed: " + r["failed"] if "failed" in r else "locked: " + r["locked"] if "locked" in r \
                    else f"done, final {next(v for k, v in r.items() if k.startswith('final_') and k.endswith('_acc'))}"
                print(f"{time.strftime('%H:%M:%S')} {name}: {state} ({time.perf_counter() - t0:.0f} s)"
                      + (" (taken over)" if passes else ""), flush=True)
                if "failed" in r:
                    failed.add(name)
    if selecting and k == 1:
        print(f"{time.strftime('%H:%M:%S')} choosing the learning rates", flush=True)
        selected, _ = select_lrs(p["settings"], base, ds)
        print(f"{time.strftime('%H:%M:%S')} chosen:", {f"{m}/{o}": lr for (m, o), lr in selected.items()}, flush=True)
    return 0 if selecting else len(failed)  # a rate that diverges is one the selection does not choose


def mps_running() -> bool:
    """Whether NVIDIA's Multi-Process Service is up: its control program exists and its pipe
    folder holds the control pipe (several processes on one GPU then share it without
    time-slicing, which helps small networks like these)."""
    pipe = Path(os.environ.get("CUDA_MPS_PIPE_DIRECTORY", "/tmp/nvidia-mps"))
    return shutil.which("nvidia-cuda-mps-control") is not None and (pipe / "control").exists()


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def worker_slots(gpus: str | None, runs_per_gpu: int, workers: int, procs_per_run: int = 1) -> list[str | None]:
    """What each worker sees: its GPUs as ``CUDA_VISIBLE_DEVICES`` takes them, or None on the CPU.
    ``procs_per_run`` > 1: a worker trains each of its runs data-parallel on that many GPUs (or
    CPU processes), so the GPUs are dealt out in groups of that size."""
    if procs_per_run < 1:
        raise ParameterError(f"--procs-per-run must be at least 1, not {procs_per_run}")
    if not gpus:
        return [None] * workers
    ids = [g.strip() for g in gpus.split(",") if g.strip()]
    if procs_per_run > 1:
        if runs_per_gpu > 1 or len(ids) % procs_per_run:
            raise ParameterError(f"--procs-per-run {procs_per_run} deals --gpus {gpus} out in groups of "
                                 f"{procs_per_run}: give a multiple of it, and no --runs-per-gpu")
        return [",".join(ids[i:i + procs_per_run]) for i in range(0, len(ids), procs_per_run)]
    return [ids[i % len(ids)] for i in range(len(ids) * runs_per_gpu)]


def worker_command(plan_path: Path, k: int, n: int, threads: int, steal: bool, procs_per_run: int = 1) -> list[str]:
    """The command of worker ``k`` of ``n``: ``psi.grid worker``, under ``torchrun --standalone``
    (a free port of its own) with ``procs_per_run`` processes when a run is data-parallel."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                str(procs_per_run)] if procs_per_run > 1 else [sys.executable]
    return launcher + ["-m", "psi.grid", "worker", "--plan", str(plan_path), "--shard", f"{k}/{n}", "--threads",
                       str(threads)] + ([] if steal else ["--no-steal"])


def _launch(plan_path: Path, workers: list[str | None], threads: int, steal: bool, logs: Path,
            name: str, refresh: float, configs: list[Config], procs_per_run: int = 1,
            base_env: dict[str, str] | None = None) -> list[Path]:
    """Start one worker per entry of ``workers`` (its GPUs, or None on the CPU), show the progress
    of ``configs`` until all have exited; return the logs of those that failed. The workers'
    environment is ``base_env`` (default: this process's; :func:`psi.kernels.env_for` pins it)."""
    procs = []
    n = len(workers)
    for k, gpu in enumerate(workers, 1):
        env = dict(os.environ if base_env is None else base_env, PSI_PROGRESS="0", OMP_NUM_THREADS=str(threads),
                   PSI_WORKER_CPUS=str(threads * procs_per_run))  # its share, for an image loader's processes
        if gpu is not None:
            env["CUDA_VISIBLE_DEVICES"] = gpu
        log = logs / f"{name}.worker-{k}-of-{n}.log"
        cmd = worker_command(plan_path, k, n, threads, steal, procs_per_run)
        with open(log, "w") as f:
            procs.append((subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    tty = sys.stdout.isatty()
    last, last_time = "", 0.0
    try:
        while True:
            alive = sum(p.poll() is None for p, _ in procs)
            line = view(configs, alive or n, name)
            if tty:
                print("\r\033[K" + line, end="", flush=True)
            elif line.split(";")[0] != last.split(";")[0] or time.monotonic() - last_time > 60:
                print(line, flush=True)
                last, last_time = line, time.monotonic()
            if not alive:
                break
            time.sleep(refresh)
    except KeyboardInterrupt:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait()
        print("\nstopped; run the same command again: finished runs are kept, interrupted ones resume", flush=True)
        raise SystemExit(130) from None
    if tty:
        print(flush=True)
    return [log for p, log in procs if p.returncode != 0]


# -- command line ----------------------------------------------------------------------------

def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _study(a: argparse.Namespace) -> tuple[dict[str, Any], Config]:
    """The study settings (profile, then every --set) and the base config the options give."""
    given = {}
    for item in a.set or []:
        name, eq, value = item.partition("=")
        if not eq or name not in SETTINGS:
            raise ParameterError(f"--set {item!r}: give NAME=VALUE with NAME one of {', '.join(SETTINGS)}")
        given[name] = _literal(value)
    settings = study_settings(a.profile, **given)
    check_settings(settings)
    out = Path(a.out)
    base = base_config(settings, out / "runs", a.device, a.amp, False if a.no_channels_last else None,
                       False if a.no_compile else None, a.deterministic, a.data_dir)
    return settings, base


def _sharded(configs: list[Config], shard: tuple[int, int]) -> list[Config]:
    k, n = shard
    return [c for i, c in enumerate(configs) if i % n == k - 1]


def _print_plan(settings: dict[str, Any], base: Config, p: dict[str, Any], assign, steps: int,
                concurrent: int, what: str) -> None:
    """The --dry-run listing: every run once with where it goes, then the time it takes."""
    phases = [("select", p["select"]), ("study", p["study"])]
    print(f"profile settings: {json.dumps(settings)}")
    i = 0
    for phase, configs in phases:
        if not configs:
            continue
        print(f"{phase}: {len(configs)} runs" + (" (the selection may add up to 2 rates per optimizer)"
                                                  if phase == "select" else ""))
        for j, c in enumerate(configs):
            i += 1
            d = c.run_dir()
            state = "done" if (d / "summary.json").is_file() else "failed" if (d / "failed.json").is_file() else ""
            print(f"  {i:4d} {c.dataset} {c.model} {c.optimizer} {c.setting} lr={c.lr if c.lr is not None else 'Table 3'} "
                  f"seed={c.seed} epochs={c.epochs} -> {assign(j)}  {d} {state}".rstrip())
    if p["pending"]:
        print(f"  + {p['pending']} tuned runs once the selection has chosen their rates")
    every = p["select"] + p["study"]
    if not every:
        return
    secs = epoch_seconds(every, steps)
    kind = _device_kind(base.device)
    print(f"epoch seconds per model ({kind}, an epoch of 50000 training images, batch {base.batch_size}):")
    for model, (s, source) in secs.items():
        print(f"  {model:10s} {'?' if s is None else f'{s:.2f}':>8s} s  {source}")
    known = [c for c in every if secs[c.model][0] is not None]
    total = sum(c.epochs * _train_images(c) / 50000 * secs[c.model][0] for c in known)
    left = sum(c.epochs * _train_images(c) / 50000 * secs[c.model][0] for c in known
               if not (c.run_dir() / "summary.json").is_file())
    print(f"estimate: {total / 3600:.2f} {kind}-hours for the {len(known)} runs one at a time, {left / 3600:.2f} "
          f"of them left; with {concurrent} {what} about {left / 3600 / max(concurrent, 1):.2f} h wall if each "
          f"run keeps these epoch seconds (several runs on one GPU share it: measure)"
          + (f"; {len(every) - len(known)} runs of models not timed are not in it" if len(known) < len(every) else ""))


def _kernels_line(a: argparse.Namespace) -> str:
    """What decides the workers' CPU bits, as this process sees them when it runs under their environment."""
    if all(a.env.get(k) == v for k, v in kernels.PIN.items()):
        how = f"pinned to AVX2 (the {a.profile} profile; --cpu-isa native lifts it)"
    else:
        how = "the CPU's best (--cpu-isa native)" if a.cpu_isa == "native" else "not pinned (only smoke and quick are)"
    same = all(a.env.get(k) == os.environ.get(k) for k in kernels.PIN)
    return f"kernels: {kernels.label(kernels.record()) if same else 'set for the workers'}, {how}"


def _cmd_run(a: argparse.Namespace) -> int:
    settings, base = _study(a)
    out = Path(a.out)
    if a.gpus and a.workers or not a.gpus and a.runs_per_gpu > 1:
        raise ParameterError("--workers is for the CPU and --runs-per-gpu goes with --gpus")
    if a.gpus and (_device_kind(a.device) != "cuda" or torch.device(a.device).index is not None):
        raise ParameterError(f"--gpus needs --device cuda (each worker sees its GPUs as cuda), not {a.device!r}")
    workers = worker_slots(a.gpus, a.runs_per_gpu, a.workers or 1, a.procs_per_run)
    n = len(workers)
    threads = a.threads or max(1, _cores() // (n * a.procs_per_run))
    shard = parse_shard(a.shard)
    p = plan(settings, base)
    p["study"] = cost_order(_sharded(p["study"], shard))
    tag = "" if shard == (1, 1) else f".shard-{shard[0]}-of-{shard[1]}"
    print(_kernels_line(a), flush=True)
    if a.dry_run:
        _print_plan(settings, base, p, lambda j: f"worker {j % n + 1}/{n}" + (
            f" gpu {workers[j % n]}" if workers[j % n] is not None else ""), a.measure_steps, n, "workers")
        print("(a first assignment: an idle worker then takes the waiting runs of the others)")
        return 0
    if a.gpus:
        if mps_running():
            print("NVIDIA MPS: running")
        elif a.runs_per_gpu > 1:
            print(f"NVIDIA MPS: not running; {a.runs_per_gpu} runs share each GPU by time-slicing. To let them run "
                  f"side by side, start it first (as the GPUs' user): {MPS_COMMAND}")
    print(f"psi grid: profile {a.profile}, {n} workers ({', '.join(f'gpu {g}' for g in workers) if a.gpus else a.device})"
          f", {threads} threads each; runs in {out / 'runs'}, logs in {out / 'logs'}", flush=True)
    ds = D.load_dataset(base.dataset, base.data_dir)  # once here: a download or decoding is not done n times
    print(f"data: {ds.name} from {ds.source}", flush=True)
    logs = out / "logs"
    failed: list[Path] = []
    if p["pending"] and a.procs_per_run > 1:
        raise ParameterError("the learning-rate selection runs one process per run: make it first with "
                             "--procs-per-run 1 (or pass --set lr_grids={} to skip it), then run with --procs-per-run")
    if p["pending"]:  # the learning-rate selection: starting rates on every worker, then worker 1 chooses
        sel = _plan_file(out, "select", tag, settings, base, p["select"])
        failed += _launch(sel, workers, threads, not a.no_steal, logs, f"select{tag}", a.refresh, p["select"], 1,
                          a.env)
        p = plan(settings, base)
        p["study"] = cost_order(_sharded(p["study"], shard))
        if p["pending"]:
            print(f"error: the learning-rate selection did not finish; see {logs / f'select{tag}.worker-1-of-{n}.log'}",
                  file=sys.stderr)
            return 1
    plan_path = _plan_file(out, "study", tag, settings, base, p["study"])
    (out / "grid.json").write_text(json.dumps({"profile": a.profile, "plan": str(plan_path), "select": [
        asdict(c) for c in p["select"]]}, indent=1))
    if all((c.run_dir() / "summary.json").is_file() for c in p["study"]):
        print(f"study{tag}: all {len(p['study'])} runs are done; nothing to train")
    else:
        # a data-parallel worker's processes must agree on every run they take: no stealing (which races)
        failed += _launch(plan_path, workers, threads, not a.no_steal and a.procs_per_run == 1, logs, f"study{tag}",
                          a.refresh, p["study"], a.procs_per_run, a.env)
    states = run_states(p["select"] + p["study"])
    for line in _status_lines(p["select"] + p["study"]):
        print(line)
    for log in failed:
        print(f"error: worker failed, see {log}", file=sys.stderr)
    notdone = len(states["partial"]) + len(states["waiting"]) + len(states["running"])
    if notdone:
        print(f"error: {notdone} runs are not done (another process may hold them); run again to finish them",
              file=sys.stderr)
    return 1 if failed or notdone or run_states(p["study"])["failed"] else 0


def _grid_from_file(out: Path) -> list[Config]:
    g = json.loads((out / "grid.json").read_text())
    p = json.loads(Path(g["plan"]).read_text())
    return [Config.from_dict(c) for c in g["select"] + p["configs"]]


def _cmd_status(a: argparse.Namespace) -> int:
    out = Path(a.out)
    if a.profile:
        settings, base = _study(a)
        p = plan(settings, base)
        configs = p["select"] + p["study"]
        note = f"; + {p['pending']} tuned runs once their rates are chosen" if p["pending"] else ""
    elif (out / "grid.json").is_file():
        configs, note = _grid_from_file(out), ""
    else:
        print(f"error: {out / 'grid.json'} not found (written by run and slurm); give --profile", file=sys.stderr)
        return 2
    states = run_states(configs)
    print(view(configs, max(len(states["running"]), 1), f"grid {out}") + note)
    for line in _status_lines(configs):
        print(line)
    return 0


def _timeout_min(text: str) -> int:
    """SLURM's --time: minutes, HH:MM:SS, or D-HH:MM:SS."""
    days, _, rest = text.rpartition("-")
    parts = [int(v) for v in rest.split(":")]
    if len(parts) == 1:
        return int(days or 0) * 1440 + parts[0]
    h, m, s = ([0] * (3 - len(parts)) + parts)[-3:]
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


class ShardTask:
    """One SLURM array task: a worker on its shard (:func:`work`). On a timeout or preemption
    submitit calls :meth:`checkpoint`, which requeues the same task: its runs resume from their
    last epoch."""

    def __call__(self, plan_path: str, k: int, n: int, threads: int | None) -> int:
        threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
        failed = work(plan_path, (k, n), threads)
        if failed:
            raise RuntimeError(f"{failed} runs of shard {k}/{n} diverged; their failed.json says why")
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _cmd_slurm(a: argparse.Namespace) -> int:
    settings, base = _study(a)
    out = Path(a.out)
    p = plan(settings, base)
    p["study"] = cost_order(p["study"])
    n = a.array
    if a.dry_run:
        _print_plan(settings, base, p, lambda j: f"array task {j % n + 1}/{n}", a.measure_steps, n, "array tasks")
        return 0
    import submitit

    ds = D.load_dataset(base.dataset, base.data_dir)  # here, once: the tasks find it decoded (or downloaded)
    if p["pending"]:
        print(f"learning-rate selection first, in this process on {base.device} ({len(p['select'])} starting runs)",
              flush=True)
        select_lrs(settings, base, ds)
        p = plan(settings, base)
        p["study"] = cost_order(p["study"])
    plan_path = _plan_file(out, "study", ".slurm", settings, base, p["study"])
    (out / "grid.json").write_text(json.dumps({"profile": a.profile, "plan": str(plan_path), "select": [
        asdict(c) for c in p["select"]]}, indent=1))
    todo = [k for k in range(1, n + 1)
            if any(not (c.run_dir() / "summary.json").is_file() for c in _sharded(p["study"], (k, n)))]
    if not todo:
        print(f"all {len(p['study'])} runs are done; nothing submitted ({out / 'runs'})")
        return 0
    folder = out / "logs" / "slurm"  # submitit names each task's files by its job id
    gpus = a.gpus_per_task if _device_kind(a.device) == "cuda" else 0
    if a.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=_timeout_min(a.time), nodes=1, tasks_per_node=1, gpus_per_node=gpus)
    else:  # the executor AutoExecutor picks where sbatch exists, named: SLURM's own parameter names
        if not shutil.which("sbatch"):
            print("error: no sbatch on this machine (not a SLURM login node); --executor local runs the array here",
                  file=sys.stderr)
            return 2
        ex = submitit.SlurmExecutor(folder=folder)
        params: dict[str, Any] = dict(job_name=f"psi-{a.profile}", time=_timeout_min(a.time), nodes=1,
                                      ntasks_per_node=1, cpus_per_task=a.cpus_per_task, gpus_per_node=gpus,
                                      array_parallelism=a.parallel or n)
        params.update({k: v for k, v in (("partition", a.partition), ("account", a.account), ("qos", a.qos),
                                          ("constraint", a.constraint), ("setup", a.setup)) if v})
        if a.mem_gb:
            params["mem"] = f"{a.mem_gb}GB"
        ex.update_parameters(**params)
    jobs = ex.map_array(ShardTask(), [str(plan_path)] * len(todo), todo, [n] * len(todo),
                        [a.cpus_per_task] * len(todo))
    print(f"submitted {len(jobs)} array tasks ({a.executor}) for shards {todo} of {n}; {len(p['study'])} runs "
          f"in {out / 'runs'}")
    for k, job in zip(todo, jobs, strict=True):
        print(f"  shard {k}/{n}: job {job.job_id}, log {job.paths.stdout}")
    print(f"progress: python -m psi.grid status --out {out}; submit again to resume: finished runs are skipped")
    if not (a.wait or a.executor == "local"):
        return 0
    bad = 0
    for k, job in zip(todo, jobs, strict=True):
        try:
            job.result()
            print(f"  shard {k}/{n}: done")
        except Exception as e:  # noqa: BLE001 - report every task, then fail
            bad += 1
            print(f"error: shard {k}/{n} (job {job.job_id}) failed: {str(e).splitlines()[-1] if str(e) else e}; "
                  f"log {job.paths.stderr}", file=sys.stderr)
    return 1 if bad else 0


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m psi.grid", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    study = argparse.ArgumentParser(add_help=False)
    study.add_argument("--out", required=True, help="results folder: runs in OUT/runs, logs in OUT/logs (as run_all.sh)")
    study.add_argument("--device", help="cpu or cuda (default: cuda when torch sees one here, else cpu; "
                                        "slurm: cuda)")
    study.add_argument("--data-dir", help="dataset folder (default: $PSI_DATA, else ./data)")
    study.add_argument("--amp", default="auto", choices=["auto", "none", "bf16", "fp16"],
                       help="mixed precision (auto: bf16 on CUDA, none on the CPU)")
    study.add_argument("--no-compile", action="store_true", help="no torch.compile (default: on CUDA)")
    study.add_argument("--no-channels-last", action="store_true", help="keep NCHW (default: channels-last on CUDA)")
    study.add_argument("--deterministic", action="store_true", help="torch's deterministic algorithms (slower)")
    study.add_argument("--cpu-isa", default="avx2", choices=list(kernels.CPU_ISAS),
                       help="avx2 (default): the smoke and quick profiles train under torch's AVX2 kernels on x86-64 "
                            "(ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2), so their results are the same to "
                            "the bit on any x86-64 machine (README, \"The CPU kernels\"); native: the CPU's best "
                            "(AVX-512 where it has it: faster, other last bits)")
    study.add_argument("--set", action="append", metavar="NAME=VALUE",
                       help=f"a study setting of notebook 04 over the profile's, e.g. --set 'models=[\"resnet20\"]' "
                            f"--set dataset=cifar100; NAME: {', '.join(SETTINGS)}")
    dry = argparse.ArgumentParser(add_help=False)
    dry.add_argument("--dry-run", action="store_true",
                     help="print every run, where it goes and the time it takes (device-hours); train nothing")
    dry.add_argument("--measure-steps", type=int, default=20,
                     help="without finished epochs of a model in OUT/runs, time this many training steps of it")

    r = sub.add_parser("run", parents=[study, dry], help="train the grid with worker processes here",
                       description="Train the grid: one worker process per GPU slot (--gpus x --runs-per-gpu, each "
                                   "with CUDA_VISIBLE_DEVICES set to its GPU) or --workers on the CPU; a progress "
                                   "line of the whole grid while they run; exit status 1 if a worker or run failed.")
    r.add_argument("--profile", required=True, choices=list(PROFILES))
    r.add_argument("--gpus", help="GPU ids as CUDA_VISIBLE_DEVICES takes them, e.g. 0,1,2,3")
    r.add_argument("--runs-per-gpu", type=int, default=1, help="workers per GPU (start NVIDIA MPS for > 1)")
    r.add_argument("--workers", type=int, help="worker processes without --gpus (default 1)")
    r.add_argument("--procs-per-run", type=int, default=1,
                   help="train each run data-parallel (torchrun) on this many GPUs of --gpus (or CPU processes); "
                        "a worker then holds that many GPUs (default 1: one run per GPU)")
    r.add_argument("--threads", type=int, help="CPU threads per worker (default: cores // workers, at least 1)")
    r.add_argument("--shard", default="1/1", help="k/n: only the k-th of n slices of the grid, the runs notebook 04's "
                                                 "shard k/n takes (one machine of n)")
    r.add_argument("--no-steal", action="store_true", help="a worker runs only its own shard")
    r.add_argument("--refresh", type=float, default=5.0, help="seconds between progress lines")

    s = sub.add_parser("status", parents=[study], help="the grid's progress, once",
                       description="Counts of the grid's runs: done (summary.json), running (a live process holds "
                                   "the run's lock), failed (failed.json), partial (some epochs, nobody on it), "
                                   "waiting; an ETA from the measured epochs. Without --profile, the grid the last "
                                   "run or slurm command wrote to OUT/grid.json.")
    s.add_argument("--profile", choices=list(PROFILES))

    sl = sub.add_parser("slurm", parents=[study, dry], help="submit the grid as a SLURM job array (submitit)",
                        description="Submit the grid as a job array through submitit, one array task per shard k/N "
                                    "(each then takes over waiting runs of the others). Submitting again submits "
                                    "only the shards with runs not done; interrupted runs resume. A task that "
                                    "reaches --time is requeued by submitit.")
    sl.add_argument("--profile", required=True, choices=list(PROFILES))
    sl.add_argument("--array", type=int, required=True, help="N: array tasks (shards of the grid)")
    sl.add_argument("--partition")
    sl.add_argument("--account")
    sl.add_argument("--qos")
    sl.add_argument("--constraint", help="e.g. a100")
    sl.add_argument("--gpus-per-task", type=int, default=1)
    sl.add_argument("--cpus-per-task", type=int, default=4, help="also the task's CPU threads")
    sl.add_argument("--mem-gb", type=int)
    sl.add_argument("--time", default="24:00:00", help="per task: minutes, HH:MM:SS or D-HH:MM:SS")
    sl.add_argument("--parallel", type=int, help="at most this many tasks at once (default: all)")
    sl.add_argument("--setup", action="append", help="a shell line run before each task, e.g. 'module load cuda'")
    sl.add_argument("--executor", default="slurm", choices=["slurm", "local"],
                    help="slurm (sbatch); local: processes on this machine, submitit's LocalExecutor (for testing)")
    sl.add_argument("--wait", action="store_true", help="wait for every task and report (implied by local)")

    w = sub.add_parser("worker", help="(internal) one worker of run", description="One worker: a plan file's shard.")
    w.add_argument("--plan", required=True)
    w.add_argument("--shard", default="1/1")
    w.add_argument("--threads", type=int)
    w.add_argument("--no-steal", action="store_true")
    return ap


def main(argv: list[str] | None = None, reexec: bool = False) -> int:
    """The command line. ``reexec`` (``python -m psi.grid``): a run or slurm command whose profile is
    pinned (:mod:`psi.kernels`) starts itself again under the pinned environment when this one lacks
    it, so that whatever this process trains (slurm's selection) and every worker is pinned; called
    in-process, only the workers' environment is set."""
    ap = _parser()
    a = ap.parse_args(argv)
    if a.command in ("run", "slurm"):
        a.env = kernels.env_for(a.profile, a.cpu_isa)
        if reexec:
            kernels.reexec(a.env, "psi.grid", sys.argv[1:] if argv is None else argv)
    try:
        if a.command == "worker":
            return 1 if work(a.plan, parse_shard(a.shard), a.threads, not a.no_steal) else 0
        if a.device is None:
            a.device = "cuda" if a.command == "slurm" or torch.cuda.is_available() else "cpu"
        if getattr(a, "runs_per_gpu", 1) < 1 or (getattr(a, "workers", None) or 1) < 1:
            ap.error("--runs-per-gpu and --workers must be at least 1")
        return {"run": _cmd_run, "status": _cmd_status, "slurm": _cmd_slurm}[a.command](a)
    except Preempted as e:  # a worker's run got SIGTERM: checkpointed, and the same command resumes it
        print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ParameterError, ValueError, D.DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main(reexec=True))
