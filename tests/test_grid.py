"""psi.grid and run_all.sh's shards: the study's grid trained by worker processes, by a job array
(submitit's local executor), by two run_all.sh shards at once into one folder; nothing twice.

The smoke grid is trained once (``grid_run``); the other tests start from copies of its run
folders, so that each trains only what it tests."""

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import submitit
import torch

import psi.study.plan
from psi.engine import trainer
from psi.grid import cli, slurm
from psi.grid.cli import _parser, main
from psi.grid.plans import study_of_args
from psi.grid.progress import run_states
from psi.study.plan import base_config, cost_order, distinct, plan, read_selected, study_configs
from psi.study.profiles import study_settings

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PSI_PROGRESS="0")


def _grid(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psi.grid", *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=timeout)


def _study(args: list[str], out: Path):
    """The settings and base config of ``python -m psi.grid slurm ARGS --out OUT --device cpu``."""
    return study_of_args(_parser().parse_args(["slurm", *args, "--out", str(out), "--device", "cpu", "--array", "1"]))


def _smoke(out: Path):
    """The smoke profile's settings and base config with runs in ``out/runs``, as psi.grid builds them."""
    settings = study_settings("smoke")
    return settings, base_config(settings, out / "runs", "cpu")


def _summaries(out: Path) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def _copy_runs(src: Path, dst: Path, keep) -> None:
    """Copy the run folders of ``src/runs`` for which ``keep(name, config)`` holds, and the selection's files."""
    (dst / "runs").mkdir(parents=True, exist_ok=True)
    for d in (src / "runs").iterdir():
        if d.name.startswith("selected_lr-"):
            shutil.copy(d, dst / "runs")
        elif d.is_dir() and keep(d.name, json.loads((d / "config.json").read_text())):
            shutil.copytree(d, dst / "runs" / d.name)


@pytest.fixture(scope="module")
def grid_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("grid")
    r = _grid("run", "--profile", "smoke", "--device", "cpu", "--workers", "2", "--out", str(out), "--refresh", "1")
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_run_trains_the_smoke_grid_with_two_workers_and_a_second_call_nothing(grid_run, capsys):
    out, stdout = grid_run
    settings, base = _smoke(out)
    p = plan(settings, base)
    every = p["select"] + p["study"]
    assert p["pending"] == 0 and len(p["study"]) > len(settings["optimizers"]) * len(settings["seeds"])  # tuned too
    assert len(run_states(every)["done"]) == len(every) and "0 waiting" in stdout.splitlines()[-1]
    trained = [set(re.findall(r" (\S+): done", (out / "logs" / f"study.worker-{k}-of-2.log").read_text()))
               for k in (1, 2)]
    assert all(trained) and not trained[0] & trained[1]  # both worked, never on the same run
    assert trained[0] | trained[1] == {c.run_dir().name for c in p["study"]}
    before = _summaries(out)
    assert main(["run", "--profile", "smoke", "--device", "cpu", "--workers", "2", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "nothing to train" in text and "select:" not in text and _summaries(out) == before


def test_two_run_all_shards_at_once_into_one_folder(grid_run, tmp_path):
    src, _ = grid_run
    settings, base = _smoke(tmp_path)
    runs = distinct(study_configs(settings, base, read_selected(settings, _smoke(src)[1])))
    slices = [[c.run_dir().name for i, c in enumerate(runs) if i % 2 == k] for k in (0, 1)]
    fresh = set(slices[0][:2] + slices[1][:2])  # each shard trains two runs, reads back the rest
    _copy_runs(src, tmp_path, lambda name, cfg: name not in fresh)
    before = _summaries(tmp_path)
    cmd = ["bash", "run_all.sh", "--profile", "smoke", "--out", str(tmp_path), "--threads", "1", "--shard"]
    procs = [subprocess.Popen(cmd + [f"{k}/2"], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for k in (1, 2)]
    outs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs
    assert all("./run_all.sh --profile smoke --out" in o for o in outs)  # what to run when all shards are done
    executed = sorted(p.name for p in (tmp_path / "executed").iterdir())
    assert executed == [f"04_cifar.shard-{k}-of-2.{ext}" for k in (1, 2) for ext in ("ipynb", "log")]
    assert all(list((tmp_path / "figures" / f"04_cifar.shard-{k}-of-2").glob("*.png")) for k in (1, 2))
    printed = []
    for k in (1, 2):
        nb = json.loads((tmp_path / "executed" / f"04_cifar.shard-{k}-of-2.ipynb").read_text())
        text = "".join("".join(o.get("text", "")) for c in nb["cells"] for o in c.get("outputs", []))
        assert "another process is on it" not in text and "Error" not in text
        printed.append(re.search(rf"this shard: {k}/2, \d+ runs: (.*)", text).group(1).split())
    assert printed == slices and not set(printed[0]) & set(printed[1])
    assert set(printed[0]) | set(printed[1]) == {c.run_dir().name for c in runs}
    assert all((tmp_path / "runs" / c.run_dir().name / "summary.json").is_file() for c in runs)
    seeded = _summaries(tmp_path)
    assert all(seeded[k] == v for k, v in before.items())  # the runs psi.grid made are read back, not trained
    pids = [{json.loads((tmp_path / "runs" / name / ".lock").read_text())["pid"] for name in s[:2]} for s in slices]
    assert len(pids[0]) == len(pids[1]) == 1 and pids[0] != pids[1]  # each trained by its own shard's kernel


def test_slurm_array_on_the_local_executor_and_resubmission(grid_run, tmp_path):
    src, _ = grid_run
    settings, base = _smoke(tmp_path)
    study = cost_order(plan(settings, _smoke(src)[1])["study"])  # the order slurm's array tasks split
    fresh = {c.run_dir().name for c in study[:4]}  # 2 runs of each of the 2 array tasks are missing
    _copy_runs(src, tmp_path, lambda name, cfg: name not in fresh)
    before = _summaries(tmp_path)
    args = ["slurm", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path), "--array", "2", "--executor",
            "local", "--cpus-per-task", "1", "--time", "10"]
    r = _grid(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "submitted 2 array tasks (local) for shards [1, 2] of 2" in r.stdout and "job " in r.stdout
    logs = re.findall(r"job \d+, log (\S+)", r.stdout)
    assert len(logs) == 2 and all(Path(log).is_file() and Path(log).parent == tmp_path / "logs" / "slurm" for log in logs)
    p = plan(settings, base)
    assert all((c.run_dir() / "summary.json").is_file() for c in p["select"] + p["study"])
    now = _summaries(tmp_path)
    assert set(now) - set(before) == fresh and all(now[k] == v for k, v in before.items())  # finished: skipped
    r = _grid(*args)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "nothing submitted" in r.stdout and _summaries(tmp_path) == now


def test_dry_run_lists_every_run_once_with_an_estimate_and_trains_nothing(grid_run, tmp_path, capsys):
    assert main(["run", "--profile", "smoke", "--device", "cpu", "--workers", "2", "--out", str(tmp_path),
                      "--dry-run", "--measure-steps", "5"]) == 0
    stdout = capsys.readouterr().out
    settings, base = _smoke(tmp_path)
    p = plan(settings, base)  # nothing selected yet: the selection's runs and the F.2 runs, tuned ones pending
    assert p["pending"] == len(settings["optimizers"]) * len(settings["seeds"])
    for c in p["select"] + p["study"]:
        assert stdout.count(c.run_dir().name) == 1 and str(c.run_dir()) in stdout
    assert re.search(r"-> worker [12]/2", stdout) and f"+ {p['pending']} tuned runs" in stdout
    assert "smallcnn" in stdout and "estimate from 5 steps of psi-sgdm on cpu" in stdout
    assert re.search(r"estimate: \d+\.\d+ cpu-hours for the 15 runs", stdout)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())

    out, _ = grid_run  # finished runs: their epochs are the measurement; slurm's listing gives array tasks
    before = sorted((out / "runs").iterdir()), _summaries(out)
    assert main(["slurm", "--profile", "smoke", "--device", "cpu", "--out", str(out), "--array", "3",
                      "--dry-run"]) == 0
    stdout = capsys.readouterr().out
    p = plan(settings, _smoke(out)[1])
    assert all(stdout.count(c.run_dir().name) == 1 for c in p["select"] + p["study"])
    assert "array task 3/3" in stdout and "measured: median of" in stdout and " done" in stdout
    assert (sorted((out / "runs").iterdir()), _summaries(out)) == before


def test_status_counts_a_fabricated_folder(tmp_path, capsys):
    settings, base = _smoke(tmp_path)
    p = plan(settings, base)
    runs = [c.run_dir() for c in p["select"] + p["study"]]
    for d in runs[:6]:
        d.mkdir(parents=True)
    for d in runs[:3]:
        (d / "summary.json").write_text("{}")
    (runs[3] / "failed.json").write_text(json.dumps({"error": "the training loss became nan in epoch 2"}))
    (runs[4] / "metrics.jsonl").write_text(json.dumps({"epoch": 0, "images_per_second": 500.0}) + "\n")
    with open(runs[5] / ".lock", "w") as held:  # a live holder of a run folder's lock (this process)
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(json.dumps({"pid": os.getpid(), "host": "here", "since": "now"}))
        held.flush()
        assert main(["status", "--out", str(tmp_path), "--profile", "smoke", "--device", "cpu"]) == 0
    text = capsys.readouterr().out
    assert f"{len(runs)} runs: 3 done, 1 running, 1 failed, 1 partial, {len(runs) - 6} waiting" in text
    assert "failed (a selection rate: not chosen): " in text and "loss became nan" in text  # runs[3]: a selection run
    assert f"pid {os.getpid()} on here" in text
    assert f"+ {p['pending']} tuned runs" in text and "ETA" in text
    assert main(["status", "--out", str(tmp_path / "none")]) == 2  # no grid.json and no --profile


# a grid trained in seconds: one optimizer, two starting rates, one seed, one epoch of 100 images
TINY = ["--profile", "smoke", "--set", "optimizers=['sgd']", "--set", "lr_grids={'sgd': [0.03, 0.3]}", "--set",
        "lr_extend=0", "--set", "seeds=[0]", "--set", "epochs=1", "--set", "subset=100", "--set", "val_size=50"]


def _nothing_trains_here(monkeypatch) -> None:
    """This process (the submitting host) has no GPU and trains nothing: a run or a selection here raises."""
    def here(*a, **kw):
        raise AssertionError("trained in the submitting process")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(trainer, "_train", here)
    monkeypatch.setattr(psi.study.plan, "select_lrs", here)
    monkeypatch.setattr(slurm, "select_lrs", here, raising=False)


def test_slurm_submits_the_selection_as_jobs_and_the_study_after_it(tmp_path, monkeypatch, capsys):
    _nothing_trains_here(monkeypatch)
    assert main(["slurm", *TINY, "--device", "cpu", "--out", str(tmp_path), "--array", "2", "--executor", "local",
                 "--cpus-per-task", "1", "--time", "10"]) == 0
    out = capsys.readouterr().out
    assert "submitted 2 array tasks (local) for the learning-rate selection" in out
    assert "submitted 2 array tasks (local) for shards [1, 2] of 2" in out
    settings, base = _study(TINY, tmp_path)
    p = plan(settings, base)
    assert p["pending"] == 0 and any(c.setting == "tuned" for c in p["study"])  # chosen, then trained
    logs = {what: [Path(f).read_text() for f in re.findall(rf"{what} \d+/2: job \S+, log (\S+)", out)]
            for what in ("selection task", "shard")}
    started = {what: set(re.findall(r" (\S+): start", "".join(texts))) for what, texts in logs.items()}
    assert started["selection task"] == {c.run_dir().name for c in p["select"]}  # in the selection's jobs
    assert started["shard"] == {c.run_dir().name for c in p["study"]}  # in the study's, after it
    assert "choosing the learning rates" in logs["selection task"][0]
    chosen = max(f.stat().st_mtime_ns for f in (tmp_path / "runs").glob("selected_lr-*"))
    for c in p["select"] + p["study"]:
        summary = json.loads((c.run_dir() / "summary.json").read_text())
        assert summary["trained_by"]["pid"] != os.getpid()
        if c in p["study"]:
            assert (c.run_dir() / "summary.json").stat().st_mtime_ns > chosen
    study_plan = json.loads((tmp_path / "grid.json").read_text())["plan"]
    written = json.loads(Path(study_plan).read_text())
    slurm.replan(study_plan)  # what a study task does first on SLURM, submitted before the rates were chosen
    assert json.loads(Path(study_plan).read_text()) == written


class _Sbatch:
    """submitit's SlurmExecutor as sbatch would see it: the parameters and arguments of each array submitted."""

    arrays: list[tuple[dict, list]] = []

    def __init__(self, folder):
        self.folder, self.parameters = Path(folder), {}

    def update_parameters(self, **kw):
        self.parameters.update(kw)

    def map_array(self, fn, *args):
        job = 1000 + len(self.arrays)
        self.arrays.append((dict(self.parameters), [fn, *args]))
        return [SimpleNamespace(job_id=f"{job}_{i}", paths=SimpleNamespace(stdout=self.folder / f"{job}_{i}.out"))
                for i in range(len(args[0]))]


def test_slurm_on_a_login_node_without_a_gpu_submits_the_selection_with_the_study_after_it(tmp_path, monkeypatch):
    _nothing_trains_here(monkeypatch)
    monkeypatch.setattr(submitit, "SlurmExecutor", _Sbatch)
    monkeypatch.setattr(_Sbatch, "arrays", [])
    monkeypatch.setattr(shutil, "which", lambda name: f"/usr/bin/{name}")
    assert main(["slurm", *TINY, "--out", str(tmp_path), "--array", "3"]) == 0  # --device: cuda
    (select, sel_args), (study, study_args) = _Sbatch.arrays
    phases = [{json.loads(Path(f).read_text())["phase"] for f in args[1]} for args in (sel_args, study_args)]
    assert phases == [{"select"}, {"study"}]
    assert sel_args[2] == [1, 2] and sel_args[3] == [2, 2]  # the 2 starting rates: 2 tasks
    assert study_args[2] == [1, 2, 3] and study_args[3] == [3, 3, 3]  # the tuned runs' shards are not known yet
    assert "dependency" not in select and study["dependency"] == "afterok:1000"  # after every selection task
    assert select["gpus_per_node"] == study["gpus_per_node"] == 1
    sbatch = submitit.slurm.slurm._make_sbatch_string(command="python -u -m submitit.core._submit", folder=tmp_path,
                                                      **study)
    assert "#SBATCH --dependency=afterok:1000\n" in sbatch and "#SBATCH --kill-on-invalid-dep=yes\n" in sbatch
    assert study_args[5] == [True] * 3  # each study task plans again once the selection is done: not yet
    with pytest.raises(RuntimeError, match="the learning-rate selection is not finished"):
        slurm.replan(study_args[1][0])
    assert not list((tmp_path / "runs").glob("*/summary.json"))


def test_each_worker_compiles_with_its_share_of_the_cores(tmp_path, monkeypatch):
    """4 workers (2 GPUs x 2 runs) on 16 cores: 4 threads each, inductor's compile workers too (not 16 each)."""
    launched = []

    class Worker:
        returncode = 0

        def __init__(self, cmd, env, **kw):
            launched.append(env)

        def poll(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Worker)
    monkeypatch.setattr(cli, "usable_cores", lambda: 16)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    main(["run", *TINY, "--device", "cuda", "--gpus", "0,1", "--runs-per-gpu", "2", "--out", str(tmp_path)])
    assert [e["CUDA_VISIBLE_DEVICES"] for e in launched] == ["0", "1", "0", "1"]  # the selection's workers
    assert all(e["OMP_NUM_THREADS"] == e["TORCHINDUCTOR_COMPILE_THREADS"] == "4" for e in launched)
    monkeypatch.setattr(cli, "usable_cores", lambda: 2)  # fewer cores than workers: one each
    launched.clear()
    main(["run", *TINY, "--device", "cuda", "--gpus", "0,1", "--runs-per-gpu", "2", "--out", str(tmp_path)])
    assert len(launched) == 4 and all(e["TORCHINDUCTOR_COMPILE_THREADS"] == "1" for e in launched)

    seen = []  # a SLURM task: its --cpus-per-task (or SLURM_CPUS_PER_TASK)
    monkeypatch.setattr(slurm, "work", lambda *a: seen.append(os.environ["TORCHINDUCTOR_COMPILE_THREADS"]) or 0)
    monkeypatch.setenv("TORCHINDUCTOR_COMPILE_THREADS", "32")  # restored afterwards
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert slurm.ShardTask()("plan.json", 1, 2, None) == slurm.ShardTask()("plan.json", 1, 2, 3) == 0
    assert seen == ["6", "3"]
