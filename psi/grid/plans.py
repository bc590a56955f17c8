"""The study a grid command line names (profile and ``--set`` overrides), its shards, and the plan it prints
before anything trains: runs, epochs, the time estimate, the kernels the CPU runs will use."""

from __future__ import annotations

import argparse
import ast
import json
import os
from pathlib import Path
from typing import Any

from psi.engine import kernels
from psi.engine.config import Config
from psi.grid.estimate import epoch_seconds, kind_of_device
from psi.study.plan import SETTINGS, base_config, check_settings, images_per_epoch
from psi.study.profiles import ParameterError, study_settings


def _literal(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def study_of_args(a: argparse.Namespace) -> tuple[dict[str, Any], Config]:
    """The study settings (profile, then every --set) and the base config the options give."""
    given = {}
    for item in a.set or []:
        name, eq, value = item.partition("=")
        if not eq or name not in SETTINGS:
            raise ParameterError(f"--set {item!r}: give NAME=VALUE with NAME one of {', '.join(SETTINGS)}")
        given[name] = _literal(value)
    settings = study_settings(a.profile, **given)
    check_settings(settings)
    out = Path(a.out)
    base = base_config(settings, out / "runs", a.device, a.amp, False if a.no_channels_last else None,
                       False if a.no_compile else None, a.deterministic, a.data_dir)
    return settings, base


def shard_of(configs: list[Config], shard: tuple[int, int]) -> list[Config]:
    k, n = shard
    return [c for i, c in enumerate(configs) if i % n == k - 1]


def print_plan(settings: dict[str, Any], base: Config, p: dict[str, Any], assign, steps: int,
                concurrent: int, what: str) -> None:
    """The --dry-run listing: every run once with where it goes, then the time it takes."""
    phases = [("select", p["select"]), ("study", p["study"])]
    print(f"profile settings: {json.dumps(settings)}")
    i = 0
    for phase, configs in phases:
        if not configs:
            continue
        print(f"{phase}: {len(configs)} runs" + (" (the selection may add up to 2 rates per optimizer)"
                                                  if phase == "select" else ""))
        for j, c in enumerate(configs):
            i += 1
            d = c.run_dir()
            state = "done" if (d / "summary.json").is_file() else "failed" if (d / "failed.json").is_file() else ""
            print(f"  {i:4d} {c.dataset} {c.model} {c.optimizer} {c.setting} lr={c.lr if c.lr is not None else 'Table 3'} "
                  f"seed={c.seed} epochs={c.epochs} -> {assign(j)}  {d} {state}".rstrip())
    if p["pending"]:
        print(f"  + {p['pending']} tuned runs once the selection has chosen their rates")
    every = p["select"] + p["study"]
    if not every:
        return
    secs = epoch_seconds(every, steps)
    kind = kind_of_device(base.device)
    print(f"epoch seconds per model ({kind}, an epoch of 50000 training images, batch {base.batch_size}):")
    for model, (s, source) in secs.items():
        print(f"  {model:10s} {'?' if s is None else f'{s:.2f}':>8s} s  {source}")
    known = [c for c in every if secs[c.model][0] is not None]
    total = sum(c.epochs * images_per_epoch(c) / 50000 * secs[c.model][0] for c in known)
    left = sum(c.epochs * images_per_epoch(c) / 50000 * secs[c.model][0] for c in known
               if not (c.run_dir() / "summary.json").is_file())
    print(f"estimate: {total / 3600:.2f} {kind}-hours for the {len(known)} runs one at a time, {left / 3600:.2f} "
          f"of them left; with {concurrent} {what} about {left / 3600 / max(concurrent, 1):.2f} h wall if each "
          f"run keeps these epoch seconds (several runs on one GPU share it: measure)"
          + (f"; {len(every) - len(known)} runs of models not timed are not in it" if len(known) < len(every) else ""))


def kernels_line(a: argparse.Namespace) -> str:
    """What decides the workers' CPU bits, as this process sees them when it runs under their environment."""
    if all(a.env.get(k) == v for k, v in kernels.PIN.items()):
        how = f"pinned to AVX2 (the {a.profile} profile; --cpu-isa native lifts it)"
    else:
        how = "the CPU's best (--cpu-isa native)" if a.cpu_isa == "native" else "not pinned (only smoke and quick are)"
    same = all(a.env.get(k) == os.environ.get(k) for k in kernels.PIN)
    return f"kernels: {kernels.label(kernels.record()) if same else 'set for the workers'}, {how}"
