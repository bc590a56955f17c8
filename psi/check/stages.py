"""The check's stages, one per process: ``python -m psi.check.stages NAME --result FILE ...``. Each writes
its figures to ``FILE`` as it goes (:class:`Stage.emit`), so that a stage cut off by its time box still
leaves what it measured. See :mod:`psi.check` for what each stage measures."""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import torch

from psi.check.stage import ROOT, Stage


def env(s: Stage) -> None:
    """Versions, the device, torchvision/nvjpeg, compile threads, TF32 switches."""
    import torch._inductor.config as inductor

    from psi.engine.imageloader import resolve_decoder

    info: dict[str, Any] = dict(python=platform.python_version(), torch=torch.__version__, cuda=torch.version.cuda,
                                cudnn=torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
                                cpus=os.cpu_count(), compile_threads=inductor.compile_threads,
                                TORCHINDUCTOR_COMPILE_THREADS=os.environ.get("TORCHINDUCTOR_COMPILE_THREADS"),
                                tf32_cudnn=torch.backends.cudnn.allow_tf32,
                                tf32_matmul=torch.backends.cuda.matmul.allow_tf32)
    if s.cuda:
        p = torch.cuda.get_device_properties(s.device)
        info.update(device_name=p.name, memory_gib=round(p.total_memory / 2**30, 1), capability=f"{p.major}.{p.minor}",
                    multiprocessors=p.multi_processor_count)
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except Exception as e:  # noqa: BLE001 - absent, or not importable beside this torch: both are the finding
        info["torchvision"] = f"not importable: {type(e).__name__}: {e}"[:200]
    info["decoder_auto"] = resolve_decoder("auto", s.device)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    info["commit"] = git.stdout.strip() or None
    s.emit(**info, headline=f"torch {info['torch']}, {info.get('device_name', 'cpu')}, decoder {info['decoder_auto']}")


def tests(s: Stage) -> None:
    """The tests marked ``cuda`` (skipped without a GPU), through pytest, with their outcome."""
    files = sorted(str(p) for p in (ROOT / "tests").glob("test_*.py") if "mark.cuda" in p.read_text())
    if not files:
        s.emit(stage_skipped=True, headline="no tests/ beside the package")
        return
    xml = s.work / "junit.xml"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", *files,
                        f"--junitxml={xml}"], cwd=ROOT, capture_output=True, text=True, timeout=max(5, s.left() - 5))
    cases = []
    for case in ET.parse(xml).getroot().iter("testcase") if xml.is_file() else []:
        kids = {k.tag for k in case}
        outcome = "failed" if kids & {"failure", "error"} else "skipped" if "skipped" in kids else "passed"
        cases.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome})
    counts = {k: sum(c["outcome"] == k for c in cases) for k in ("passed", "failed", "skipped")}
    s.emit(files=[Path(f).name for f in files], cases=cases, **counts, returncode=p.returncode,
           output_tail=p.stdout[-2000:], headline=", ".join(f"{v} {k}" for k, v in counts.items()))
    if counts["failed"] or p.returncode not in (0, 5):
        raise SystemExit(f"CUDA tests failed:\n{p.stdout[-3000:]}")


def _model_and_batch(s: Stage, name: str, channels_last: bool, batch: int = 8):
    from psi.engine.models import build_model

    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = build_model(name).to(s.device, memory_format=fmt)
    x = torch.randn(batch, 3, 32, 32, device=s.device).to(memory_format=fmt)
    return model, x


def _optimizer(name: str, model, x, tensor_lr: bool = True):
    from psi.engine.optimizers import build_optimizer

    opt = build_optimizer(name, model, x[:4])
    for g in opt.param_groups:  # as the engine gives a compiled step its rate
        g["lr"] = torch.tensor(float(g["lr"]), dtype=torch.float64, device=x.device) if tensor_lr else float(g["lr"])
    torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long, device=x.device)).backward()
    opt.step()  # the buffers exist, as from the second step on (and the flat buffers are laid out)
    return opt


def compile_(s: Stage) -> None:
    """Graphs and breaks of the model and of each compiled step, channels-last on and off; graphs made over
    50 compiled steps with the learning rate changed at every step (Dynamo's guards decide a recompile,
    whatever the backend: the eager one keeps the stage short)."""
    from psi.engine.config import COMPILED_STEP

    model_name = "smallcnn" if s.tiny else "resnet20"
    rows = []
    for cl in (False, True):
        model, x = _model_and_batch(s, model_name, cl)
        e = torch._dynamo.explain(model)(x)
        rows.append(dict(what=f"model {model_name}", channels_last=cl, graphs=e.graph_count,
                         breaks=e.graph_break_count, reasons=[str(r.reason)[:200] for r in e.break_reasons[:3]]))
        for name in COMPILED_STEP:
            opt = _optimizer(name, model, x)
            e = torch._dynamo.explain(opt.step)()
            rows.append(dict(what=f"step {name}", channels_last=cl, graphs=e.graph_count, breaks=e.graph_break_count,
                             reasons=[str(r.reason)[:200] for r in e.break_reasons[:3]]))
            s.emit(explain=rows)
    recompiles = {}
    steps = 5 if s.tiny else 50
    for name in COMPILED_STEP:
        model, x = _model_and_batch(s, model_name, s.cuda)
        opt = _optimizer(name, model, x)
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        step = torch.compile(opt.step, backend="eager")  # recompiles are Dynamo's guards, whatever the backend
        for i in range(steps):
            for g in opt.param_groups:
                g["lr"].fill_(0.1 * (1 - i / steps))
            step()
        recompiles[name] = dict(steps=steps, frames=int(torch._dynamo.utils.counters["stats"]["unique_graphs"]))
        s.emit(recompiles=recompiles)
    breaks = sum(r["breaks"] for r in rows)
    s.emit(headline=f"{breaks} graph break(s) over {len(rows)} traces; graphs over {steps} lr-changing steps: "
           + ", ".join(f"{k} {v['frames']}" for k, v in recompiles.items()))


def _cuda_kernels(prof) -> int:
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def kernels(s: Stage) -> None:
    """CUDA kernels per optimizer step (torch.profiler), eager and compiled, beside psi.bench ops' counts."""
    from torch.profiler import ProfilerActivity, profile

    from psi.bench.steps import step_ops

    model_name = "resnet20" if s.tiny else "resnet56"
    rows = {}
    for name in ("sgd", "psi-sgd", "psi-sgdm"):
        c = step_ops(name, model_name)[3]
        row: dict[str, Any] = dict(aten_ops=c.ops, kernel_estimate=c.kernels, host_syncs=c.syncs)
        model, x = _model_and_batch(s, model_name, s.cuda)
        opt = _optimizer(name, model, x, tensor_lr=False)
        modes = [("eager", opt.step)] + ([] if s.tiny or not s.cuda else [("compiled", torch.compile(opt.step))])
        for mode, step in modes:
            for _ in range(3):
                step()
            s.sync()
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.cuda else [])
            with profile(activities=acts) as prof:
                step()
                s.sync()
            row[f"cuda_kernels_{mode}"] = _cuda_kernels(prof) if s.cuda else None
            t = time.perf_counter()
            for _ in range(20):
                step()
            s.sync()
            row[f"ms_per_step_{mode}"] = round((time.perf_counter() - t) / 20 * 1e3, 3)
        rows[name] = row
        s.emit(model=model_name, steps=rows)
    s.emit(headline="; ".join(f"{k}: {v['aten_ops']} ops, {v.get('cuda_kernels_eager')} kernels eager, "
                              f"{v.get('cuda_kernels_compiled')} compiled" for k, v in rows.items()))


def engine(s: Stage) -> None:
    """Epoch time of SGD and PSI-SGDM in the engine, eager and compiled, and a bare loop (psi.bench.engine)."""
    from psi.bench.engine import bare_loop
    from psi.bench.engine import engine as engine_epochs
    from psi.engine.cifar import synthetic
    from psi.engine.config import Config

    ds = synthetic(n_train=500 if s.tiny else 10000, n_test=100)
    models = ["smallcnn"] if s.tiny else ["resnet20", "resnet56"]
    modes = ["eager"] + (["compiled"] if s.cuda and not s.tiny else [])
    res: dict[str, dict[str, float]] = {m: {} for m in models}

    def cfg(model: str, opt: str, mode: str) -> Config:
        return Config(dataset="synthetic", model=model, optimizer=opt, epochs=2 if s.tiny else 3, batch_size=128,
                      subset=len(ds.train_y), device=str(s.device), compile=mode == "compiled",
                      out=str(s.work / mode), progress=False, eval_every=0)

    for mode in modes:  # every eager figure first: compiling may take the rest of the box
        for model in models:
            r = res[model]
            if mode == "eager":
                r["bare loop, sgd, eager"] = min(bare_loop(ds, cfg(model, "sgd", "eager"))[1:])
            for opt in ("sgd", "psi-sgdm"):
                r[f"engine, {opt}, {mode}"] = min(engine_epochs(ds, cfg(model, opt, mode)))
                s.emit(images_per_epoch=len(ds.train_y), seconds_per_epoch=res)
            r[f"psi-sgdm / sgd, {mode}"] = r[f"engine, psi-sgdm, {mode}"] / r[f"engine, sgd, {mode}"]
            if mode == "eager":
                r["engine / bare loop, sgd, eager"] = r["engine, sgd, eager"] / r["bare loop, sgd, eager"]
            s.emit(seconds_per_epoch=res)
    s.emit(paper_ratio=18.5 / 16.98, headline="; ".join(
        f"{m}: psi-sgdm/sgd " + ", ".join(f"{k.split(', ')[-1]} {v:.3f}" for k, v in r.items() if k.startswith("psi"))
        for m, r in res.items()))


def nvjpeg(s: Stage) -> None:
    """GPU-decoded batches against PIL's on a generated JPEG folder, a matrix product keeping the GPU busy."""
    from psi.engine.imageloader import ImageLoader, resolve_decoder
    from psi.engine.images import load_image_folder

    if not s.cuda or resolve_decoder("auto", s.device) != "nvjpeg":
        s.emit(stage_skipped=True, headline=f"nvjpeg needs CUDA and torchvision's decoder (device {s.device})")
        return
    from psi.bench.loader import write_folder

    n = 256
    root = write_folder(s.work / "jpegs", n, size=(256, 192))
    ds = load_image_folder("imagefolder", root)
    out: dict[str, Any] = {}
    batches = {}
    busy = torch.randn(4096, 4096, device=s.device)
    stream = torch.cuda.Stream(s.device)
    for decoder in ("pil", "nvjpeg"):
        loader = ImageLoader(ds.train_files, ds.train_y, ds.mean, ds.std, 64, train=False, image_size=128,
                             device=s.device, decoder=decoder, workers=2)
        with torch.cuda.stream(stream):  # the GPU busy with other work meanwhile
            for _ in range(50):
                busy = busy @ busy / 64
        t = time.perf_counter()
        batches[decoder] = [x.float().cpu() for x, _ in loader.epoch(0)]
        s.sync()
        out[decoder] = dict(images_per_s=round(n / (time.perf_counter() - t), 1), host_syncs=loader.host_syncs)
    diff = max((a - b).abs().max().item() for a, b in zip(batches["pil"], batches["nvjpeg"], strict=True))
    out["max_abs_difference"] = diff  # normalised pixels: the two decoders' IDCTs round differently
    s.emit(**out, headline=f"nvjpeg {out['nvjpeg']['images_per_s']} img/s, pil {out['pil']['images_per_s']}, "
           f"max |diff| {diff:.3f}")


def main(argv: list[str] | None = None) -> None:
    from psi.check.study import cifar

    stages = dict(env=env, tests=tests, compile=compile_, kernels=kernels, engine=engine, nvjpeg=nvjpeg, cifar=cifar)
    ap = argparse.ArgumentParser(prog="python -m psi.check.stages")
    ap.add_argument("name", choices=stages)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--data-dir")
    ap.add_argument("--result", required=True)
    ap.add_argument("--work", required=True)
    a = ap.parse_args(argv)
    s = Stage(a)
    if s.cuda and not torch.cuda.is_available():
        s.emit(headline="no CUDA device visible to torch")
        raise SystemExit(f"psi.check: --device {a.device}, but torch {torch.__version__} sees no CUDA device "
                         f"(torch.version.cuda = {torch.version.cuda}); pass --device cpu --tiny for the self-test")
    stages[a.name](s)


if __name__ == "__main__":
    main()
