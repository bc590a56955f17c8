"""Faults that lose nothing (psi.train): a checkpoint write killed at any point, a full disk, a run folder
made with other settings, a NaN loss, SIGTERM. Each leaves the last good checkpoint, says what happened
and what to do, and the same command then gives the uninterrupted run's numbers."""

import errno
import json
import os
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from psi.engine import epoch, files, trainer
from psi.engine.config import Config
from psi.engine.files import DiskFull
from psi.engine.rundir import ConfigMismatch, read_metrics
from psi.engine.stop import PREEMPTED_EXIT, STOP_POLL, Preempted, TrainingDiverged
from psi.study.results import load_metrics
from tests.procs import ROOT, Gated, env, torchrun, torchrun_script
from tests.runs import metric_rows, only_run
from tests.test_gpu_path import _run_cut

FAST = ["--dataset", "synthetic", "--model", "smallcnn", "--batch-size", "50", "--subset", "500", "--quiet",
        "--threads", "1", "--optimizer", "psi-sgdm", "--epochs", "3"]
STEPS = 10  # 500 images in batches of 50


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "psi.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env(), timeout=600)


_run_dir, _rows = only_run, metric_rows


def _epoch_of(run_dir: Path) -> int:
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["epoch"]


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> list[dict]:
    """The uninterrupted run's metrics (a process of its own, as every interrupted one here)."""
    out = tmp_path_factory.mktemp("whole")
    assert _cli(*FAST, "--out", str(out)).returncode == 0
    return _rows(_run_dir(out))


def _cfg(out: Path, **kw) -> Config:
    base = dict(dataset="synthetic", model="smallcnn", optimizer="psi-sgdm", epochs=3, batch_size=50, subset=500,
                out=str(out), progress=False)
    return Config(**{**base, **kw})


@pytest.fixture(scope="module")
def whole_here(tmp_path_factory) -> list[dict]:
    """The uninterrupted run's metrics, trained in this process (the in-process tests compare with it)."""
    cfg = _cfg(tmp_path_factory.mktemp("whole_here"))
    trainer.run(cfg)
    return _rows(cfg.run_dir())


# -- kill -9 in the middle of a checkpoint write ---------------------------------------------

# A psi.train process that SIGKILLs itself inside its second checkpoint write (epoch 1's) at POINT:
# "mid-write" (4 KiB and a bit of the temporary file written), "before-rename" (written and fsynced,
# not yet renamed), "after-rename" (renamed, the folder not yet fsynced).
_KILLER = """\
import os, signal, sys
from pathlib import Path
from psi.engine import files
from psi.train import main
from tests.test_faults import _Full
point, argv = sys.argv[1], sys.argv[2:]
writes = [0]

def second_checkpoint(path):
    if Path(path).name == "checkpoint.pt":
        writes[0] += 1
        return writes[0] == 2
    return False

def die():
    os.kill(os.getpid(), signal.SIGKILL)

real_temp, real_replace = files._temp_file, os.replace
if point == "mid-write":
    def temp(path):
        f, tmp = real_temp(path)
        return (_Full(f, 4096, full=die) if second_checkpoint(path) else f), tmp
    files._temp_file = temp
else:
    def replace(src, dst):
        last = second_checkpoint(dst)
        if last and point == "before-rename":
            die()
        real_replace(src, dst)
        if last:
            die()
    files.os.replace = replace
main(argv)
"""


@pytest.mark.parametrize("point,kept_epoch", [("mid-write", 0), ("before-rename", 0), ("after-rename", 1)])
def test_a_checkpoint_write_killed_at_any_point_leaves_a_loadable_one(tmp_path, whole, point, kept_epoch):
    r = subprocess.run([sys.executable, "-c", _KILLER, point, *FAST, "--out", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == -signal.SIGKILL, r.stderr[-2000:]
    d = _run_dir(tmp_path)
    assert _epoch_of(d) == kept_epoch  # the previous checkpoint, or the new one whole: never a part
    assert bool(list(d.glob("checkpoint.pt.*.tmp"))) == (point != "after-rename")  # what the kill left
    assert _cli(*FAST, "--out", str(tmp_path)).returncode == 0
    assert not list(d.glob("*.tmp"))  # cleared by the run that resumed
    assert _rows(d) == whole


def test_the_rename_of_every_write_is_made_durable(tmp_path, monkeypatch):
    """After os.replace, the folder itself is fsynced (else a power cut may bring back the old name)."""
    real, synced = os.fsync, []

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real(fd)

    monkeypatch.setattr(files.os, "fsync", fsync)
    trainer.run(_cfg(tmp_path, epochs=1))
    assert True in synced and False in synced


# -- a full disk ------------------------------------------------------------------------------

def _no_space() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


class _Full:
    """A file on a disk that fills after ``room`` bytes: what fits is written, then ``full()`` (by
    default ENOSPC, as a full disk; the kill -9 tests' child dies there instead)."""

    def __init__(self, f, room: int, full=_no_space):
        self.f, self.room, self.full = f, room, full

    def write(self, b):
        if len(b) > self.room:
            self.f.write(b[:self.room])
            self.f.flush()
            self.full()
        self.room -= len(b)
        return self.f.write(b)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()

    def __getattr__(self, name):
        return getattr(self.f, name)


def test_a_full_disk_says_so_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, whole_here):
    cfg = _cfg(tmp_path)
    real, writes = files._temp_file, []

    def temp(path):
        f, tmp = real(path)
        if path.name == "checkpoint.pt":
            writes.append(path)
            if len(writes) == 2:  # epoch 1's checkpoint: the disk fills in the middle of it
                return _Full(f, 5000), tmp
        return f, tmp

    with monkeypatch.context() as m:
        m.setattr(files, "_temp_file", temp)
        with pytest.raises(DiskFull, match=r"no space left for .*checkpoint\.pt.*previous checkpoint\.pt is "
                                                  r"intact.*run the same command again"):
            trainer.run(cfg)
    d = cfg.run_dir()
    assert _epoch_of(d) == 0 and not list(d.glob("*.tmp"))
    assert trainer.run(cfg)["epochs"] == 3
    assert _rows(d) == whole_here


def test_a_metrics_line_cut_by_a_full_disk_is_dropped_on_resume(tmp_path, monkeypatch, whole_here):
    cfg = _cfg(tmp_path)
    real_open, appends = open, []

    def full_open(path, mode="r", *a, **kw):
        f = real_open(path, mode, *a, **kw)
        if Path(path).name == "metrics.jsonl" and mode == "a":
            appends.append(path)
            if len(appends) == 2:  # epoch 1's row: half of it reaches the disk
                return _Full(f, 40)
        return f

    with monkeypatch.context() as m:
        m.setattr(files, "open", full_open, raising=False)
        with pytest.raises(DiskFull, match="no space left for .*metrics.jsonl"):
            trainer.run(cfg)
    d = cfg.run_dir()
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 2  # one row and a torn one
    assert len(read_metrics(d / "metrics.jsonl")) == 1 and len(load_metrics(tmp_path)) == 1  # readable
    assert trainer.run(cfg)["epochs"] == 3
    assert _rows(d) == whole_here


# -- a run folder made with other settings ----------------------------------------------------

def test_a_run_folder_made_with_other_settings_refuses_to_resume_naming_them(tmp_path, monkeypatch):
    cfg = _cfg(tmp_path)
    _run_cut(cfg, None, 1, monkeypatch)  # a crash right after epoch 0's checkpoint
    d = cfg.run_dir()
    path = d / "config.json"
    record = json.loads(path.read_text())
    other = {**record, "gamma": 0.5, "groups": [{**record["groups"][0], "momentum": 0.5}, *record["groups"][1:]]}
    path.write_text(json.dumps(other))  # what another version, with other defaults, would have recorded
    before = {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != ".lock"}
    with pytest.raises(ConfigMismatch, match=r"gamma: 0\.5 there, 0\.2 here; groups: .*Fix: run it with"):
        trainer.run(cfg)
    assert {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.name != ".lock"} == before


def test_where_and_how_fast_a_run_went_do_not_stop_its_resume(tmp_path, monkeypatch, whole_here):
    cfg = _cfg(tmp_path)
    _run_cut(cfg, None, 1, monkeypatch)  # a crash right after epoch 0's checkpoint
    path = cfg.run_dir() / "config.json"
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "out": "/elsewhere", "data_dir": "/data", "progress": True,
                                "world_size": 1, "kernels": {"cpu_capability": "AVX512"}}))
    assert trainer.run(cfg)["epochs"] == 3
    assert _rows(cfg.run_dir()) == whole_here


# -- a NaN loss -------------------------------------------------------------------------------

def test_a_nan_loss_names_its_epoch_and_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    real, calls = torch.nn.functional.cross_entropy, [0]

    def poisoned(logits, y, **kw):
        loss = real(logits, y, **kw)
        if torch.is_grad_enabled():  # training steps only (evaluation runs under inference mode)
            calls[0] += 1
            if calls[0] == STEPS + 3:  # epoch 2, step 3
                return loss * float("nan")
        return loss

    monkeypatch.setattr(epoch, "F", types.SimpleNamespace(cross_entropy=poisoned))
    cfg = _cfg(tmp_path)
    with pytest.raises(TrainingDiverged, match=r"became nan at step 3 of 10 in epoch 2; the checkpoint after "
                                                     r"epoch 1 and the metrics of the 1 epochs before are kept"):
        trainer.run(cfg)
    d = cfg.run_dir()
    assert json.loads((d / "failed.json").read_text())["step"] == 2  # 0-based, as "epoch"
    assert _epoch_of(d) == 0 and len(_rows(d)) == 1


# -- SIGTERM ----------------------------------------------------------------------------------

def test_sigterm_checkpoints_the_step_reached_and_the_same_command_resumes_it(tmp_path, whole):
    args = [*FAST, "--out", str(tmp_path)]
    with Gated(args, epoch=1, log=tmp_path / "run.log", steps=3) as run:  # held before epoch 1's 4th step
        run.wait_for_gate()
        run.proc.send_signal(signal.SIGTERM)  # noted; the step under way finishes, then the run stops
        assert run.release() == PREEMPTED_EXIT
    assert "stopped by SIGTERM at step 4 of 10 in epoch 2" in (tmp_path / "run.log").read_text()
    d = _run_dir(tmp_path)
    ck = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert ck["epoch"] == 0 and ck["partial"]["epoch"] == 1 and ck["partial"]["step"] == 4
    assert len(_rows(d)) == 1
    assert _cli(*args).returncode == 0
    assert _rows(d) == whole  # the same bits as a run never stopped


# SIGTERM reaches one process of a data-parallel run (rank 0, in epoch 1's 4th step): all of them stop at
# the same step boundary, checkpoint and exit 143; the same torchrun command resumes to the same bits.
_TERM_RANK0 = """
import os, signal
from psi.engine import epoch, stop
from psi.train import main
real, calls = epoch.set_lr, [0]  # looked up there by each step

def set_lr(opt, factor):
    calls[0] += 1
    if calls[0] == {at} and dist.get_rank() == 0:
        os.kill(os.getpid(), signal.SIGTERM)
    real(opt, factor)

epoch.set_lr = set_lr
stop.STOP_POLL = {poll}
main({argv!r})
"""


@pytest.mark.parametrize("poll,stopped", [(2, (0, 4)), (STOP_POLL, (1, None))],
                         ids=["mid-epoch", "at-the-epoch-end"])
def test_sigterm_to_one_process_stops_a_data_parallel_run_together_and_it_resumes(tmp_path, poll, stopped):
    """The processes agree every ``poll`` steps and at every epoch's end: polled every 2 steps, they
    stop before epoch 1's step 4 (0-based); every 16, at the end of epoch 1 (10 steps)."""
    args = [*FAST, "--threads", "1"]
    whole = subprocess.run([*torchrun(2), "-m", "psi.train", *args, "--out", str(tmp_path / "whole")], cwd=ROOT,
                           capture_output=True, text=True, env=env(), timeout=600)
    assert whole.returncode == 0, whole.stderr[-2000:]
    out = tmp_path / "cut"
    r = torchrun_script(tmp_path / "term.py", _TERM_RANK0.format(at=STEPS + 4, poll=poll,
                                                                  argv=[*args, "--out", str(out)]))
    assert r.returncode != 0 and r.stderr.count("stopped by SIGTERM") == 2, r.stderr[-3000:]
    ck = torch.load(_run_dir(out) / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert (ck["epoch"], ck["partial"] and ck["partial"]["step"]) == stopped
    again = subprocess.run([*torchrun(2), "-m", "psi.train", *args, "--out", str(out)], cwd=ROOT,
                           capture_output=True, text=True, env=env(), timeout=600)
    assert again.returncode == 0, again.stderr[-2000:]
    assert _rows(_run_dir(out)) == _rows(_run_dir(tmp_path / "whole"))


def test_a_grid_worker_stopped_by_sigterm_exits_143(monkeypatch, capsys):
    """psi.grid's worker passes the stop on as the exit status a scheduler reads as 'terminated'."""
    from psi.grid import cli

    def stopped(*a, **kw):
        raise Preempted("r: stopped by SIGTERM at step 4 of 10 in epoch 2; ...")

    monkeypatch.setattr(cli, "work", stopped)
    assert cli.main(["worker", "--plan", "plan.json"]) == 143
    assert "stopped: r: stopped by SIGTERM" in capsys.readouterr().err
