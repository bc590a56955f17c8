"""The plan of a study: its settings checked, the base run, the selection runs and the study's runs
(tuned and the paper's named settings, one config per distinct run), ordered by cost, with the
learning-rate selection made once per runs folder (a lock: other shards wait, then read it)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from psi.engine.config import SCHEDULES, Config
from psi.engine.dataset import Dataset
from psi.engine.loaders import DATASETS
from psi.engine.models import MODELS, build_model
from psi.engine.optimizers import LR, OPTIMIZERS
from psi.study.profiles import ParameterError, check_choice, check_positive
from psi.study.selection import read_selected_files, select_lr, selection_config, write_selected

# notebook 04's study parameters; --set NAME=VALUE takes these
SETTINGS = ("dataset", "models", "optimizers", "seeds", "epochs", "schedule", "subset", "batch_size", "lr_grids",
            "val_size", "select_subset", "lr_extend", "paper_settings", "eval_every", "milestones", "image_size",
            "lr_scaling")


PAPER_SETTINGS = ("table1", "table2")  # the named settings a study runs at Table 3's rates (psi.engine.optimizers)


TRAIN_IMAGES = {"cifar10": 50000, "cifar100": 50000, "synthetic": 2000, "imagenet": 1281167}  # training sets


def check_settings(settings: dict[str, Any]) -> None:
    """Notebook 04's checks of the study settings; a wrong one names itself and the valid values."""
    check_choice("dataset", settings["dataset"], DATASETS)
    check_choice("models", settings["models"], list(MODELS))
    check_choice("optimizers", settings["optimizers"], OPTIMIZERS)
    check_choice("schedule", settings["schedule"], SCHEDULES)
    check_choice("lr_grids", list(settings["lr_grids"]), settings["optimizers"])
    if not isinstance(settings["paper_settings"], (list, tuple)):
        raise ParameterError(f"parameter paper_settings={settings['paper_settings']!r} must be a list of settings, "
                             f"e.g. ['table1'] or ['table1', 'table2'] ([] for none)")
    check_choice("paper_settings", list(settings["paper_settings"]), PAPER_SETTINGS)
    check_positive("epochs", settings["epochs"], integer=True)
    check_positive("batch_size", settings["batch_size"], integer=True)
    if settings["lr_grids"]:
        check_positive("val_size", settings["val_size"], integer=True)
    if settings["select_subset"] is not None:
        check_positive("select_subset", settings["select_subset"], integer=True)
    if not (isinstance(settings["lr_extend"], int) and settings["lr_extend"] >= 0):
        raise ParameterError(f"parameter lr_extend={settings['lr_extend']!r} must be an integer >= 0 (how many "
                             f"times the selection may extend a grid past its edge)")
    if not (isinstance(settings["eval_every"], int) and settings["eval_every"] >= 0):
        raise ParameterError(f"parameter eval_every={settings['eval_every']!r} must be an integer >= 0 "
                             f"(0: evaluate after the last epoch only)")


def base_config(settings: dict[str, Any], runs_dir: str | os.PathLike, device: str = "cpu", amp: str = "auto",
                channels_last: bool | None = None, compile: bool | None = None, deterministic: bool = False,
                data_dir: str | None = None) -> Config:
    """The config every run of the study starts from (model, optimizer, seed and lr are set per run)."""
    defaults = Config()  # a CIFAR profile names no milestones, crop or scaling rule: the engine's (the paper's CIFAR)
    base = Config(dataset=settings["dataset"], epochs=settings["epochs"], batch_size=settings["batch_size"],
                  schedule=settings["schedule"], subset=settings["subset"] or None, eval_every=settings["eval_every"],
                  milestones=tuple(settings.get("milestones") or defaults.milestones),
                  image_size=settings.get("image_size"), lr_scaling=settings.get("lr_scaling") or defaults.lr_scaling,
                  device=device, amp=amp,
                  channels_last=channels_last, compile=compile, deterministic=deterministic, data_dir=data_dir,
                  out=str(runs_dir), progress=False)
    base.validate()
    return base


@contextlib.contextmanager
def _flock(path: Path, shared: bool = False) -> Iterator[None]:
    """Hold an flock on ``path`` (waiting for it); the kernel drops it if the process dies."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def trained_here(c: Config) -> bool:
    """Whether this process finished the run (its summary names the process), not read it back."""
    try:
        by = json.loads((c.run_dir() / "summary.json").read_text()).get("trained_by") or {}
    except (OSError, json.JSONDecodeError):
        return False
    return by.get("pid") == os.getpid() and by.get("host") == socket.gethostname()


def selection_lock(base: Config, shared: bool = False) -> contextlib.AbstractContextManager[None]:
    """The selection is made once per runs folder: its maker holds this exclusively, so that a
    concurrent shard waits and then reads back the finished runs; workers that train the grid's
    starting rates hold it shared (they may run together, never while a selection is made)."""
    return _flock(Path(base.out) / ".selection.lock", shared)


def selection_configs(settings: dict[str, Any], base: Config) -> list[Config]:
    """The selection's starting runs: every (model, optimizer) with a grid, at each of its rates
    (what :func:`psi.study.selection.select_lr` trains first; it may add up to two rates past an edge)."""
    return [selection_config(replace(base, model=m), o, lr, settings["val_size"], subset=settings["select_subset"])
            for m in settings["models"] for o in settings["optimizers"] if o in settings["lr_grids"]
            for lr in sorted(settings["lr_grids"][o])]


def select_lrs(settings: dict[str, Any], base: Config,
               dataset: Dataset | None = None) -> tuple[dict[tuple[str, str], float], list[Any]]:
    """Each (model, optimizer) with a grid: its learning rate chosen on the validation split
    (:func:`psi.study.selection.select_lr`), written to the runs folder (:func:`psi.study.selection.write_selected`);
    returns ``{(model, optimizer): lr}`` and the tables of every rate tried. Finished
    runs are read back, so a second call (or a second shard) trains nothing."""
    selected: dict[tuple[str, str], float] = {}
    tables = []
    if not settings["lr_grids"]:
        return selected, tables
    runs_dir = Path(base.out)
    with selection_lock(base):
        for model in settings["models"]:
            for opt in settings["optimizers"]:
                if opt in settings["lr_grids"]:
                    lr, table = select_lr(replace(base, model=model), opt, settings["lr_grids"][opt],
                                          settings["val_size"], dataset=dataset, extend=settings["lr_extend"],
                                          subset=settings["select_subset"])
                    selected[(model, opt)] = lr
                    tables.append(table.assign(model=model))
            chosen = {o: lr for (m, o), lr in selected.items() if m == model}
            if chosen:
                write_selected(runs_dir, settings["dataset"], model, chosen)
    return selected, tables


def read_selected(settings: dict[str, Any], base: Config) -> dict[tuple[str, str], float]:
    """The rates a finished selection chose, read from its files without training: a rate counts
    only when its selection run for these settings is finished (a file left by a study with
    other settings does not)."""
    selected = {}
    for (dataset, model, opt), lr in read_selected_files(base.out).items():
        run = selection_config(replace(base, model=model), opt, lr, settings["val_size"], subset=settings["select_subset"])
        if (dataset == settings["dataset"] and model in settings["models"] and opt in settings["lr_grids"]
                and (run.run_dir() / "summary.json").is_file()):
            selected[(model, opt)] = lr
    return selected


def study_configs(settings: dict[str, Any], base: Config,
                  selected: dict[tuple[str, str], float]) -> list[tuple[str, Config]]:
    """The study's (setting, config) pairs: each model x optimizer at its selected rate
    (setting ``tuned``, when there is one) and under each named setting of ``paper_settings``
    (``table1``, ``table2``: Table 3's rates, resolved by :mod:`psi.engine.optimizers` and recorded by
    the run), each seed; :func:`distinct` drops repeats. A selected rate equal to Table 3's makes
    the same run as ``table1``: the pair labelled ``tuned`` then holds the ``table1`` config, one
    run for both (:func:`psi.study.results.label_tuned` labels it back in the analysis)."""
    pairs = []
    for model in settings["models"]:
        for opt in settings["optimizers"]:
            runs: list[tuple[str, str, float | None]] = []
            if (model, opt) in selected:
                lr = selected[(model, opt)]
                same = "table1" in settings["paper_settings"] and lr == LR[opt]
                runs.append(("tuned", "table1", None) if same else ("tuned", "tuned", lr))
            runs += [(name, name, None) for name in settings["paper_settings"]]
            for label, setting, lr in runs:
                for seed in settings["seeds"]:
                    pairs.append((label, replace(base, model=model, optimizer=opt, setting=setting, seed=seed,
                                                 lr=lr)))
    return pairs


def distinct(pairs: list[tuple[str, Config]]) -> list[Config]:
    """The distinct runs of ``pairs``, in their first order (a run folder is a run)."""
    return list({c.run_dir(): c for _, c in pairs}.values())


def cost_order(configs: list[Config]) -> list[Config]:
    """Longest runs first (epochs x training images x parameters), so that the last runs a
    worker takes are short ones; stable, so every process derives the same order."""
    params = {m: sum(p.numel() for p in build_model(m).parameters()) for m in {c.model for c in configs}}
    return sorted(configs, key=lambda c: -c.epochs * images_per_epoch(c) * params[c.model])


def images_per_epoch(cfg: Config) -> int:
    return cfg.subset or TRAIN_IMAGES.get(cfg.dataset, 1) - cfg.val_size  # an image folder: unknown until read


def plan(settings: dict[str, Any], base: Config) -> dict[str, Any]:
    """What the grid holds now: ``select`` (the selection's starting runs), ``study`` (the
    distinct runs of :func:`study_configs`, in notebook 04's order, so that a shard ``k/n`` is
    the same slice here and there) and ``pending`` (tuned (setting, seed) pairs whose rate is
    not chosen yet)."""
    selected = read_selected(settings, base)
    missing = [(m, o) for m in settings["models"] for o in settings["optimizers"]
               if o in settings["lr_grids"] and (m, o) not in selected]
    return {"select": selection_configs(settings, base),
            "study": distinct(study_configs(settings, base, selected)),
            "pending": len(missing) * len(settings["seeds"])}
