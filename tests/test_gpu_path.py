"""The engine's GPU path, checked on a machine without a GPU (and for real where one is).

Each test names the defect it would catch: a resume that puts checkpoint tensors on the wrong
device, a process group chosen by the machine instead of the run, a host sync per step, a
second process in a run folder, a recompile per learning-rate change, a lost loss scale.
"""

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from psi.bench.opcount import OpCounter
from psi.engine import cifar, distributed, epoch, files, models, rundir, trainer
from psi.engine.config import COMPILED_STEP, Config
from psi.engine.distributed import backend_for, run_device
from psi.engine.rundir import RunLocked, load_checkpoint, lock_holder, run_lock
from psi.engine.trainer import sweep
from tests.procs import Gated, env
from tests.runs import metric_rows, small_config

ROOT = Path(__file__).resolve().parents[1]
def CUDA(test):  # noqa: N802 - a decorator, as pytest's marks are
    """Run only on a CUDA device; marked ``cuda`` for ``python -m psi.check``'s tests stage."""
    return pytest.mark.cuda(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")(test))


@pytest.fixture(scope="module")
def ds():
    return cifar.synthetic(n_train=500, n_test=100)


_cfg = small_config


class _Cut(Exception):
    """Stands for a crash right after a checkpoint was written."""


def _run_cut(cfg: Config, ds, after_epochs: int, monkeypatch) -> None:
    """Run ``cfg`` and 'crash' once ``after_epochs`` checkpoints are on disk."""
    real, written = files.atomic_write, []

    def write(path, fn):
        real(path, fn)
        if path.name == "checkpoint.pt":
            written.append(path)
            if len(written) == after_epochs:
                raise _Cut

    with monkeypatch.context() as m:
        m.setattr(trainer, "atomic_write", write)
        with pytest.raises(_Cut):
            trainer.run(cfg, ds)


def _rows(cfg: Config) -> list[dict]:
    return metric_rows(cfg.run_dir())


# -- process group ---------------------------------------------------------------------------

def test_backend_follows_the_run_device_not_the_machine(monkeypatch):
    """A --device cpu run under torchrun on a GPU machine must take gloo (NCCL cannot move CPU tensors)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    seen = []
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend, **kw: seen.append((backend, kw)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    distributed.init_distributed(torch.device("cpu"))
    assert seen == [("gloo", {})]
    assert backend_for(torch.device("cuda", 1)) == "nccl"


def test_a_cuda_process_pins_its_gpu_and_hands_it_to_nccl(monkeypatch):
    """torch.cuda.set_device and init_process_group(device_id=...) for a CUDA run (patched: no GPU here)."""
    calls = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(("set_device", d)))
    monkeypatch.setattr(torch.distributed, "init_process_group",
                        lambda backend, **kw: calls.append((backend, kw.get("device_id"))))
    monkeypatch.setenv("WORLD_SIZE", "2")
    gpu = torch.device("cuda", 1)
    distributed.init_distributed(gpu)
    assert calls == [("set_device", gpu), ("nccl", gpu)]


def test_cuda_under_torchrun_takes_the_local_rank(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert run_device("cuda") == torch.device("cuda", 3)
    with pytest.raises(ValueError, match="give --device cuda"):
        run_device("cuda:1")


def test_compile_under_torchrun_is_refused_and_auto_turns_it_off(monkeypatch, tmp_path):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(trainer, "init_distributed", lambda device: (0, 2))
    with pytest.raises(ValueError, match="--compile under torchrun is not supported"):
        trainer.run(_cfg(tmp_path, compile=True))
    assert not list(tmp_path.iterdir())  # refused before touching anything
    assert Config(device="cuda").resolved(world=2).compile is False
    assert Config(device="cuda").resolved(world=1).compile is True


def test_auto_settings_resolve_per_device_kind_and_the_kind_is_in_the_key():
    cpu, gpu = Config(device="cpu"), Config(device="cuda")
    assert (cpu.resolved().amp, cpu.resolved().channels_last, cpu.resolved().compile) == ("none", False, False)
    assert (gpu.resolved().amp, gpu.resolved().channels_last, gpu.resolved().compile) == ("bf16", True, True)
    assert cpu.key() != Config(device="cuda", amp="none").key()  # same math, other device kind
    assert gpu.key() == Config(device="cuda:3").key() == Config(device="cuda", amp="bf16").key()
    assert gpu.key() != Config(device="cuda", amp="fp16").key()


# -- checkpoints -----------------------------------------------------------------------------

def test_resume_loads_to_the_cpu_and_puts_state_where_it_belongs(tmp_path, ds, monkeypatch):
    """The crash on every CUDA resume: a checkpoint loaded onto the run's device put the CPU RNG
    state on the GPU (set_rng_state raises) and Adam's step counters there too (a host read per
    parameter per step). The engine must load to the CPU and let load_state_dict place things."""
    cfg = _cfg(tmp_path, optimizer="adam", epochs=2)
    _run_cut(cfg, ds, 1, monkeypatch)
    ck = load_checkpoint(cfg.run_dir() / "checkpoint.pt")
    asked = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **kw: asked.append(kw.get("map_location")) or real_load(*a, **kw))
    trainer.run(cfg, ds)
    assert asked == ["cpu"]
    # what restore_checkpoint does with the CPU-loaded checkpoint
    tensors = [t for t in _leaves(ck) if isinstance(t, torch.Tensor)]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    model = models.build_model("smallcnn")
    from psi.engine.optimizers import build_optimizer

    opt = build_optimizer("adam", model, torch.randn(16, 3, 32, 32))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    assert rundir.restore_checkpoint(ck, model, opt, scaler, torch.device("cpu"), Path("x")) == 1
    adam = opt.optimizers[0]
    assert adam.state
    for p, st in adam.state.items():
        assert st["step"].device.type == "cpu" and st["step"].dtype == torch.float32  # torch's non-capturable rule
        assert st["exp_avg"].device == p.device and st["exp_avg"].dtype == p.dtype
    assert torch.get_rng_state().dtype == torch.uint8


def _leaves(x):
    if isinstance(x, dict):
        for v in x.values():
            yield from _leaves(v)
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _leaves(v)
    else:
        yield x


def test_a_checkpoint_of_another_device_kind_is_refused(tmp_path, ds):
    cfg = _cfg(tmp_path, epochs=1)
    trainer.run(cfg, ds)
    ck = load_checkpoint(cfg.run_dir() / "checkpoint.pt")
    ck["device_kind"] = "cuda"
    model = models.build_model("smallcnn")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RuntimeError, match="written by a cuda run and this run is on cpu"):
        rundir.restore_checkpoint(ck, model, opt, torch.amp.GradScaler("cpu", enabled=False), torch.device("cpu"), Path("x"))


def test_fp16_resume_equals_the_uninterrupted_run_and_keeps_the_loss_scale(tmp_path, ds, monkeypatch):
    kw = dict(amp="fp16", optimizer="sgd", epochs=3)
    whole = _cfg(tmp_path / "whole", **kw)
    trainer.run(whole, ds)
    cut = _cfg(tmp_path / "cut", **kw)
    _run_cut(cut, ds, 1, monkeypatch)
    trainer.run(cut, ds)
    assert _rows(cut) == _rows(whole)
    # A scale a fresh GradScaler would not have: a resume that restarted it would not end here.
    again = _cfg(tmp_path / "again", **kw)
    _run_cut(again, ds, 1, monkeypatch)
    path = again.run_dir() / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    ck["scaler"].update(scale=2.0**3, _growth_tracker=1)
    torch.save(ck, path)
    trainer.run(again, ds)
    final = torch.load(path, weights_only=True)["scaler"]
    steps = 2 * (200 // 50)  # epochs 2 and 3, no overflow at scale 8: the tracker counts every step
    assert final["scale"] == 2.0**3 and final["_growth_tracker"] == 1 + steps


def test_deterministic_switch_runs_and_changes_nothing_on_the_cpu(tmp_path, ds):
    a = _cfg(tmp_path / "a", epochs=1)
    b = _cfg(tmp_path / "b", epochs=1, deterministic=True)
    trainer.run(a, ds)
    try:
        trainer.run(b, ds)
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(False)
    assert _rows(a) == _rows(b)
    assert json.loads((b.run_dir() / "config.json").read_text())["deterministic"] is True


def test_bf16_autocast_and_channels_last_really_run(tmp_path, ds, monkeypatch):
    seen = []
    real_build = trainer.build_model

    def build(name, num_classes):
        m = real_build(name, num_classes)
        first = next(x for x in m.modules() if isinstance(x, torch.nn.Conv2d))

        def record(mod, inp, out):
            if mod is first:  # not discovery's float64 copy
                seen.append((out.dtype, inp[0].is_contiguous(memory_format=torch.channels_last), mod.training))

        first.register_forward_hook(record)
        return m

    monkeypatch.setattr(trainer, "build_model", build)
    trainer.run(_cfg(tmp_path, epochs=1, amp="bf16", channels_last=True), ds)
    training = [s for s in seen if s[2]]
    assert training and all(s[:2] == (torch.bfloat16, True) for s in training)


def test_an_eager_resume_of_a_compiled_run_steps_with_a_float_lr(tmp_path, ds, monkeypatch):
    """A compiled run checkpoints its tensor learning rate; resumed without --compile, an eager
    torch SGD step would read that tensor on the host at every step (alpha=-lr)."""
    cfg = _cfg(tmp_path, epochs=2, optimizer="sgd")
    _run_cut(cfg, ds, 1, monkeypatch)
    path = cfg.run_dir() / "checkpoint.pt"
    ck = torch.load(path, weights_only=True)
    for g in ck["optimizer"]["param_groups"]:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)  # as a compiled run saves it
    torch.save(ck, path)
    lrs = []
    real = epoch._psi_layer_stats
    monkeypatch.setattr(epoch, "_psi_layer_stats", lambda opt, name: lrs.extend(g["lr"] for g in opt.param_groups)
                        or real(opt, name))
    trainer.run(cfg, ds)
    assert lrs and all(type(lr) is float for lr in lrs)


# -- host syncs ------------------------------------------------------------------------------

def _syncs(tmp_path, ds, subset: int, monkeypatch, **kw) -> OpCounter:
    from torch.utils._python_dispatch import _disable_current_modes

    adam = importlib.import_module("torch.optim.adam")
    real = adam._get_value

    def host_step(x):  # torch's Adam reads its step count, which lives on the CPU even for CUDA
        with _disable_current_modes():  # parameters (non-capturable): a CPU read, not a device sync
            return real(x)

    with monkeypatch.context() as m, OpCounter() as c:
        m.setattr(adam, "_get_value", host_step)
        trainer.run(_cfg(tmp_path / f"n{subset}", subset=subset, **kw), ds)
    return c


@pytest.mark.parametrize("optimizer,amp", [("sgd", "none"), ("adam", "none"), ("sgdg", "none"), ("psi-sgd", "none"),
                                           ("psi-sgdm", "none"), ("psi-sgdm", "bf16")])
def test_no_host_sync_per_step(tmp_path, ds, optimizer, amp, monkeypatch):
    """A training run with twice the steps per epoch reads the device exactly as often: what it
    reads (once per epoch: the loss, accuracy, layer statistics, evaluation) does not grow with
    the number of steps. ``.item()``/``float()``/``bool()``, ``nonzero`` and mask indexing count."""
    few = _syncs(tmp_path, ds, 200, monkeypatch, optimizer=optimizer, amp=amp)
    many = _syncs(tmp_path, ds, 400, monkeypatch, optimizer=optimizer, amp=amp)
    assert few.sync_count > 0  # the per-epoch reads are seen: the detector is watching
    assert many.syncs == few.syncs
    assert many.total > few.total  # and the extra steps did run under it


def test_the_sync_detector_sees_a_per_step_sync(tmp_path, ds, monkeypatch):
    """adamp's SGDP compares a cosine similarity on the host for every parameter at every step:
    the same count test goes red on it (it is third-party and not in the paper)."""
    few = _syncs(tmp_path, ds, 200, monkeypatch, optimizer="sgdp")
    many = _syncs(tmp_path, ds, 400, monkeypatch, optimizer="sgdp")
    assert many.syncs["aten._local_scalar_dense"] > few.syncs["aten._local_scalar_dense"]



def test_a_one_epoch_run_traces_its_loss_norms_and_rate_within_the_epoch(tmp_path, ds):
    """Every few steps the loss, neuron norm and effective rate are kept on the device and read with the
    epoch's totals (the count test above holds them to one read per epoch): a 1-epoch run has a curve."""
    cfg = _cfg(tmp_path, optimizer="psi-sgd", epochs=1, subset=400, batch_size=25)  # 16 steps: a point every 2
    trainer.run(cfg, ds)
    (row,) = metric_rows(cfg.run_dir())
    trace = row["trace"]
    assert [t["step"] for t in trace] == list(range(2, 17, 2)) and len(trace) == epoch.TRACE_POINTS
    assert [t["images"] for t in trace] == [50 * k for k in range(1, 9)]
    assert sum(t["train_loss"] for t in trace) / len(trace) == pytest.approx(row["train_loss"], rel=1e-5)
    assert len({t["train_loss"] for t in trace}) > 1  # each point its own steps' mean, not the epoch's
    layers = row["psi_layers"].values()
    assert trace[-1]["psi_norm_mean"] == pytest.approx(sum(v["norm_mean"] for v in layers) / len(layers))
    assert all(t["psi_eff_lr"] > 0 for t in trace)

# -- one process per run folder --------------------------------------------------------------

def test_a_held_run_folder_is_refused_and_left_alone(tmp_path, ds):
    cfg = _cfg(tmp_path, epochs=1)
    with run_lock(cfg.run_dir()):
        holder = lock_holder(cfg.run_dir())
        assert holder["pid"] == os.getpid()
        with pytest.raises(RunLocked, match=f"another process .*{os.getpid()}"):
            trainer.run(cfg, ds)
        assert not (cfg.run_dir() / "config.json").exists()
        res = sweep([cfg], dataset=ds)
        assert "locked" in res[0]
    assert lock_holder(cfg.run_dir()) is None
    trainer.run(cfg, ds)  # free again


def test_a_forked_child_does_not_keep_the_run_folder_locked(tmp_path):
    """An image-folder run's DataLoader workers are forked while it holds its folder's lock: after
    ``kill -9`` of the run the folder must be free at once, though a worker lives on (a few seconds,
    until it notices) -- else running again, as the README says to, is refused."""
    script = f"""
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
from pathlib import Path
from psi.engine.rundir import run_lock
with run_lock(Path({str(tmp_path / "run")!r})):
    if os.fork() == 0:  # the "worker": alive until the test closes our stdin
        sys.stdin.read()
        os._exit(0)
    print("locked", flush=True)
    time.sleep(600)
"""
    run = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "locked"
        run.kill()
        run.wait()
        assert lock_holder(tmp_path / "run") is None
    finally:
        run.stdin.close()  # the worker exits
        run.stdout.close()


def test_a_second_process_on_a_live_run_is_refused_and_metrics_stay_intact(tmp_path):
    """The first run is held in its second epoch (tests/procs.py's gate: the run folder's lock is its,
    one epoch is on disk) until the second process has been turned away: nothing here depends on
    which of the two is faster."""
    args = ["--dataset", "synthetic", "--model", "smallcnn", "--batch-size", "50", "--subset", "500", "--quiet",
            "--threads", "1", "--epochs", "6", "--out", str(tmp_path / "out")]
    with Gated(args, epoch=1, log=tmp_path / "first.log", steps=1) as first:
        first.wait_for_gate()
        (d,) = list((tmp_path / "out").iterdir())
        before = {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"}
        assert lock_holder(d)["pid"] == first.pid and len(before["metrics.jsonl"].splitlines()) == 1
        second = subprocess.run([sys.executable, "-m", "psi.train", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300, env=env())
        assert second.returncode == 3, second.stderr[-2000:]
        assert f"'pid': {first.pid}" in second.stderr.replace('"', "'") and "Nothing was changed" in second.stderr
        assert {p.name: p.read_bytes() for p in d.iterdir() if p.name != ".lock"} == before
        assert first.release() == 0, first.log.read_text()[-2000:]
    assert [json.loads(x)["epoch"] for x in (d / "metrics.jsonl").read_text().splitlines()] == list(range(6))


# -- compilation -----------------------------------------------------------------------------

def test_the_cifar_resnet_compiles_without_graph_breaks():
    explained = torch._dynamo.explain(models.resnet20())(torch.randn(2, 3, 32, 32))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("name", COMPILED_STEP)
def test_the_compiled_optimizer_steps_trace_in_one_graph(name):
    """The steps the engine compiles, with the tensor learning rate it gives them: one graph, no break
    (PSISGD once broke its graph on an operator.itemgetter)."""
    from psi.engine.optimizers import build_optimizer

    m = models.SmallCNN(width=8)
    opt = build_optimizer(name, m, torch.randn(8, 3, 32, 32))
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()  # momentum buffers exist, as from the second step on
    explained = torch._dynamo.explain(opt.step)()
    assert explained.graph_break_count == 0 and explained.graph_count == 1


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("name", ["sgd", "psi-sgd", "psi-sgdm"])
def test_the_compiled_step_has_no_break_under_channels_last(name, layout):
    """Issue 19, item 1: channels-last is CUDA's default layout (Config.channels_last), and the safeguard
    is on by default. An ``addcmul(..., out=w)`` of a channels-last w broke PSI-SGDM's graph in two (its
    whole momentum update then ran eagerly); the step writes through a foreach copy instead."""
    from psi.engine.optimizers import build_optimizer

    torch.manual_seed(0)
    m = models.resnet20()
    if layout == "channels_last":
        m = m.to(memory_format=torch.channels_last)
    opt = build_optimizer(name, m, torch.randn(2, 3, 32, 32))
    assert all(g.get("max_norm") for g in opt.param_groups if g.get("psi"))
    for g in opt.param_groups:
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64)
    for p in m.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    explained = torch._dynamo.explain(opt.step)()
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


def test_compiled_engine_does_not_recompile_across_epochs_or_lr_changes(tmp_path, ds, monkeypatch):
    """Model and optimizer step compiled; a cosine schedule changes the learning rate at every
    step; after the first (warm-up) epoch nothing new is compiled."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    graphs, lrs = [], []
    real = epoch._psi_layer_stats

    def spy(opt, name):  # called once per epoch, after training
        graphs.append(counters["stats"]["unique_graphs"])
        lrs.append([g["lr"] for g in opt.param_groups])
        return real(opt, name)

    monkeypatch.setattr(epoch, "_psi_layer_stats", spy)
    cfg = _cfg(tmp_path, epochs=3, compile=True, schedule="cosine")
    trainer.run(cfg, ds)
    assert graphs[0] > 0  # it did compile
    assert graphs[1] == graphs[2] == graphs[0]
    assert all(isinstance(lr, torch.Tensor) for lr in lrs[0])  # the step sees a tensor learning rate
    rows = [json.loads(x) for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert [r["warmup"] for r in rows] == [True, False, False]
    assert len({r["lr"] for r in rows}) == 3


# -- on a GPU --------------------------------------------------------------------------------

@CUDA
def test_cuda_resume_equals_the_uninterrupted_run(tmp_path, ds, monkeypatch):
    kw = dict(device="cuda", deterministic=True, compile=False, epochs=3, optimizer="psi-sgdm", model="resnet20")
    whole = _cfg(tmp_path / "whole", **kw)
    cut = _cfg(tmp_path / "cut", **kw)
    try:
        trainer.run(whole, ds)
        _run_cut(cut, ds, 1, monkeypatch)
        trainer.run(cut, ds)
    finally:
        torch.use_deterministic_algorithms(False)
    assert _rows(cut) == _rows(whole)


@CUDA
@pytest.mark.parametrize("optimizer", ["sgd", "psi-sgdm", "adam"])
def test_cuda_training_epoch_never_syncs(tmp_path, ds, optimizer, monkeypatch):
    """torch.cuda's sync debug mode raises on any synchronising call inside a non-warm-up epoch."""
    real = epoch.train_epoch
    calls = []

    def strict(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            return real(*a, **kw)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return real(*a, **kw)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    monkeypatch.setattr(trainer, "train_epoch", strict)
    trainer.run(_cfg(tmp_path, device="cuda", epochs=2, optimizer=optimizer, model="resnet20"), ds)
    assert len(calls) == 2
