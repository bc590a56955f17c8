"""The grid's workers: the plan file they share, each worker's share of the runs (stealing what others left),
their slots on GPUs (several runs per GPU, MPS) or CPU cores, and the processes that run them."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from psi.engine.config import Config
from psi.engine.distributed import end_process_group
from psi.engine.loaders import load_dataset
from psi.engine.trainer import sweep
from psi.grid.progress import view
from psi.study.plan import select_lrs, selection_lock, trained_here
from psi.study.profiles import ParameterError

MPS_COMMAND = "nvidia-cuda-mps-control -d"


def plan_file(out: Path, phase: str, tag: str, settings: dict[str, Any], base: Config,
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
    ds = load_dataset(base.dataset, base.data_dir)
    configs = [Config.from_dict(c) for c in p["configs"]]
    k, n = shard
    mine = [c for i, c in enumerate(configs) if i % n == k - 1]
    selecting = p["phase"] == "select"
    failed = set()
    # a data-parallel worker (under torchrun): its processes must take the same runs in the same order, so
    # one pass over its own shard; a second look at a run one of them just finished could differ between them
    together = int(os.environ.get("WORLD_SIZE", "1")) > 1
    passes_of = [mine] if together else [mine, configs[::-1] if steal else mine]
    with selection_lock(base, shared=True) if selecting else contextlib.nullcontext():
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
                if "failed" not in r and "locked" not in r and not trained_here(c):
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


def usable_cores() -> int:
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


def launch_workers(plan_path: Path, workers: list[str | None], threads: int, steal: bool, logs: Path,
            name: str, refresh: float, configs: list[Config], procs_per_run: int = 1,
            base_env: dict[str, str] | None = None) -> list[Path]:
    """Start one worker per entry of ``workers`` (its GPUs, or None on the CPU), show the progress
    of ``configs`` until all have exited; return the logs of those that failed. The workers'
    environment is ``base_env`` (default: this process's; :func:`psi.engine.kernels.env_for` pins it) with
    ``threads`` (each process's share of the cores) for ``OMP_NUM_THREADS`` and ``TORCHINDUCTOR_COMPILE_THREADS``."""
    procs = []
    n = len(workers)
    for k, gpu in enumerate(workers, 1):
        # its share of the cores: for torch's threads, inductor's compile workers (by default as many as the
        # machine has cores, in each of the workers) and an image loader's processes
        share = str(max(1, threads))
        env = dict(os.environ if base_env is None else base_env, PSI_PROGRESS="0", OMP_NUM_THREADS=share,
                   TORCHINDUCTOR_COMPILE_THREADS=share, PSI_WORKER_CPUS=str(max(1, threads) * procs_per_run))
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
