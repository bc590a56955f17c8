"""The named settings (table1, table2, tuned): what each optimizer group gets, what a run records,
that the analysis reads the record, and that at one seed every optimizer starts and sees the same."""

import json
import warnings

import pytest
import torch

from psi.engine import cifar, trainer
from psi.engine import optimizers as O
from psi.engine.config import Config
from psi.engine.models import SmallCNN
from psi.study.results import load_metrics, load_runs

X = torch.randn(8, 3, 16, 16)


def _hp(groups):
    return {g["name"]: g for g in groups}


@pytest.mark.parametrize("name", O.OPTIMIZERS)
def test_table1_has_no_regularizer_and_table3s_learning_rates(name):
    groups = O.resolve(name, "table1")
    assert groups[0]["lr"] == {"sgd": 0.1, "adam": 1e-3, "sgdg": 0.2, "psi-sgd": 1.0, "psi-sgdm": 0.1,
                               "sgdp": 0.1}[name]
    assert all(g.get("weight_decay", 0.0) == 0.0 and g.get("omega", 0.0) == 0.0 for g in groups)
    if name not in ("sgd", "sgdp"):
        assert _hp(groups)["rest"] == {"name": "rest", "lr": 0.1, "momentum": 0.9, "nesterov": False,
                                       "weight_decay": 0.0}


@pytest.mark.parametrize("name", O.OPTIMIZERS)
def test_table2_puts_l2_on_every_parameter_and_sgdg_gets_cho_and_lees_omega(name):
    groups = _hp(O.resolve(name, "table2"))
    if name == "sgdg":
        assert groups["psi"]["omega"] == 0.1 and groups["psi"]["grad_clip"] == 0.1 and "weight_decay" not in groups["psi"]
        assert groups["rest"]["weight_decay"] == 5e-4
    else:  # the scale-invariant weights included
        assert all(g["weight_decay"] == 5e-4 for g in groups.values())
    assert O.resolve(name, "tuned", lr=0.03)[0]["lr"] == 0.03


def test_momentum_of_each_method():
    m = {name: O.resolve(name)[0].get("momentum") for name in O.OPTIMIZERS}
    assert m == {"sgd": 0.9, "adam": None, "sgdg": 0.9, "psi-sgd": 0.0, "psi-sgdm": 0.9, "sgdp": 0.9}
    assert {O.resolve(name)[1]["momentum"] for name in ("adam", "sgdg", "psi-sgd", "psi-sgdm")} == {0.9}  # F.2's SGD


def test_settings_refuse_what_they_cannot_mean():
    with pytest.raises(ValueError, match="tuned.*learning rate"):
        O.resolve("sgd", "tuned")
    with pytest.raises(ValueError, match="unknown setting"):
        O.resolve("sgd", "table3")
    with pytest.raises(ValueError, match="omega is SGDG's"):
        O.resolve("psi-sgd", omega=0.1)
    with pytest.raises(ValueError, match="tuned"):
        Config(setting="tuned").validate()
    assert Config(setting="table2").key() != Config().key()


@pytest.mark.parametrize("setting", ["table1", "table2"])
@pytest.mark.parametrize("name", O.OPTIMIZERS)
def test_the_record_is_what_the_optimizer_reads(name, setting):
    """describe() reads the optimizer's own groups: every value resolve() chose is there, in order."""
    torch.manual_seed(0)
    opt = O.build_optimizer(name, SmallCNN(width=8), X, setting)
    record = O.describe(opt)
    assert json.loads(json.dumps(record)) == record
    assert [g["name"] for g in record] == [g["name"] for g in O.resolve(name, setting)]
    for got, want in zip(record, O.resolve(name, setting), strict=True):
        assert {k: got[k] for k in want} == {k: list(v) if isinstance(v, tuple) else v for k, v in want.items()}
    if name == "sgdg":  # keys the other role's step never reads are not recorded
        assert "omega" not in record[1] and "weight_decay" not in record[0]


def test_psi_sgd_under_table2_scales_the_regularized_gradient():
    """w <- w - lr ||w||^2 (G + lambda w) on each neuron of a scale-invariant layer (module docstring)."""
    torch.manual_seed(0)
    model = SmallCNN(width=8)
    opt = O.build_optimizer("psi-sgd", model, X, "table2")
    w = opt.psi_layers["features.0"][0]
    before = w.detach().clone()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    sq = before.flatten(1).square().sum(1).view(-1, 1, 1, 1)
    torch.testing.assert_close(w.detach(), before - 1.0 * sq * (w.grad + 5e-4 * before))


@pytest.fixture(scope="module")
def ds():
    return cifar.synthetic(n_train=300, n_test=100)


def _cfg(tmp_path, **kw):
    base = dict(dataset="synthetic", model="smallcnn", epochs=2, batch_size=50, subset=200, out=str(tmp_path),
                progress=False)
    return Config(**{**base, **kw})


def test_a_run_records_its_setting_and_groups_and_the_analysis_reads_them(tmp_path, ds, monkeypatch):
    cfg = _cfg(tmp_path, optimizer="sgdg", setting="table2", epochs=1)
    trainer.run(cfg, ds)
    c = json.loads((cfg.run_dir() / "config.json").read_text())
    assert c["setting"] == "table2" and c["lr"] is None
    torch.manual_seed(0)
    assert c["groups"] == O.describe(O.build_optimizer("sgdg", SmallCNN(width=8), X, "table2"))
    assert c["groups"][0]["omega"] == 0.1 and c["groups"][1]["weight_decay"] == 5e-4
    monkeypatch.setitem(O.LR, "sgdg", 7.0)  # today's default changes: the finished run keeps its label
    runs = load_runs(tmp_path)
    assert runs[["setting", "lr"]].to_dict("records") == [{"setting": "table2", "lr": 0.2}]
    assert load_metrics(tmp_path)["lr_base"].tolist() == [0.2]
    old = tmp_path / "synthetic-smallcnn-sgd-s0-old"  # a run made before runs recorded their groups
    old.mkdir()
    (old / "summary.json").write_text((cfg.run_dir() / "summary.json").read_text())
    (old / "config.json").write_text(json.dumps({k: v for k, v in c.items() if k not in ("groups", "setting")}))
    with pytest.warns(UserWarning, match="1 finished runs .* do not record"):
        assert len(load_runs(tmp_path)) == 1


def test_at_one_seed_every_optimizer_starts_the_same_and_sees_the_same_batches(tmp_path, ds):
    """With every learning rate near zero nothing moves, so the per-epoch training losses show
    the initial weights and the batches and augmentations: the same for every optimizer (SGDG's
    weights start scaled to unit norm, the same network but for BN's eps), another seed's differ."""
    losses = {}
    for name in O.OPTIMIZERS:
        rest = {} if name in ("sgd", "sgdp") else {"rest_lr": 1e-30}
        cfg = _cfg(tmp_path, optimizer=name, lr=1e-30, **rest)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # adamp's deprecated torch call
            trainer.run(cfg, ds)
        losses[name] = [json.loads(x)["train_loss"] for x in (cfg.run_dir() / "metrics.jsonl").read_text().splitlines()]
    sgdg = losses.pop("sgdg")
    assert all(v == losses["sgd"] for v in losses.values()), losses
    assert sgdg == pytest.approx(losses["sgd"], rel=1e-4) and sgdg != losses["sgd"]
    other = _cfg(tmp_path, optimizer="sgd", lr=1e-30, seed=1)
    trainer.run(other, ds)
    seed1 = [json.loads(x)["train_loss"] for x in (other.run_dir() / "metrics.jsonl").read_text().splitlines()]
    assert seed1 != pytest.approx(losses["sgd"], rel=1e-3)
