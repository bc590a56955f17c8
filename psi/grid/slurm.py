"""``python -m psi.grid slurm``: the study's runs as a submitit job array, one shard per task, each
resubmitted when it is preempted (exit 143, a checkpoint written) until the study is done."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from psi.engine.loaders import load_dataset
from psi.grid.estimate import kind_of_device
from psi.grid.plans import print_plan, shard_of, study_of_args
from psi.grid.workers import plan_file, work
from psi.study.plan import cost_order, plan, select_lrs


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


def cmd_slurm(a: argparse.Namespace) -> int:
    settings, base = study_of_args(a)
    out = Path(a.out)
    p = plan(settings, base)
    p["study"] = cost_order(p["study"])
    n = a.array
    if a.dry_run:
        print_plan(settings, base, p, lambda j: f"array task {j % n + 1}/{n}", a.measure_steps, n, "array tasks")
        return 0
    import submitit

    ds = load_dataset(base.dataset, base.data_dir)  # here, once: the tasks find it decoded (or downloaded)
    if p["pending"]:
        print(f"learning-rate selection first, in this process on {base.device} ({len(p['select'])} starting runs)",
              flush=True)
        select_lrs(settings, base, ds)
        p = plan(settings, base)
        p["study"] = cost_order(p["study"])
    plan_path = plan_file(out, "study", ".slurm", settings, base, p["study"])
    (out / "grid.json").write_text(json.dumps({"profile": a.profile, "plan": str(plan_path), "select": [
        asdict(c) for c in p["select"]]}, indent=1))
    todo = [k for k in range(1, n + 1)
            if any(not (c.run_dir() / "summary.json").is_file() for c in shard_of(p["study"], (k, n)))]
    if not todo:
        print(f"all {len(p['study'])} runs are done; nothing submitted ({out / 'runs'})")
        return 0
    folder = out / "logs" / "slurm"  # submitit names each task's files by its job id
    gpus = a.gpus_per_task if kind_of_device(a.device) == "cuda" else 0
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
