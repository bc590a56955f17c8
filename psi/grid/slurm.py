"""``python -m psi.grid slurm``: the study's runs as a submitit job array, one shard per task, each
resubmitted when it is preempted (exit 143, a checkpoint written) until the study is done. A
learning-rate selection still to make is an array of its own before it (its task 1 chooses the
rates, :func:`psi.grid.workers.work`), the study's array held until it has finished (``afterok``):
the submitting host (a login node, often without a GPU) trains nothing."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from psi.engine.config import Config
from psi.engine.files import write_json
from psi.engine.loaders import load_dataset
from psi.grid.estimate import kind_of_device
from psi.grid.plans import print_plan, shard_of, study_of_args
from psi.grid.workers import plan_file, work
from psi.study.plan import cost_order, plan


def _timeout_min(text: str) -> int:
    """SLURM's --time: minutes, HH:MM:SS, or D-HH:MM:SS."""
    days, _, rest = text.rpartition("-")
    parts = [int(v) for v in rest.split(":")]
    if len(parts) == 1:
        return int(days or 0) * 1440 + parts[0]
    h, m, s = ([0] * (3 - len(parts)) + parts)[-3:]
    return int(days or 0) * 1440 + h * 60 + m + (1 if s else 0)


def replan(plan_path: str | os.PathLike) -> None:
    """Write the study's plan file again with every run of the study, the tuned ones at the rates
    the selection chose (not known when it was submitted); each task writes the same list, all or nothing."""
    path = Path(plan_path)
    old = json.loads(path.read_text())
    p = plan(old["settings"], Config.from_dict(old["base"]))
    if p["pending"]:
        raise RuntimeError(f"the learning-rate selection is not finished ({p['pending']} tuned runs have no rate "
                           f"yet; its tasks' logs are in {path.parent / 'slurm'}): submit again")
    write_json(path, {**old, "configs": [asdict(c) for c in cost_order(p["study"])]})


class ShardTask:
    """One SLURM array task: a worker on its shard (:func:`work`) of a plan file (the selection's or
    the study's; ``replan_first``: the study's, made again first by :func:`replan`). On a timeout or
    preemption submitit calls :meth:`checkpoint`, which requeues the same task: its runs resume
    from their last epoch."""

    def __call__(self, plan_path: str, k: int, n: int, threads: int | None, replan_first: bool = False) -> int:
        threads = threads or int(os.environ.get("SLURM_CPUS_PER_TASK", "0")) or None
        if threads:  # inductor's compile workers: the task's cores (read when a first compile imports inductor)
            os.environ["TORCHINDUCTOR_COMPILE_THREADS"] = str(threads)
        if replan_first:
            replan(plan_path)
        failed = work(plan_path, (k, n), threads)
        if failed:
            raise RuntimeError(f"{failed} runs of shard {k}/{n} diverged; their failed.json says why")
        return 0

    def checkpoint(self, *args: Any, **kwargs: Any) -> Any:
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


def _executor(a: argparse.Namespace, folder: Path, gpus: int) -> Any:
    """submitit's executor for the options, or None (said why) where there is no sbatch."""
    import submitit

    if a.executor == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=_timeout_min(a.time), nodes=1, tasks_per_node=1, gpus_per_node=gpus)
        return ex
    # the executor AutoExecutor picks where sbatch exists, named: SLURM's own parameter names
    if not shutil.which("sbatch"):
        print("error: no sbatch on this machine (not a SLURM login node); --executor local runs the array here",
              file=sys.stderr)
        return None
    ex = submitit.SlurmExecutor(folder=folder)
    params: dict[str, Any] = dict(job_name=f"psi-{a.profile}", time=_timeout_min(a.time), nodes=1,
                                  ntasks_per_node=1, cpus_per_task=a.cpus_per_task, gpus_per_node=gpus,
                                  array_parallelism=a.parallel or a.array)
    params.update({k: v for k, v in (("partition", a.partition), ("account", a.account), ("qos", a.qos),
                                      ("constraint", a.constraint), ("setup", a.setup)) if v})
    if a.mem_gb:
        params["mem"] = f"{a.mem_gb}GB"
    ex.update_parameters(**params)
    return ex


def _wait(jobs: list[tuple[str, Any]]) -> int:
    """Wait for every (name, job) and report each; the number that failed."""
    bad = 0
    for what, job in jobs:
        try:
            job.result()
            print(f"  {what}: done")
        except Exception as e:  # noqa: BLE001 - report every task, then fail
            bad += 1
            print(f"error: {what} (job {job.job_id}) failed: {str(e).splitlines()[-1] if str(e) else e}; "
                  f"log {job.paths.stderr}", file=sys.stderr)
    return bad


def _submit_selection(a: argparse.Namespace, ex: Any, out: Path, settings: dict[str, Any], base: Config,
                      select: list[Config]) -> list[tuple[str, Any]]:
    """The selection's array: its starting runs over at most ``--array`` tasks, task 1 then choosing."""
    m = min(a.array, len(select))
    path = plan_file(out, "select", ".slurm", settings, base, select)
    if a.executor != "local":
        ex.update_parameters(job_name=f"psi-{a.profile}-select")
    jobs = ex.map_array(ShardTask(), [str(path)] * m, list(range(1, m + 1)), [m] * m, [a.cpus_per_task] * m)
    print(f"submitted {m} array tasks ({a.executor}) for the learning-rate selection: {len(select)} starting "
          f"runs, then task 1 chooses the rates", flush=True)
    named = [(f"selection task {k}/{m}", job) for k, job in enumerate(jobs, 1)]
    for what, job in named:
        print(f"  {what}: job {job.job_id}, log {job.paths.stdout}", flush=True)
    return named


def cmd_slurm(a: argparse.Namespace) -> int:
    settings, base = study_of_args(a)
    out = Path(a.out)
    p = plan(settings, base)
    p["study"] = cost_order(p["study"])
    n = a.array
    if a.dry_run:
        print_plan(settings, base, p, lambda j: f"array task {j % n + 1}/{n}", a.measure_steps, n, "array tasks")
        return 0
    load_dataset(base.dataset, base.data_dir)  # here, once: the tasks find it decoded (or downloaded)
    folder = out / "logs" / "slurm"  # submitit names each task's files by its job id
    ex = _executor(a, folder, a.gpus_per_task if kind_of_device(a.device) == "cuda" else 0)
    if ex is None:
        return 2
    after = []  # the selection's tasks, when the study's wait for them on SLURM
    if p["pending"]:
        selection = _submit_selection(a, ex, out, settings, base, p["select"])
        if a.executor == "local":  # no dependencies here: the study is submitted once the selection is done
            if _wait(selection):
                print("error: the learning-rate selection failed; nothing else submitted", file=sys.stderr)
                return 1
            p = plan(settings, base)
            p["study"] = cost_order(p["study"])
        else:  # the array's id: afterok holds the study until each of its tasks has ended with status 0
            ex.update_parameters(job_name=f"psi-{a.profile}", dependency=f"afterok:{selection[0][1].job_id.split('_')[0]}",
                                 additional_parameters={"kill_on_invalid_dep": "yes"})
            after = selection
    plan_path = plan_file(out, "study", ".slurm", settings, base, p["study"])
    (out / "grid.json").write_text(json.dumps({"profile": a.profile, "plan": str(plan_path), "select": [
        asdict(c) for c in p["select"]]}, indent=1))
    todo = [k for k in range(1, n + 1) if after  # the tuned runs are not known yet: every shard
            or any(not (c.run_dir() / "summary.json").is_file() for c in shard_of(p["study"], (k, n)))]
    if not todo:
        print(f"all {len(p['study'])} runs are done; nothing submitted ({out / 'runs'})")
        return 0
    jobs = ex.map_array(ShardTask(), [str(plan_path)] * len(todo), todo, [n] * len(todo),
                        [a.cpus_per_task] * len(todo), [bool(after)] * len(todo))
    print(f"submitted {len(jobs)} array tasks ({a.executor}) for shards {todo} of {n}; "
          + ("they start once the selection's tasks have ended well (a failed one cancels them), "
             "with the tuned runs; " if after else f"{len(p['study'])} runs ") + f"in {out / 'runs'}")
    shards = [(f"shard {k}/{n}", job) for k, job in zip(todo, jobs, strict=True)]
    for what, job in shards:
        print(f"  {what}: job {job.job_id}, log {job.paths.stdout}")
    print(f"progress: python -m psi.grid status --out {out}; submit again to resume: finished runs are skipped")
    if not (a.wait or a.executor == "local"):
        return 0
    if after and _wait(after):
        return 1
    return 1 if _wait(shards) else 0
