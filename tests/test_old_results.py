"""Results written before a change still read after it (issue 17: nothing is pickled by module path).

``tests/data/old_runs`` was written by the code of commit 2842118, before the package moved into
layers: ``complete/`` one synthetic psi-sgdm run of 2 epochs and its learning-rate selection file,
``cut/`` the same run stopped after its first checkpoint. Today's code must resume the cut run to the
complete run's metrics, to the bit, load every checkpoint and feed the study's tables.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch

from psi.engine import cifar, kernels, trainer
from psi.engine.config import Config
from psi.engine.models import build_model
from psi.engine.rundir import load_checkpoint
from psi.study.results import load_metrics, load_runs
from psi.study.selection import read_selected_files
from tests.runs import metric_rows, only_run

OLD = Path(__file__).parent / "data" / "old_runs"
RUN = dict(dataset="synthetic", model="smallcnn", optimizer="psi-sgdm", epochs=2, batch_size=50, subset=200,
           progress=False, seed=0)  # the settings that made tests/data/old_runs


def test_an_old_cut_run_resumes_to_the_old_complete_run(tmp_path):
    shutil.copytree(OLD / "cut", tmp_path / "cut")
    cfg = Config(**RUN, out=str(tmp_path / "cut"))
    assert cfg.run_dir() == only_run(tmp_path / "cut")  # the same key names the same folder
    assert len(metric_rows(cfg.run_dir())) == 1
    trainer.run(cfg, cifar.synthetic(n_train=500, n_test=100))
    got, old = metric_rows(cfg.run_dir()), metric_rows(only_run(OLD / "complete"))
    assert "trace" not in got[0] and got[1].pop("trace")  # the in-epoch trace came after the old runs were made
    made = json.loads((only_run(OLD / "complete") / "config.json").read_text())["kernels"]
    here = kernels.record()
    if (kernels.label(here), here["cpu_model"]) == (kernels.label(made), made["cpu_model"]):
        assert got == old  # the kernels that made it: to the bit
    else:  # other kernels sum in another order (psi.engine.kernels): the same run, not the same bits
        assert _flat(got) == pytest.approx(_flat(old), rel=1e-3)


def _flat(x, key: str = "") -> dict:
    """Nested rows as one flat dict of leaves (pytest.approx compares no nested dicts)."""
    if isinstance(x, dict | list):
        items = x.items() if isinstance(x, dict) else enumerate(x)
        return {k: v for i, y in items for k, v in _flat(y, f"{key}/{i}").items()}
    return {key: x}


def test_old_checkpoints_load_and_fit_todays_objects():
    for ck_path in OLD.glob("*/*/checkpoint.pt"):
        ck = load_checkpoint(ck_path)
        cfg = Config(**RUN)
        model = build_model(cfg.model, num_classes=10)
        model.load_state_dict(ck["model"])
        assert isinstance(ck["epoch"], int) and ck["config"]["optimizer"] == "psi-sgdm"
        assert all(isinstance(v, torch.Tensor) for v in ck["model"].values())


def test_old_run_folders_and_selection_files_feed_the_study():
    runs = load_runs(OLD / "complete")
    summary = json.loads((only_run(OLD / "complete") / "summary.json").read_text())
    assert list(runs["optimizer"]) == ["psi-sgdm"] and runs["epochs"].iloc[0] == 2
    assert runs["acc"].iloc[0] == 100 * summary["final_test_acc"]
    assert read_selected_files(OLD / "complete") == {("synthetic", "smallcnn", "psi-sgdm"): 0.1,
                                                          ("synthetic", "smallcnn", "sgd"): 0.05}
    assert len(load_metrics(OLD / "complete")) == 2
