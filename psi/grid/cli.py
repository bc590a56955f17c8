"""The CIFAR study's grid in one place, and a tool that runs it on many GPUs, CPU workers or a SLURM array.

    python -m psi.grid run --profile paper --device cuda --gpus 0,1,2,3 --runs-per-gpu 4 --out results/paper
    python -m psi.grid run --profile smoke --device cpu --workers 2 --out results/smoke
    python -m psi.grid status --out results/paper
    python -m psi.grid slurm --profile paper --out results/paper --array 25 --partition gpu --time 24:00:00
    python -m psi.grid run --profile paper --device cuda --gpus 0 --out results/paper --dry-run

Notebook 04 and this tool build the same runs from the same functions (:func:`base_config`,
:func:`select_lrs`, :func:`study_configs`), so the run folders one makes are the ones the other
reuses: ``./run_all.sh --profile paper --out DIR`` after ``run`` or ``slurm`` trains nothing again.

Profiles with a learning-rate selection (``lr_grids``: smoke, quick, paper) run it first: ``run`` spreads
the grid's starting rates over its workers, then one worker finishes the selection (the rates
past an edge of the grid, at most two more per optimizer); ``slurm`` submits it as a job array of its
own, the study's array after it (``afterok``), so that the submitting host trains nothing. The
imagenet profile has none.

Each worker runs its shard ``k/N`` of the list (:func:`psi.engine.trainer.sweep`), then every run still
waiting, last first: an idle worker takes over the others' tails. Two processes never train one
run (the run folder's lock, :class:`psi.engine.rundir.RunLocked`), and a finished run is read back, not
trained: running a command again only does what is missing, and an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from psi.engine import kernels
from psi.engine.config import Config
from psi.engine.dataset import DataError
from psi.engine.loaders import load_dataset
from psi.engine.stop import PREEMPTED_EXIT, Preempted
from psi.grid.estimate import kind_of_device
from psi.grid.plans import kernels_line, print_plan, shard_of, study_of_args
from psi.grid.progress import run_states, status_lines, view
from psi.grid.slurm import cmd_slurm
from psi.grid.workers import MPS_COMMAND, launch_workers, mps_running, plan_file, usable_cores, work, worker_slots
from psi.study.plan import SETTINGS, cost_order, plan
from psi.study.profiles import PROFILES, ParameterError, parse_shard

__all__ = ["main"]


def _cmd_run(a: argparse.Namespace) -> int:
    settings, base = study_of_args(a)
    out = Path(a.out)
    if a.gpus and a.workers or not a.gpus and a.runs_per_gpu > 1:
        raise ParameterError("--workers is for the CPU and --runs-per-gpu goes with --gpus")
    if a.gpus and (kind_of_device(a.device) != "cuda" or torch.device(a.device).index is not None):
        raise ParameterError(f"--gpus needs --device cuda (each worker sees its GPUs as cuda), not {a.device!r}")
    workers = worker_slots(a.gpus, a.runs_per_gpu, a.workers or 1, a.procs_per_run)
    n = len(workers)
    threads = a.threads or max(1, usable_cores() // (n * a.procs_per_run))
    shard = parse_shard(a.shard)
    p = plan(settings, base)
    p["study"] = cost_order(shard_of(p["study"], shard))
    tag = "" if shard == (1, 1) else f".shard-{shard[0]}-of-{shard[1]}"
    print(kernels_line(a), flush=True)
    if a.dry_run:
        print_plan(settings, base, p, lambda j: f"worker {j % n + 1}/{n}" + (
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
    ds = load_dataset(base.dataset, base.data_dir)  # once here: a download or decoding is not done n times
    print(f"data: {ds.name} from {ds.source}", flush=True)
    logs = out / "logs"
    failed: list[Path] = []
    if p["pending"] and a.procs_per_run > 1:
        raise ParameterError("the learning-rate selection runs one process per run: make it first with "
                             "--procs-per-run 1 (or pass --set lr_grids={} to skip it), then run with --procs-per-run")
    if p["pending"]:  # the learning-rate selection: starting rates on every worker, then worker 1 chooses
        sel = plan_file(out, "select", tag, settings, base, p["select"])
        failed += launch_workers(sel, workers, threads, not a.no_steal, logs, f"select{tag}", a.refresh, p["select"], 1,
                          a.env)
        p = plan(settings, base)
        p["study"] = cost_order(shard_of(p["study"], shard))
        if p["pending"]:
            print(f"error: the learning-rate selection did not finish; see {logs / f'select{tag}.worker-1-of-{n}.log'}",
                  file=sys.stderr)
            return 1
    plan_path = plan_file(out, "study", tag, settings, base, p["study"])
    (out / "grid.json").write_text(json.dumps({"profile": a.profile, "plan": str(plan_path), "select": [
        asdict(c) for c in p["select"]]}, indent=1))
    if all((c.run_dir() / "summary.json").is_file() for c in p["study"]):
        print(f"study{tag}: all {len(p['study'])} runs are done; nothing to train")
    else:
        # a data-parallel worker's processes must agree on every run they take: no stealing (which races)
        failed += launch_workers(plan_path, workers, threads, not a.no_steal and a.procs_per_run == 1, logs, f"study{tag}",
                          a.refresh, p["study"], a.procs_per_run, a.env)
    states = run_states(p["select"] + p["study"])
    for line in status_lines(p["select"] + p["study"]):
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
        settings, base = study_of_args(a)
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
    for line in status_lines(configs):
        print(line)
    return 0


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
                            "the bit on any x86-64 machine (docs/cpu-study.md); native: the CPU's best "
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
                                    "(each then takes over waiting runs of the others), after the learning-rate "
                                    "selection's own array when it is not made yet. Submitting again submits "
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
    pinned (:mod:`psi.engine.kernels`) starts itself again under the pinned environment when this one lacks
    it, so that every worker (and every SLURM task, which inherits it) is pinned; called in-process,
    only ``run``'s workers' environment is set."""
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
        return {"run": _cmd_run, "status": _cmd_status, "slurm": cmd_slurm}[a.command](a)
    except Preempted as e:  # a worker's run got SIGTERM: checkpointed, and the same command resumes it
        print(f"stopped: {e}", file=sys.stderr)
        return PREEMPTED_EXIT
    except (ParameterError, ValueError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


