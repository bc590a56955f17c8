"""One CIFAR training run, or a sweep of them, with a run folder that survives crashes.

    python -m psi.train --dataset cifar10 --model resnet20 --optimizer psi-sgdm --epochs 200 \\
        --seed 0 --data-dir DIR --out runs [--subset 5000] [--device cuda]
    torchrun --nproc_per_node 2 -m psi.train ... --device cuda   (data-parallel; SyncBatchNorm on CUDA)
    python -m psi.train --model resnet20 resnet32 --optimizer sgd psi-sgdm --seed 0 1 2 --shard 2/4

A run folder ``<out>/<dataset>-<model>-<optimizer>-s<seed>-<hash>`` (the hash is of the whole
resolved config and the device kind: results are keyed by it) holds ``config.json`` (what ran,
defaults resolved, with the ``setting`` and every optimizer group's hyperparameters as the
optimizer read them: :func:`psi.engine.optimizers.describe`), ``metrics.jsonl`` (one JSON object per
epoch), ``checkpoint.pt`` (written atomically after every epoch) and, once finished,
``summary.json``. Running the same command
again resumes from the checkpoint; a finished run is not run again. Faults lose nothing: a write killed
at any point leaves the previous file whole; a full disk raises :class:`DiskFull`; a folder made with
other settings :class:`ConfigMismatch`; a NaN loss :class:`TrainingDiverged` naming epoch and step;
SIGTERM checkpoints the step reached and exits with :data:`PREEMPTED_EXIT` (143) to be resumed there.
One process at a time works in a run folder (an ``flock`` on ``.lock``, released by the kernel even on ``kill -9``): a second
one is refused with :class:`RunLocked`, naming the holder.

What a resume gives: on the CPU, and on CUDA with ``--deterministic``, exactly the result an
uninterrupted run gives (the batches of epoch ``e`` depend only on the seed and ``e``; model,
optimizer, loss scale and RNG come back from the checkpoint). On CUDA without it, cuDNN's
algorithm choice and atomic-add kernels make every run, resumed or not, differ in the last bits.

GPU defaults (each can be switched off): bf16 autocast, channels-last, ``cudnn.benchmark``, a
compiled model and (for SGD and PSI-SGD(M)) a compiled optimizer step with the learning rate held
as a tensor, so that a schedule changes a value and never recompiles (evaluation runs the compiled
model too). On the CPU all are off. ``--amp none`` is strict fp32: on CUDA TF32 is switched off for
cuDNN's convolutions (torch's default: on) and cuBLAS's matmuls while the run lasts; ``config.json``
records both switches as the run had them (``tf32``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from dataclasses import fields
from typing import Any

import torch

from psi.engine.config import PRESETS, Config
from psi.engine.dataset import DataError
from psi.engine.distributed import end_process_group
from psi.engine.loaders import load_dataset
from psi.engine.stop import PREEMPTED_EXIT, Preempted
from psi.engine.trainer import sweep

_TYPES = {"int": int, "float": float, "str": str}


def _parser() -> argparse.ArgumentParser:
    """The command line, made from :class:`Config`'s fields (help, choices, defaults; ``sweep``
    fields take one or more values), plus what is not a run's: ``--threads``, ``--shard``, ``--quiet``."""
    ap = argparse.ArgumentParser(prog="python -m psi.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in fields(Config):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        kind = f.type.removesuffix(" | None")
        kw: dict[str, Any] = {"help": meta["help"], "default": f.default}
        if "choices" in meta:
            kw["choices"] = list(meta["choices"])
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple"):
            kw.update(type=float, nargs="+")
        else:
            kw["type"] = _TYPES[kind]
            if meta.get("sweep"):
                kw.update(nargs="+", default=[f.default])
        ap.add_argument("--" + f.name.replace("_", "-"), **kw)
    ap.add_argument("--threads", type=int, help="CPU threads (torch.set_num_threads)")
    ap.add_argument("--shard", default="1/1", help="k/n: run only the k-th of n slices of the sweep")
    ap.add_argument("--quiet", action="store_true", help="no progress bar or per-epoch lines")
    ap.add_argument("--preset", choices=list(PRESETS), help="the paper's schedule for a dataset, as defaults that "
                    "other options override: " + "; ".join(f"{k}: " + ", ".join(f"{f}={v}" for f, v in p.items())
                                                          for k, p in PRESETS.items()))
    return ap


def parse_args(ap: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``ap.parse_args`` with ``--preset``'s values as the defaults (what the command line gives wins)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", choices=list(PRESETS))
    known, _ = pre.parse_known_args(argv)
    if known.preset:
        ap.set_defaults(**PRESETS[known.preset])
    return ap.parse_args(argv)


def configs_from_args(a: argparse.Namespace) -> list[Config]:
    """The runs a command line names: every combination of its sweep fields (model x optimizer x seed)."""
    given = {f.name: getattr(a, f.name) for f in fields(Config) if f.metadata.get("cli", True)}
    given["milestones"] = tuple(given["milestones"])
    sweeps = [f.name for f in fields(Config) if f.metadata.get("sweep")]
    return [Config(**{**given, **dict(zip(sweeps, combo, strict=True))}, progress=not a.quiet)
            for combo in itertools.product(*(given[n] for n in sweeps))]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = _parser()
    a = parse_args(ap, argv)
    try:
        k, n = (int(v) for v in a.shard.split("/"))
        if not 1 <= k <= n:
            raise ValueError
    except ValueError:
        ap.error(f"--shard must be k/n with 1 <= k <= n, got {a.shard!r}")
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {a.device}: no CUDA device is visible to torch {torch.__version__}")
    configs = configs_from_args(a)
    try:
        for c in configs:
            c.validate()
        dataset = load_dataset(a.dataset, a.data_dir)
        results = sweep(configs, (k, n), dataset)
    except Preempted as e:  # SIGTERM: checkpointed; the scheduler (or the user) runs the same command again
        print(f"stopped: {e}", file=sys.stderr)
        raise SystemExit(PREEMPTED_EXIT) from e
    except (DataError, ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from e
    finally:
        end_process_group()
    for r in results if int(os.environ.get("RANK", "0")) == 0 else []:  # under torchrun, rank 0 reports
        if "failed" in r or "locked" in r:
            print(f"error: {r.get('failed') or r['locked']}", file=sys.stderr)
            continue
        acc = {k: v for k, v in r.items() if k.startswith("final_") and k.endswith("_acc")}
        print(json.dumps({"run": Config.from_dict(r["config"]).run_dir().name,
                          **acc, "final_train_loss": r["final_train_loss"]}))
    if any("failed" in r for r in results):
        raise SystemExit(1)
    if any("locked" in r for r in results):
        raise SystemExit(3)
    return results


if __name__ == "__main__":
    main()
