"""Small helpers the notebooks share: parameter checks that say what is valid, the three
profiles, seeding, and saving figures next to the executed notebook."""

from __future__ import annotations

from typing import Any

__all__ = ["PROFILES", "STUDY_PRESETS", "PROFILE_DATASETS", "PAPER_GRIDS", "check_choice", "check_positive",
           "parse_shard", "study_settings", "ParameterError"]

PROFILES = ("smoke", "quick", "paper", "imagenet")


class ParameterError(ValueError):
    """A notebook parameter is wrong; the message names it, the valid values and how to pass them."""


def check_choice(name: str, value: Any, valid: tuple | list) -> Any:
    values = value if isinstance(value, (list, tuple)) else [value]
    bad = [v for v in values if v not in valid]
    if bad:
        raise ParameterError(f"parameter {name}={value!r}: {bad} not valid; valid: {', '.join(map(str, valid))}. "
                             f"Pass it with papermill -p {name} ... (or ./run_all.sh options).")
    return value


def check_positive(name: str, value: Any, integer: bool = False) -> Any:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0
    if integer:
        ok = ok and float(value).is_integer()
    if not ok:
        kind = "a positive integer" if integer else "a positive number"
        raise ParameterError(f"parameter {name}={value!r} must be {kind}.")
    return value


def parse_shard(shard: str) -> tuple[int, int]:
    """``"k/n"`` as ``(k, n)`` with ``1 <= k <= n``: the k-th of n slices of a list of runs."""
    try:
        k, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        k, n = 0, 0
    if not 1 <= k <= n:
        raise ParameterError(f"parameter shard={shard!r} must be k/n with 1 <= k <= n")
    return k, n


_GRIDS = {"sgd": [0.03, 0.1, 0.3], "psi-sgd": [0.3, 1.0, 3.0], "psi-sgdm": [0.03, 0.1, 0.3]}
# Section 6.2 (p. 1135): "we grid search the learning rates in the range of {0.01, 0.1, 1.0} and
# {0.0001, 0.001, 0.01} respectively for SGD and Adam"; the other methods take Table 3's rates.
PAPER_GRIDS = {"sgd": [0.01, 0.1, 1.0], "adam": [1e-4, 1e-3, 1e-2]}
# The CIFAR study's settings per profile (notebook 04); a notebook parameter left at None takes these.
# paper_settings: the named settings of psi.engine.optimizers run at Table 3's rates (table1, table2); a
# learning-rate grid adds the setting "tuned", chosen on val_size held-out training images by runs
# on select_subset of the others (None: the study's subset), one seed, extending a grid past its
# edge at most lr_extend times. eval_every: evaluate after every k-th epoch (0: the last only).
# The quick profile's design (images x epochs, seeds) was chosen by measured spread: docs/cpu-study.md,
# "Choosing the CPU study's design" (python -m psi.study.design).
STUDY_PRESETS: dict[str, dict[str, Any]] = {
    "smoke": dict(dataset="synthetic", models=["smallcnn"], optimizers=["sgd", "psi-sgd", "psi-sgdm"], seeds=[0, 1],
                  epochs=2, schedule="step", subset=500, batch_size=50, lr_grids=_GRIDS, val_size=200,
                  select_subset=None, lr_extend=2, paper_settings=["table1"], eval_every=1),
    "quick": dict(dataset="cifar10", models=["resnet20"], optimizers=["sgd", "psi-sgd", "psi-sgdm"],
                  seeds=[0, 1, 2, 3, 4], epochs=1, schedule="step", subset=15000, batch_size=128, lr_grids=_GRIDS,
                  val_size=2000, select_subset=5000, lr_extend=1, paper_settings=["table1"], eval_every=0),
    "paper": dict(dataset="cifar10", models=["resnet20", "resnet32", "resnet44", "resnet56"],
                  optimizers=["sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm"], seeds=[0, 1, 2, 3, 4], epochs=200,
                  schedule="step", subset=None, batch_size=128, lr_grids=PAPER_GRIDS, val_size=5000,
                  select_subset=None, lr_extend=0, paper_settings=["table1", "table2"], eval_every=1),
    # Table 1's ImageNet rows (p. 1134; section 6.2, p. 1135: 100 epochs, x0.2 at 30/60/90; 3 runs each),
    # at Table 3's rates and batch (supp. p. 17: 128), scaled linearly when batch_size changes. No rate
    # selection (lr_grids {}): section 6.2's grids would add 18 runs of 100 epochs to these 45, and the
    # paper does not say it searched on ImageNet; pass lr_grids to add one.
    "imagenet": dict(dataset="imagenet", models=["resnet18", "resnet34", "resnet50"],
                     optimizers=["sgd", "adam", "sgdg", "psi-sgd", "psi-sgdm"], seeds=[0, 1, 2], epochs=100,
                     schedule="step", milestones=[0.3, 0.6, 0.9], subset=None, batch_size=128, image_size=224,
                     lr_scaling="linear", lr_grids={}, val_size=0, select_subset=None, lr_extend=0,
                     paper_settings=["table1"], eval_every=1),
}
# The datasets each profile's notebook 04 runs, one study each (run_all.sh): Tables 1 and 2 have
# CIFAR-10 and CIFAR-100; Table 1's last rows ImageNet (the imagenet profile).
PROFILE_DATASETS = {"smoke": ["synthetic"], "quick": ["cifar10"], "paper": ["cifar10", "cifar100"],
                    "imagenet": ["imagenet"]}


def study_settings(profile: str, **given: Any) -> dict[str, Any]:
    """The profile's study settings, with every parameter that is not None taking precedence."""
    check_choice("profile", profile, PROFILES)
    out = dict(STUDY_PRESETS[profile])
    out.update({k: v for k, v in given.items() if v is not None})
    return out
