"""The flat path of PSISGD (issue 18, psi/core/flat.py) against the per-tensor reference (``fused=False``):
the same bits on several networks and settings, and what can break flat buffers handled."""

import copy
import shutil
import warnings

import pytest
import torch
from torch import nn

import psi
from psi.core.flat import why_not_flat
from psi.engine import models
from tests.nets import DenseSE, Mixed, OneByOne

NETS = {"mixed": (Mixed, (6, 3, 16, 16)), "dense-se": (DenseSE, (6, 3, 8, 8)), "resnet20": (models.resnet20, (4, 3, 8, 8)),
        "one-by-one": (OneByOne, (6, 3, 4, 4))}

SETTINGS = {  # each with a learning-rate change at step 50 (the schedule's case)
    "sgd": dict(momentum=0.0),
    "sgdm": dict(momentum=0.9),
    "nesterov-wd": dict(momentum=0.9, nesterov=True, weight_decay=1e-3),
    "maximize-dampening": dict(momentum=0.8, dampening=0.3, weight_decay=1e-3, maximize=True),
    "tensor-lr": dict(momentum=0.9, lr=torch.tensor(0.05)),
    "max-norm": dict(momentum=0.9, max_norm="fires"),
}


def _pair(net: str, dtype: torch.dtype, channels_last: bool = False, hold_back: int = 0, **kw):
    """Two copies of a network with their PSISGD: the flat path (default) and the reference (fused=False).
    ``max_norm="fires"``: the median neuron norm at the start, so that the safeguard rescales at once.
    ``hold_back``: that many psi groups are left out, for add_param_group."""
    make, shape = NETS[net]
    torch.manual_seed(0)
    model = make().to(dtype)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(shape, dtype=dtype)
    groups = psi.param_groups(model, x)
    if kw.get("max_norm") == "fires":
        norms = torch.cat([p.flatten(1).norm(dim=1) for g in groups if g["psi"] for p in g["params"] if p.dim() > 1])
        kw["max_norm"] = norms.median().item()
    kw.setdefault("lr", 0.05)
    out = []
    for fused in (None, False):
        m = copy.deepcopy(model)
        names = {id(p): n for n, p in model.named_parameters()}
        own = dict(m.named_parameters())
        gs = [{**g, "params": [own[names[id(p)]] for p in g["params"]]} for g in groups]
        later = [g for g in gs if g["psi"]][-hold_back:] if hold_back else []
        gs = [{**g, "fused": fused} for g in gs if not any(g is h for h in later)]  # plain groups too
        opt = psi.PSISGD(gs, **{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kw.items()})
        out.append((m, opt, [{**g, "fused": fused} for g in later]))
    return out, x


def _loss(model: nn.Module, x: torch.Tensor, step: int) -> torch.Tensor:
    torch.manual_seed(step)  # dropout alike in both copies
    return model(x).square().mean()


def _step(model, opt, x, step, scaler=None, before=None):
    opt.zero_grad()
    loss = _loss(model, x.to(next(model.parameters()).dtype), step)
    if opt.defaults["maximize"]:
        loss = -loss  # maximize -loss: the same descent, bounded
    if scaler is None:
        loss.backward()
    else:
        scaler.scale(loss).backward()
    if before is not None:
        before(model)
    if scaler is None:
        opt.step()
    else:
        scaler.step(opt)
        scaler.update()


def _set_lr(opt, factor):
    for g in opt.param_groups:
        if isinstance(g["lr"], torch.Tensor):
            g["lr"].mul_(factor)
        else:
            g["lr"] *= factor


def _assert_same(a, b):
    (ma, oa, _), (mb, ob, _) = a, b
    for (n, p), q in zip(ma.named_parameters(), mb.parameters(), strict=True):
        assert torch.equal(p, q), f"{n}: {(p - q).abs().max()}"
    pa, pb = list(ma.parameters()), list(mb.parameters())
    for p, q in zip(pa, pb, strict=True):
        ua, ub = oa.state.get(p, {}).get("momentum_buffer"), ob.state.get(q, {}).get("momentum_buffer")
        assert (ua is None) == (ub is None) and (ua is None or torch.equal(ua, ub))


def _run(pair, x, steps, at=None, **kw):
    for t in range(steps):
        if at is not None:
            at(t, pair)
        for m, opt, _ in pair:
            _step(m, opt, x, t, **kw)


def _lr_change(t, pair):
    if t == 50:
        for _, opt, _ in pair:
            _set_lr(opt, 0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("net", NETS)
def test_flat_path_gives_the_reference_bits(net, setting, dtype):
    pair, x = _pair(net, dtype, **SETTINGS[setting])
    _run(pair, x, 100, at=_lr_change)
    _assert_same(*pair)
    assert all(torch.isfinite(p).all() for p in pair[0][0].parameters())
    assert pair[0][1]._flat and not pair[1][1]._flat  # the flat path was taken, the reference stayed per tensor


def test_the_safeguard_fires_in_its_setting():
    pair, x = _pair("mixed", torch.float32, **SETTINGS["max-norm"])
    cap = pair[0][1].param_groups[0]["max_norm"]
    w = pair[0][1].param_groups[0]["params"][0]
    assert w.flatten(1).norm(dim=1).max() > cap
    _run(pair, x, 3)
    _assert_same(*pair)


@pytest.mark.parametrize("net", ["mixed", "resnet20"])
def test_channels_last_weights(net):
    pair, x = _pair(net, torch.float32, channels_last=True, momentum=0.9, max_norm="fires")
    x = x.to(memory_format=torch.channels_last)
    _run(pair, x, 30)
    _assert_same(*pair)
    w = next(p for p in pair[0][0].parameters() if p.dim() == 4 and p.shape[1] > 1)
    assert w.is_contiguous(memory_format=torch.channels_last) and pair[0][1]._flat


def _rebind(kind):
    def at(t, pair):
        if t != 20:
            return
        for i, (m, opt, later) in enumerate(pair):
            if kind == "double":  # the flat momentum takes the new dtype (as load_state_dict casts the state):
                m.double()  # so does the reference's here, which keeps float32 buffers otherwise
                for st in opt.state.values():
                    st["momentum_buffer"] = st["momentum_buffer"].double()
            elif kind == "channels-last":
                m.to(memory_format=torch.channels_last)
            else:  # a user assigning p.data
                p = next(p for p in m.parameters() if p.dim() == 4)
                p.data = p.data.clone() * 2
            pair[i] = (m, opt, later)
    return at


@pytest.mark.parametrize("kind", ["double", "channels-last", "assign-data"])
def test_a_rebound_parameter_is_laid_out_again(kind):
    """model.double(), .to(memory_format=...), p.data = ...: the step updates the new tensors (the buffers
    are laid out again from them), never a stale buffer, and keeps the reference's bits."""
    pair, x = _pair("mixed", torch.float32, momentum=0.9)
    _run(pair, x, 40, at=_rebind(kind))
    _assert_same(*pair)
    m, opt, _ = pair[0]
    flat = next(iter(opt._flat.values()))
    assert all(p.data_ptr() == ptr for p, ptr in zip(flat.params, flat.pointers, strict=True))
    if kind == "double":
        assert flat.weight.dtype == torch.float64


def test_a_step_with_some_gradients_none_skips_them_as_the_reference():
    """A psi tensor without a gradient in a step takes no step (torch's rule) and still counts in its
    neuron's norm: that step takes the per-tensor path, the next ones the flat one again."""
    def drop(model):
        if drop.t % 3 == 0:
            for m in (model.fc1,):
                m.weight.grad = None
    pair, x = _pair("mixed", torch.float32, momentum=0.9)
    for t in range(12):
        drop.t = t
        for m, opt, _ in pair:
            _step(m, opt, x, t, before=drop)
    _assert_same(*pair)


def test_add_param_group_after_steps():
    pair, x = _pair("mixed", torch.float32, hold_back=2, momentum=0.9)

    def add(t, pair):
        if t == 10:
            for _, opt, later in pair:
                for g in later:
                    opt.add_param_group(g)
    _run(pair, x, 25, at=add)
    _assert_same(*pair)
    opt = pair[0][1]
    assert sum(len(f.params) for f in opt._flat.values()) == sum(len(g["params"]) for g in opt.param_groups)


def test_grad_scaler_unscales_and_skips_steps_on_inf():
    def poison(model):
        if poison.t == 5:
            model.fc1.weight.grad[0, 0] = float("inf")
    pair, x = _pair("mixed", torch.float32, momentum=0.9)
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**10) for _ in pair]
    for t in range(12):
        poison.t = t
        if t == 5:
            before = [p.clone() for p in pair[0][0].parameters()]
        for (m, opt, _), s in zip(pair, scalers, strict=True):
            _step(m, opt, x, t, scaler=s, before=poison)
        if t == 5:  # the step with an inf was skipped
            assert all(torch.equal(p, q) for p, q in zip(pair[0][0].parameters(), before, strict=True))
    _assert_same(*pair)
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**10


def test_state_dict_moves_between_the_paths():
    """A checkpoint of the flat path continues on the reference and back, to the bit: the state dict
    is per parameter on both (and carries its groups' ``fused``, as torch's does: the two swap paths)."""
    pair, x = _pair("mixed", torch.float32, momentum=0.9, nesterov=True)
    _run(pair, x, 10)
    (mf, of, _), (mr, orf, _) = pair
    saved_flat, saved_ref = copy.deepcopy(of.state_dict()), copy.deepcopy(orf.state_dict())
    assert set(saved_flat["state"]) == set(saved_ref["state"])
    for k, st in saved_flat["state"].items():  # by parameter index (the two fill their state in other orders)
        assert torch.equal(st["momentum_buffer"], saved_ref["state"][k]["momentum_buffer"])
    of.load_state_dict(saved_ref)
    orf.load_state_dict(saved_flat)
    _run(pair, x, 10)
    _assert_same(*pair)
    for flat in orf._flat.values():  # laid out on its first flat step, the loaded momentum taken in
        assert all(orf.state[p]["momentum_buffer"] is v for p, v in zip(flat.params, flat.momentum_views, strict=True))
    assert of.param_groups[0]["fused"] is False


def test_an_unsupported_layout_takes_the_reference_path_with_a_warning():
    pair, x = _pair("mixed", torch.float32, momentum=0.9)
    for m, _, _ in pair:  # a transposed (non-contiguous) Linear weight
        m.fc1.weight.data = m.fc1.weight.data.t().contiguous().t()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _run(pair, x, 5)
    assert any("neither contiguous nor channels-last" in str(w.message) for w in caught)
    _assert_same(*pair)
    assert all(p is not pair[0][0].fc1.weight for f in pair[0][1]._flat.values() for p in f.params)


def test_why_not_flat_names_the_reason():
    a, b = torch.randn(4, 3), torch.randn(5, 3)
    assert why_not_flat([a, b]) is None
    assert why_not_flat([a, b.double()]).startswith("tensors of several dtypes")
    assert "neither contiguous" in why_not_flat([torch.randn(3, 4).t()])
    assert "layout" in why_not_flat([torch.randn(4, 3).to_sparse()]) or "sparse" in why_not_flat([a.to_sparse()])
    assert why_not_flat([torch.randn(2, 3, 4, 4).to(memory_format=torch.channels_last)]) is None
    assert why_not_flat([a, torch.empty(5, 3, device="meta")]).startswith("tensors on several devices")

    class Sub(torch.Tensor):  # as DTensor and FSDP's flat parameters are
        pass

    assert "tensor subclass" in why_not_flat([a, a.as_subclass(Sub)])
    assert why_not_flat([torch.empty(0, 3)]).startswith("an empty tensor")


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++")), reason="inductor needs a C++ compiler")
def test_compiled_steps_after_eager_ones_match_and_do_not_recompile_on_lr_changes():
    """The first steps eager (they lay the buffers out), then the compiled step: equal to eager to
    rounding, and a tensor learning rate changed at every step compiles once."""
    torch._dynamo.reset()
    pair, x = _pair("mixed", torch.float32, momentum=0.9, lr=torch.tensor(0.05))
    _run(pair, x, 2)
    (mf, of, _), (mr, orf, _) = pair
    compiled = torch.compile(of.step)
    torch._dynamo.utils.counters.clear()
    for t in range(2, 8):
        for m, opt, step in ((mf, of, compiled), (mr, orf, orf.step)):
            opt.zero_grad()
            _loss(m, x, t).backward()
            step()
            _set_lr(opt, 0.9)
    for p, q in zip(mf.parameters(), mr.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1
