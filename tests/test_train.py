"""psi.engine.models, psi.engine.optimizers, psi.train: runs, resume after kill -9, NaN, CLI, shards, DDP."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psi.engine import config, models, trainer
from psi.engine.config import lr_factor
from psi.engine.optimizers import OPTIMIZERS, build_optimizer
from psi.train import _parser, configs_from_args
from tests.procs import env, kill_at_epoch, torchrun
from tests.runs import metric_rows, only_run

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--dataset", "synthetic", "--model", "smallcnn", "--batch-size", "50", "--subset", "500", "--quiet",
        "--threads", "1"]


@pytest.mark.parametrize("name,millions", [("resnet20", 0.27), ("resnet32", 0.46), ("resnet44", 0.66),
                                           ("resnet56", 0.85)])
def test_cifar_resnet_sizes(name, millions):
    m = models.build_model(name)
    assert abs(sum(p.numel() for p in m.parameters()) / 1e6 - millions) < 0.01
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_trains(name):
    torch.manual_seed(0)
    m = models.SmallCNN(width=8)
    x, y = torch.randn(32, 3, 16, 16), torch.randint(10, (32,))
    opt = build_optimizer(name, m, x)
    assert list(opt.psi_layers) == ["features.0", "features.4"]  # the side table the engine's statistics read
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    opt.load_state_dict(opt.state_dict())


def test_run_files_and_reuse(tmp_path):
    cfg = config.Config(dataset="synthetic", model="smallcnn", optimizer="psi-sgdm", epochs=2, batch_size=50,
                       subset=300, out=str(tmp_path), progress=False)
    s = trainer.run(cfg)
    d = cfg.run_dir()
    assert {p.name for p in d.iterdir()} == {"config.json", "metrics.jsonl", "checkpoint.pt", "summary.json", ".lock"}
    rows = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    for k in ("lr", "train_loss", "train_acc", "test_loss", "test_acc", "epoch_seconds", "images_per_second",
              "eval_seconds"):
        assert all(k in r for r in rows)
    assert set(rows[0]["psi_layers"]) == {"features.0", "features.4"}
    # PSI-SGDM's effective rate is its lr at the epoch's last step (6 steps of 50 images): the first
    # milestone, 30% of 2 epochs = step 3.6, falls inside epoch 0, so 0.1 x 0.2 (the lr at its start is 0.1)
    assert rows[0]["lr"] == pytest.approx(0.1)
    assert lr_factor(cfg, 5 / 6) == pytest.approx(0.2)
    assert rows[0]["psi_layers"]["features.0"]["eff_lr"] == pytest.approx(0.02)
    mtime = (d / "summary.json").stat().st_mtime_ns
    assert trainer.run(cfg) == s and (d / "summary.json").stat().st_mtime_ns == mtime  # not run again


def test_schedules():
    cfg = config.Config(epochs=200)
    assert [lr_factor(cfg, e) for e in (0, 59, 60, 119, 120, 160, 199)] == pytest.approx(
        [1, 1, 0.2, 0.2, 0.04, 0.008, 0.008])
    cos = config.Config(epochs=10, schedule="cosine", warmup_epochs=2)
    assert lr_factor(cos, 1.0) == pytest.approx(0.5) and lr_factor(cos, 2.0) == pytest.approx(1.0)
    assert lr_factor(cos, 10.0) == pytest.approx(0.0, abs=1e-12)
    # a milestone inside an epoch acts at its step (30% of one epoch), not at the next epoch boundary
    one = config.Config(epochs=1)
    assert [lr_factor(one, t) for t in (0.0, 0.29, 0.3, 0.6, 0.79, 0.8)] == pytest.approx(
        [1, 1, 0.2, 0.04, 0.04, 0.008])
    ten = config.Config(epochs=10)  # 0.6 * 10 is 6.000000000000001 in floating point: still epoch 6
    assert lr_factor(ten, 6.0) == pytest.approx(0.04) and lr_factor(ten, 5.999) == pytest.approx(0.2)


def test_the_command_line_is_made_from_config():
    from dataclasses import fields, replace

    ap = _parser()
    dests = {a.dest for a in ap._actions}
    assert {f.name for f in fields(config.Config) if f.metadata.get("cli", True)} | {"threads", "shard", "quiet"} \
        <= dests
    assert all(f.metadata.get("help") for f in fields(config.Config))  # every field says what it is
    a = ap.parse_args(["--milestones", "0.5", "0.9", "--gamma", "0.1", "--model", "resnet20", "smallcnn",
                       "--seed", "3", "4", "--no-compile", "--quiet", "--eval-every", "0"])
    cs = configs_from_args(a)
    assert [(c.model, c.seed) for c in cs] == [("resnet20", 3), ("resnet20", 4), ("smallcnn", 3), ("smallcnn", 4)]
    c = cs[0]
    assert (c.milestones, c.gamma, c.compile, c.progress, c.eval_every) == ((0.5, 0.9), 0.1, False, False, 0)
    assert lr_factor(c, 0.6 * c.epochs) == pytest.approx(0.1)  # the milestones the command line gave
    assert configs_from_args(ap.parse_args([])) == [replace(config.Config(), progress=True)]  # Config's defaults


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "psi.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, **kw)


def _metrics(out: Path):
    return metric_rows(only_run(out))


def test_resume_after_kill_9_gives_the_uninterrupted_result(tmp_path):
    args = [*FAST, "--epochs", "6", "--optimizer", "psi-sgdm"]
    assert _cli(*args, "--out", str(tmp_path / "whole")).returncode == 0
    # killed in epoch 2, after its first step: two epochs on disk, the third's first step lost
    kill_at_epoch([*args, "--out", str(tmp_path / "cut")], 2, tmp_path / "cut.log")
    assert len(_metrics(tmp_path / "cut")) == 2
    assert _cli(*args, "--out", str(tmp_path / "cut")).returncode == 0
    assert _metrics(tmp_path / "cut") == _metrics(tmp_path / "whole")


def test_nan_loss_stops_with_a_clear_error_and_keeps_metrics(tmp_path):
    r = _cli(*FAST, "--epochs", "3", "--optimizer", "sgd", "--lr", "1e20", "--out", str(tmp_path))
    assert r.returncode == 1
    assert "loss became" in r.stderr and "Lower the learning rate" in r.stderr
    (d,) = list(tmp_path.iterdir())
    assert (d / "failed.json").is_file() and (d / "config.json").is_file()


def test_truncated_checkpoint_is_named(tmp_path):
    cfg = config.Config(dataset="synthetic", model="smallcnn", epochs=2, batch_size=50, subset=100,
                       out=str(tmp_path), progress=False)
    trainer.run(cfg)
    d = cfg.run_dir()
    (d / "summary.json").unlink()
    ck = d / "checkpoint.pt"
    ck.write_bytes(ck.read_bytes()[:1000])
    with pytest.raises(RuntimeError, match="checkpoint.pt is unreadable.*Delete it"):
        trainer.run(cfg)
    assert len((d / "metrics.jsonl").read_text().splitlines()) == 2  # nothing lost


def test_cli_refuses_bad_values_with_the_valid_ones():
    r = _cli("--optimizer", "sgd2")
    assert r.returncode == 2 and "psi-sgdm" in r.stderr and "sgdg" in r.stderr
    r = _cli("--model", "resnet21")
    assert r.returncode == 2 and "resnet20" in r.stderr
    r = _cli("--shard", "3/2")
    assert r.returncode == 2 and "--shard" in r.stderr
    h = _cli("--help")
    for opt in ("--dataset", "--subset", "--amp", "--channels-last", "--compile", "--shard", "--data-dir"):
        assert opt in h.stdout


def test_shards_split_a_sweep(tmp_path):
    args = [*FAST, "--epochs", "1", "--optimizer", "sgd", "psi-sgd", "--seed", "0", "1", "--out", str(tmp_path)]
    for k in (1, 2):
        assert _cli(*args, "--shard", f"{k}/2").returncode == 0
        assert len(list(tmp_path.iterdir())) == 2 * k
    names = sorted(p.name.rsplit("-", 1)[0] for p in tmp_path.iterdir())
    assert names == sorted(f"synthetic-smallcnn-{o}-s{s}" for o in ("sgd", "psi-sgd") for s in (0, 1))


def test_two_processes_equal_one(tmp_path):
    """torchrun, gloo, 2 CPU processes == one process with the same global batch (BN per slice)."""
    args = [*FAST, "--epochs", "2", "--optimizer", "psi-sgdm"]
    r = subprocess.run([*torchrun(2), "-m", "psi.train", *args, "--out", str(tmp_path / "ddp")], cwd=ROOT,
                       capture_output=True, text=True, env=env(), timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert _cli(*args, "--bn-split", "2", "--out", str(tmp_path / "one")).returncode == 0
    a = torch.load(next((tmp_path / "ddp").glob("*/checkpoint.pt")), weights_only=False)
    b = torch.load(next((tmp_path / "one").glob("*/checkpoint.pt")), weights_only=False)
    for k, v in b["model"].items():
        if "running" not in k and "num_batches" not in k:  # DDP keeps rank 0's BN statistics
            torch.testing.assert_close(a["model"][k], v, rtol=1e-4, atol=1e-5)
    ta = [r["train_loss"] for r in _metrics(tmp_path / "ddp")]
    tb = [r["train_loss"] for r in _metrics(tmp_path / "one")]
    assert ta == pytest.approx(tb, rel=1e-5)
    assert json.loads(next((tmp_path / "ddp").glob("*/summary.json")).read_text())["world_size"] == 2


@pytest.mark.parametrize("extra", [["--amp", "bf16", "--channels-last"], ["--amp", "fp16", "--no-compile"]],
                         ids=["bf16-channels-last", "fp16-gradscaler"])
def test_gpu_options_run_from_the_cli_and_are_recorded_resolved(tmp_path, extra):
    """The flags reach the run and config.json records what ran (tests/test_gpu_path.py checks
    that autocast, channels-last and compilation really happen)."""
    r = _cli(*FAST, "--epochs", "1", "--optimizer", "psi-sgdm", "--out", str(tmp_path), *extra)
    assert r.returncode == 0, r.stderr[-2000:]
    (d,) = list(tmp_path.iterdir())
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["amp"] == extra[1] and cfg["device_kind"] == "cpu"
    assert cfg["channels_last"] == ("--channels-last" in extra) and cfg["compile"] is False
    assert math.isfinite(json.loads((d / "summary.json").read_text())["final_train_loss"])
