"""psi.study: the learning-rate selection and the paper's table."""

import math

import numpy as np
import pandas as pd
import pytest

from psi import study
from psi.train import Config


def _fake_sweep(peak):
    def sweep(cfgs, shard=(1, 1), dataset=None):
        assert all(c.val_size == 100 for c in cfgs)  # selected on the validation split, never on test
        return [{"final_val_acc": 1 - abs(math.log(c.lr / peak))} if c.lr < 5 else {"failed": "diverged"}
                for c in cfgs]
    return sweep


@pytest.mark.parametrize("peak,expected,n", [(0.3, 0.3, 3), (0.01, 0.0111, 5), (2.0, 3.0, 5)])
def test_select_lr_extends_the_grid_at_its_edges(monkeypatch, peak, expected, n):
    monkeypatch.setattr(study, "sweep", _fake_sweep(peak))
    lr, table = study.select_lr(Config(), "sgd", [0.1, 0.3, 1.0], val_size=100)
    assert lr == pytest.approx(expected, rel=1e-2) and len(table) == n
    assert table["lr"].is_monotonic_increasing


def test_select_lr_all_diverged(monkeypatch):
    monkeypatch.setattr(study, "sweep", _fake_sweep(1.0))
    with pytest.raises(RuntimeError, match="diverged"):
        study.select_lr(Config(), "sgd", [10.0, 30.0], val_size=100, extend=0)


def test_table1_and_welch():
    assert len(study.PAPER_TABLE1) == 40
    runs = pd.DataFrame({"dataset": "cifar10", "model": "resnet20", "split": "test", "epochs": 200, "subset": np.nan,
                         "optimizer": ["sgd"] * 3 + ["psi-sgdm"] * 3, "lr": [0.1] * 6,
                         "acc": [91.0, 91.2, 91.1, 92.4, 92.5, 92.3]})
    t = study.table1(runs).set_index("optimizer")
    assert t.loc["psi-sgdm", "paper_mean"] == 92.41 and t.loc["psi-sgdm", "diff"] == pytest.approx(92.4 - 92.41)
    w = study.welch(runs, "psi-sgdm")
    assert w["diff"] == pytest.approx(1.3) and w["p"] < 0.01
