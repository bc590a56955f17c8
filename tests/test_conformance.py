"""PSISGD against torch.optim's contract, with torch's own OptimizerInfo for SGD.

PSISGD is registered as torch registers its optimizers: an ``OptimizerInfo`` copied from SGD's entry
in ``torch.testing._internal.common_optimizers.optim_db`` (its optim inputs, error inputs, schedulers,
supported impls, flags), with ``optim_cls=PSISGD``. The generic procedures torch applies to every
optimizer (test/test_optim.py) are written again here, on the CPU, twice:

- ``plain``: no psi group. PSISGD must then be torch's SGD, so every procedure compares it with SGD
  bit for bit (``torch.equal``) under every optim input of SGD's info (fused included).
- ``psi``: psi groups (a weight with its bias, a weight alone) beside a plain one. The step is another
  one, so the procedures check the invariants that still hold: round trips, determinism, foreach ==
  for-loop, hooks, deepcopy, older state dicts, errors, compile == eager.
"""

from __future__ import annotations

import copy
import re
import shutil
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torch.testing._internal.common_optimizers import (
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    _get_optim_inputs_including_global_cliquey_kwargs,
    optim_db,
)

import psi

# plain groups on purpose (bit-equal to torch SGD): psi's warning that they are SGD is expected here
pytestmark = pytest.mark.filterwarnings("ignore::psi.core.psisgd.NoPsiGroupWarning")

SGD_INFO = next(info for info in optim_db if info.optim_cls is torch.optim.SGD)
PSI_INFO = OptimizerInfo(
    psi.PSISGD,
    optim_inputs_func=SGD_INFO.optim_inputs_func,
    scheduler_inputs=SGD_INFO.scheduler_inputs,
    supported_impls=SGD_INFO.supported_impls,
    not_og_supported_flags=SGD_INFO.not_og_supported_flags,
    supports_sparse=SGD_INFO.supports_sparse,
    metadata_for_sparse=SGD_INFO.metadata_for_sparse,
    supports_complex=SGD_INFO.supports_complex,
    skips=SGD_INFO.decorators,
    optim_error_inputs_func=SGD_INFO.optim_error_inputs_func,
    supports_fused_on=SGD_INFO.supports_fused_on,
)
DEVICE, DTYPE = "cpu", torch.float32
# Keys that only PSISGD's groups carry (an SGD checkpoint lacks them), and those torch added after SGD's
# first release (an older checkpoint lacks them): the older state dicts drop both.
PSI_ONLY = ("psi", "max_norm")
OLD_KEYS = tuple(PSI_INFO.not_og_supported_flags) + ("nesterov",) + PSI_ONLY


def _inputs(layout: str) -> list[OptimizerInput]:
    """SGD's optim inputs with its cliquey flags (fused, differentiable: foreach has no CPU kernel, so
    torch's helper adds none; test_foreach_matches_forloop toggles it). As in torch, differentiable is
    left to its own test (in-place steps on leaves that need grad cannot be differentiable); psi groups
    refuse fused (tested in test_psi_groups_refuse_fused_differentiable_complex_sparse)."""
    skip = ("differentiable",) if layout == "plain" else ("differentiable", "fused")
    return _get_optim_inputs_including_global_cliquey_kwargs(DEVICE, DTYPE, PSI_INFO, skip=skip)


def _cases(layout: str) -> list:
    return [pytest.param(layout, i, id=f"{layout}-{i.desc}") for i in _inputs(layout)]


CASES = _cases("plain") + _cases("psi")
LAYOUTS = ["plain", "psi"]


def _tensors(seed: int = 0, dtype: torch.dtype = DTYPE) -> list[Tensor]:
    """A two-layer net's tensors: w1 (3 neurons of 4 inputs), its bias b1, w2 (2 of 3), an offset c."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (3,), (2, 3), (2,)]
    return [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]


def _groups(ts: list[Tensor], layout: str, kwargs: dict[str, Any]) -> list[dict[str, Any]]:
    """``plain``: two plain groups. ``psi``: w1 with its bias (they share neurons), w2 alone, c plain. Psi
    groups take the input's weight_decay (PSISGD's default there is 0), so that every input exercises them."""
    w1, b1, w2, c = ts
    if layout == "plain":
        return [{"params": [w1, b1]}, {"params": [w2, c]}]
    wd = {"weight_decay": kwargs["weight_decay"]} if "weight_decay" in kwargs else {}
    return [{"params": [w1, b1], "psi": True, **wd}, {"params": [w2], "psi": True, **wd}, {"params": [c]}]


_X = torch.randn(5, 4, generator=torch.Generator().manual_seed(7))


def _loss(ts: list[Tensor]) -> Tensor:
    w1, b1, w2, c = ts
    return (torch.tanh(_X.to(w1.dtype) @ w1.T + b1) @ w2.T + c).square().mean()


def _build(cls: type, layout: str, kwargs: dict[str, Any], seed: int = 0) -> tuple[list[Tensor], torch.optim.Optimizer]:
    """Fresh tensors (equal for equal seeds) and an optimizer on them; the kwargs are copied, so that two
    optimizers never share a tensor lr (schedulers write into it)."""
    ts = _tensors(seed)
    kwargs = copy.deepcopy(kwargs)
    return ts, cls(_groups(ts, layout, kwargs), **kwargs)


def _train(opt: torch.optim.Optimizer, ts: list[Tensor], steps: int, schedulers: list | None = None) -> Tensor:
    loss = torch.zeros(())
    for _ in range(steps):
        opt.zero_grad()
        loss = _loss(ts)
        loss.backward()
        opt.step()
        for s in schedulers or []:
            s.step(loss.item()) if isinstance(s, ReduceLROnPlateau) else s.step()
    return loss


def _same(a: Any, b: Any) -> bool:
    """Equal to the bit, through nested dicts, lists and tensors."""
    if isinstance(a, Tensor) or isinstance(b, Tensor):
        return isinstance(a, Tensor) and isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def _assert_same_tensors(a: list[Tensor], b: list[Tensor]) -> None:
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y), (x, y)


def _without(sd: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    sd = copy.deepcopy(sd)
    for group in sd["param_groups"]:
        for k in keys:
            group.pop(k, None)
    return sd


# -- plain groups: torch's SGD, bit for bit -----------------------------------------------------------

@pytest.mark.parametrize("optim_input", _inputs("plain"), ids=lambda i: i.desc)
def test_plain_groups_are_sgd_bit_for_bit(optim_input: OptimizerInput) -> None:
    """Steps, momentum buffers and state dicts equal SGD's; an SGD checkpoint loads into a PSISGD and
    continues as SGD continues; and the other way round."""
    kw = optim_input.kwargs
    ts, sgd = _build(torch.optim.SGD, "plain", kw)
    qs, opt = _build(psi.PSISGD, "plain", kw)
    _train(sgd, ts, 4)
    _train(opt, qs, 4)
    _assert_same_tensors(ts, qs)
    assert _same(_without(sgd.state_dict(), PSI_ONLY), _without(opt.state_dict(), PSI_ONLY))
    us, resumed = _build(psi.PSISGD, "plain", kw, seed=1)
    vs, back = _build(torch.optim.SGD, "plain", kw, seed=1)
    with torch.no_grad():
        for u, v, t in zip(us, vs, ts, strict=True):
            u.copy_(t)
            v.copy_(t)
    resumed.load_state_dict(copy.deepcopy(sgd.state_dict()))
    back.load_state_dict(_without(opt.state_dict(), PSI_ONLY))
    for o, xs in ((sgd, ts), (resumed, us), (back, vs)):
        _train(o, xs, 3)
    _assert_same_tensors(ts, us)
    _assert_same_tensors(ts, vs)


def test_plain_groups_differentiable_is_sgds() -> None:
    """differentiable=True (torch's test_differentiable: one step of a cloned parameter, differentiated
    through): the same values and the same derivatives as SGD's, with respect to the parameter, the
    momentum buffer and a tensor lr."""
    results = []
    for cls in (torch.optim.SGD, psi.PSISGD):
        g = torch.Generator().manual_seed(0)
        w0, buf0, grad = (torch.randn(3, 4, generator=g, dtype=torch.float64) for _ in range(3))
        w0.requires_grad_()
        buf0.requires_grad_()
        lr = torch.tensor(0.1, dtype=torch.float64, requires_grad=True)
        p = w0.clone()
        p.grad = grad
        opt = cls([p], lr=lr, momentum=0.9, weight_decay=0.1, differentiable=True)
        opt.state[p]["momentum_buffer"] = buf0.clone()
        opt.step()
        buf = opt.state[p]["momentum_buffer"]
        out = (p.square().sum() + buf.square().sum())
        results.append((p.detach().clone(), *torch.autograd.grad(out, (w0, buf0, lr))))
    assert _same(results[0], results[1])


@pytest.mark.parametrize("kw", [dict(lr=0.1), dict(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=True)],
                         ids=["sgd", "momentum-wd-maximize"])
@pytest.mark.parametrize("foreach", [False, True])
def test_plain_groups_complex_are_sgds(kw: dict[str, Any], foreach: bool) -> None:
    """SGD supports complex parameters (its info's supports_complex): so do plain groups, to the bit."""
    out = []
    for cls in (torch.optim.SGD, psi.PSISGD):
        torch.manual_seed(0)
        p = torch.randn(4, 3, dtype=torch.complex64, requires_grad=True)
        opt = cls([p], foreach=foreach, **kw)
        for _ in range(3):
            p.grad = torch.randn_like(p)
            opt.step()
        out.append(p.detach())
    assert torch.equal(out[0], out[1])


def test_plain_groups_sparse_grads_are_sgds() -> None:
    """SGD's sparse test (supports_sparse, metadata_for_sparse's kwargs and scheduler), uncoalesced grads."""
    kwargs, scheds = SGD_INFO.metadata_for_sparse
    out = []
    for cls in (torch.optim.SGD, psi.PSISGD):
        p = torch.tensor([1.5, 1.5], requires_grad=True)
        opt = cls([p], **kwargs)
        schedulers = [s(opt) for s in scheds]
        for i in range(20):
            idx = torch.tensor([[i % 2, i % 2]])
            p.grad = torch.sparse_coo_tensor(idx, torch.tensor([0.25, 0.75]) * (i + 1), (2,), check_invariants=True)
            opt.step()
            for s in schedulers:
                s.step()
        out.append(p.detach())
    assert torch.equal(out[0], out[1])


# -- both layouts: torch's generic procedures -------------------------------------------------------

@pytest.mark.parametrize(("layout", "optim_input"), CASES)
def test_state_dict_round_trip_is_deterministic(layout: str, optim_input: OptimizerInput) -> None:
    """torch's test_state_dict_deterministic: a fresh optimizer loading the state dict continues as the
    original to the bit; loading leaves the dict untouched; equal states give equal state dicts."""
    kw = optim_input.kwargs
    ts, opt = _build(psi.PSISGD, layout, kw)
    _train(opt, ts, 3)
    qs, twin = _build(psi.PSISGD, layout, kw, seed=1)
    with torch.no_grad():
        for q, t in zip(qs, ts, strict=True):
            q.copy_(t)
    sd = copy.deepcopy(opt.state_dict())
    twin.load_state_dict(sd)
    assert _same(sd, opt.state_dict())
    _train(opt, ts, 3)
    _train(twin, qs, 3)
    _assert_same_tensors(ts, qs)
    assert _same(opt.state_dict(), twin.state_dict())


@pytest.mark.parametrize(("layout", "optim_input"), CASES)
def test_can_load_older_state_dict(layout: str, optim_input: OptimizerInput) -> None:
    """torch's test_can_load_older_state_dict: groups without the flags added after SGD's first release
    (and without PSISGD's own keys, as an older psi or torch's SGD saved them) load, step, and continue as
    the full state dict does: a psi group stays psi."""
    kw = optim_input.kwargs
    ts, opt = _build(psi.PSISGD, layout, kw)
    _train(opt, ts, 3)
    full, old = copy.deepcopy(opt.state_dict()), _without(opt.state_dict(), OLD_KEYS)
    results = []
    for sd in (full, old):
        qs, other = _build(psi.PSISGD, layout, kw, seed=1)
        with torch.no_grad():
            for q, t in zip(qs, ts, strict=True):
                q.copy_(t)
        other.load_state_dict(sd)
        _train(other, qs, 3)
        results.append(qs)
    _assert_same_tensors(*results)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_unpickled_old_optimizer_fills_its_groups(layout: str) -> None:
    """An optimizer pickled before a key existed (torch's SGD.__setstate__ case) steps after unpickling."""
    ts, opt = _build(psi.PSISGD, layout, dict(lr=0.1, momentum=0.9))
    _train(opt, ts, 1)
    state = opt.__getstate__()
    state = {**state, "param_groups": [{k: v for k, v in g.items() if k not in OLD_KEYS} for g in state["param_groups"]],
             "defaults": {k: v for k, v in state["defaults"].items() if k not in OLD_KEYS}}
    other = psi.PSISGD.__new__(psi.PSISGD)
    other.__setstate__(state)
    assert all(g["psi"] is False and g["foreach"] is None and g["fused"] is False for g in other.param_groups)
    _train(other, ts, 1)


@pytest.mark.parametrize(("layout", "optim_input"), CASES)
def test_deepcopy_continues_as_the_original(layout: str, optim_input: OptimizerInput) -> None:
    """torch's test_deepcopy_copies_all_public_attrs, and a deepcopy of tensors and optimizer together
    steps as the original does."""
    ts, opt = _build(psi.PSISGD, layout, optim_input.kwargs)
    _train(opt, ts, 2)

    def public(o: object) -> set[str]:
        return {k for k in o.__dict__ if not k.startswith("_")}

    assert public(opt) == public(copy.deepcopy(opt))
    qs, twin = copy.deepcopy((ts, opt))
    _train(opt, ts, 2)
    _train(twin, qs, 2)
    _assert_same_tensors(ts, qs)


@pytest.mark.parametrize(("layout", "optim_input"), [c for c in CASES if not c.values[1].kwargs.get("fused")])
def test_foreach_matches_forloop(layout: str, optim_input: OptimizerInput) -> None:
    """torch's test_foreach_matches_forloop, on the CPU and to the bit (both paths make the same ops);
    plain groups are also SGD's with foreach=True. fused inputs are left out (fused excludes foreach:
    test_validation_is_sgds)."""
    out = []
    runs = [(psi.PSISGD, False), (psi.PSISGD, True)] + ([(torch.optim.SGD, True)] if layout == "plain" else [])
    for cls, foreach in runs:
        ts, opt = _build(cls, layout, {**optim_input.kwargs, "foreach": foreach})
        _train(opt, ts, 4)
        out.append((ts, opt.state_dict()["state"]))
    for ts, state in out[1:]:
        _assert_same_tensors(out[0][0], ts)
        assert _same(out[0][1], state)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("schedulers", range(len(SGD_INFO.scheduler_inputs)))
@pytest.mark.parametrize("lr", [0.01, torch.tensor(0.01)], ids=["float-lr", "tensor-lr"])
def test_lr_schedulers(layout: str, schedulers: int, lr: float | Tensor) -> None:
    """SGD's info's scheduler sets: a schedule moves a PSISGD group's lr exactly as it moves SGD's (plain:
    and the steps are SGD's to the bit); the loss goes down (torch's test_forloop_goes_right_direction)."""
    kw = dict(lr=lr, momentum=0.9)
    ts, sgd = _build(torch.optim.SGD, "plain", kw)
    qs, opt = _build(psi.PSISGD, layout, kw)
    start = _loss(qs).item()
    lrs = []
    for o, xs in ((sgd, ts), (opt, qs)):
        scheds = [make(o) for make in SGD_INFO.scheduler_inputs[schedulers]]
        lrs.append([])
        for _ in range(6):
            _train(o, xs, 1, scheds)
            lrs[-1].append(float(o.param_groups[0]["lr"]))
    assert lrs[0] == lrs[1]
    assert isinstance(opt.param_groups[0]["lr"], Tensor) == isinstance(lr, Tensor)
    if layout == "plain":
        _assert_same_tensors(ts, qs)
    assert _loss(qs).item() < start


@pytest.mark.parametrize("layout", LAYOUTS)
def test_tensor_lr(layout: str) -> None:
    """torch's test_tensor_lr: a 1-element tensor lr of any shape steps as a float lr (to the bit: float32
    tensors and a float scalar meet in float32); a tensor lr of more elements is refused as torch does."""
    out = []
    for lr in (0.01, torch.tensor(0.01), torch.tensor([0.01]), torch.tensor([[0.01]])):
        ts, opt = _build(psi.PSISGD, layout, dict(lr=lr, momentum=0.9, weight_decay=0.1))
        _train(opt, ts, 3)
        out.append(ts)
    for ts in out[1:]:
        _assert_same_tensors(out[0], ts)
    with pytest.raises(ValueError, match="Tensor lr must be 1-element"):
        _build(psi.PSISGD, layout, dict(lr=torch.tensor([0.01, 0.01])))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_closure(layout: str) -> None:
    """step(closure) returns the closure's loss, evaluated with gradients on, and steps as without it."""
    ts, opt = _build(psi.PSISGD, layout, dict(lr=0.1, momentum=0.9))
    qs, twin = _build(psi.PSISGD, layout, dict(lr=0.1, momentum=0.9))
    for _ in range(3):
        def closure() -> Tensor:
            opt.zero_grad()
            loss = _loss(ts)
            loss.backward()
            return loss

        with torch.no_grad():
            loss = opt.step(closure)
        assert loss.requires_grad
        _train(twin, qs, 1)
    _assert_same_tensors(ts, qs)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(layout: str, set_to_none: bool) -> None:
    ts, opt = _build(psi.PSISGD, layout, dict(lr=0.1))
    _loss(ts).backward()
    opt.zero_grad(set_to_none=set_to_none)
    for t in ts:
        assert t.grad is None if set_to_none else torch.equal(t.grad, torch.zeros_like(t))


@pytest.mark.parametrize("layout", LAYOUTS)
def test_step_without_gradients_is_a_noop(layout: str) -> None:
    """torch's test_step_is_noop_when_params_have_no_grad: nothing moves, no state appears."""
    ts, opt = _build(psi.PSISGD, layout, dict(lr=0.1, momentum=0.9, weight_decay=0.1))
    before = [t.detach().clone() for t in ts]
    opt.step()
    _assert_same_tensors(before, ts)
    assert not opt.state


@pytest.mark.parametrize("layout", LAYOUTS)
def test_add_param_group(layout: str) -> None:
    """Groups added after construction get the defaults and step as groups given at construction."""
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.1)
    ts, whole = _build(psi.PSISGD, layout, kw)
    qs = _tensors()
    groups = _groups(qs, layout, kw)
    late = psi.PSISGD(groups[:1], **kw)
    for g in groups[1:]:
        late.add_param_group(g)
    assert [{k: v for k, v in g.items() if k != "params"} for g in late.param_groups] == \
        [{k: v for k, v in g.items() if k != "params"} for g in whole.param_groups]
    _train(whole, ts, 3)
    _train(late, qs, 3)
    _assert_same_tensors(ts, qs)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_hooks(layout: str) -> None:
    """torch's hook tests: step pre/post hooks run around every step, state_dict and load_state_dict
    pre/post hooks run (prepend honoured) and what a post hook returns is what the caller gets."""
    ts, opt = _build(psi.PSISGD, layout, dict(lr=0.1, momentum=0.9))
    calls: list[str] = []
    handles = [opt.register_step_pre_hook(lambda o, a, k: calls.append("pre")),
               opt.register_step_post_hook(lambda o, a, k: calls.append("post"))]
    _train(opt, ts, 2)
    assert calls == ["pre", "post"] * 2
    for h in handles:
        h.remove()
    _train(opt, ts, 1)
    assert calls == ["pre", "post"] * 2

    opt.register_state_dict_pre_hook(lambda o: calls.append("sd-pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "tag": 1})
    sd = opt.state_dict()
    assert calls[-1] == "sd-pre" and sd["tag"] == 1

    def load_pre(o: torch.optim.Optimizer, sd: dict[str, Any]) -> dict[str, Any]:
        calls.append("load-pre")
        return {k: v for k, v in sd.items() if k != "tag"}

    opt.register_load_state_dict_pre_hook(load_pre)
    opt.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load-first"), prepend=True)
    opt.register_load_state_dict_post_hook(lambda o: calls.append("load-post"))
    opt.load_state_dict(sd)
    assert calls[-3:] == ["load-first", "load-pre", "load-post"]
    _train(opt, ts, 1)


def _psi_error_params(params: Any) -> Any:
    """An error input's params as psi groups (a bare tensor, not an iterable, stays: that is the error)."""
    if params is None or isinstance(params, Tensor):
        return params
    if all(isinstance(p, dict) for p in params):
        return [{**p, "psi": True} for p in params]
    return [{"params": params, "psi": True}]


def _outcome(make: Callable[[], None], warning: bool) -> tuple[type, str]:
    """The type and message of what ``make`` raises (or warns, for a warning input)."""
    if warning:
        with pytest.warns(Warning) as record:
            make()
        return record[0].category, str(record[0].message)
    with pytest.raises(Exception) as info:
        make()
    return info.type, str(info.value)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("error_input", PSI_INFO.optim_error_inputs_func(DEVICE, DTYPE),
                         ids=lambda e: e.optimizer_error_input.desc)
def test_errors(layout: str, error_input: Any) -> None:
    """torch's test_errors over SGD's error inputs: the same type and message as SGD gives, matching the
    input's regex, on plain groups and on psi groups alike."""
    inp = error_input.optimizer_error_input
    warning = issubclass(error_input.error_type, Warning)
    seen = []
    for cls, lay in ((torch.optim.SGD, "plain"), (psi.PSISGD, layout)):
        def make(cls: type = cls, lay: str = lay) -> None:
            params = inp.params if lay == "plain" else _psi_error_params(inp.params)
            if params is None:
                params = _groups(_tensors(), lay, inp.kwargs)
            opt = cls(params, **inp.kwargs)
            if error_input.error_on == OptimizerErrorEnum.STEP_ERROR:
                opt.step()

        seen.append(_outcome(make, warning))
    assert seen[0] == seen[1]
    assert issubclass(seen[1][0], error_input.error_type)
    assert re.search(error_input.error_regex, seen[1][1])


BAD_KWARGS = [dict(lr=-0.1), dict(momentum=-0.5), dict(weight_decay=-1e-3), dict(nesterov=True),
              dict(nesterov=True, momentum=0.9, dampening=0.1), dict(fused=True, foreach=True),
              dict(fused=True, differentiable=True)]


@pytest.mark.parametrize("kw", BAD_KWARGS, ids=lambda kw: "-".join(kw))
def test_validation_is_sgds(kw: dict[str, Any]) -> None:
    """The constructor's checks beyond SGD's error inputs: same exception type, same message."""
    seen = [_outcome(lambda cls=cls: cls(_tensors(), **kw), False) for cls in (torch.optim.SGD, psi.PSISGD)]
    assert seen[0] == seen[1]


def test_psi_groups_refuse_fused_differentiable_complex_sparse() -> None:
    """What a psi group cannot honour raises, naming the setting and the way out; the same settings on
    the plain group of the same optimizer are honoured (fused: the plain group steps as SGD's fused)."""
    w, c = _tensors()[0], _tensors()[3]
    key = "differentiable"  # fused=True on a psi group is its flat path (tests/test_flat.py)
    with pytest.raises(RuntimeError, match=f"{key}=True is not supported on a psi group.*{key}=False"):
        psi.PSISGD([{"params": [w], "psi": True}], lr=0.1, **{key: True})
    opt = psi.PSISGD([{"params": [w], "psi": True, "differentiable": False}, {"params": [c]}], lr=0.1)
    opt.param_groups[0]["differentiable"] = True  # set after construction: refused at the step
    w.grad = torch.ones_like(w)
    with pytest.raises(RuntimeError, match="differentiable=True is not supported on a psi group"):
        opt.step()
    opt.param_groups[0].update(differentiable=False, fused=True, foreach=True)
    with pytest.raises(RuntimeError, match="`fused` and `foreach` cannot be `True` together"):
        opt.step()
    # differentiable=True on the optimizer, off on its psi group: the plain group is differentiated through
    w0 = torch.randn(3, dtype=torch.float64, requires_grad=True)
    c, v = w0.clone(), torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    opt = psi.PSISGD([{"params": [v], "psi": True, "differentiable": False}, {"params": [c]}], lr=0.1, differentiable=True)
    c.grad, v.grad = torch.ones(3, dtype=torch.float64), torch.ones(3, 2, dtype=torch.float64)
    v0 = v.detach().clone()
    opt.step()
    assert torch.equal(torch.autograd.grad(c.sum(), w0)[0], torch.ones(3, dtype=torch.float64))
    assert not torch.equal(v.detach(), v0) and v.grad_fn is None  # it stepped, without autograd
    with pytest.raises(ValueError, match="psi group .* real floating-point tensors, got torch.complex64"):
        psi.PSISGD([{"params": [torch.randn(3, 2, dtype=torch.complex64, requires_grad=True)], "psi": True}], lr=0.1)
    opt = psi.PSISGD([{"params": [w], "psi": True}], lr=0.1)
    w.grad = torch.sparse_coo_tensor(torch.tensor([[0], [1]]), torch.tensor([1.0]), w.shape, check_invariants=True)
    with pytest.raises(RuntimeError, match="does not support sparse gradients in a psi group"):
        opt.step()


def test_fused_plain_group_beside_psi_groups() -> None:
    """fused=True on the optimizer with psi groups set fused=False: the plain group is SGD's fused step,
    and GradScaler unscales every gradient itself (psi groups need them unscaled)."""
    kw = dict(lr=0.1, momentum=0.9)
    ts, ref = _build(psi.PSISGD, "psi", kw)
    qs = _tensors()
    groups = [{**g, "fused": False} if g.get("psi") else g for g in _groups(qs, "psi", kw)]
    opt = psi.PSISGD(groups, fused=True, **kw)
    assert opt.param_groups[-1]["fused"] and not opt._step_supports_amp_scaling
    assert psi.PSISGD(_tensors(), fused=True)._step_supports_amp_scaling
    _train(ref, ts, 3)
    _train(opt, qs, 3)
    torch.testing.assert_close(qs, ts)  # fused and unfused SGD agree to rounding
    _assert_same_tensors(qs[:3], ts[:3])  # the psi groups to the bit


def test_maximize_is_minimizing_the_negated_loss() -> None:
    """maximize (with weight decay and momentum) on every group equals minimizing -loss, to the bit."""
    out = []
    for maximize in (True, False):
        ts, opt = _build(psi.PSISGD, "psi", dict(lr=0.1, momentum=0.9, weight_decay=0.1, maximize=maximize))
        for _ in range(3):
            opt.zero_grad()
            (_loss(ts) if maximize else -_loss(ts)).backward()
            opt.step()
        out.append(ts)
    _assert_same_tensors(*out)


_HAS_CXX = any(shutil.which(c) for c in ("g++", "c++", "clang++"))


@pytest.mark.skipif(not _HAS_CXX, reason="inductor needs a C++ compiler on the CPU")
@pytest.mark.parametrize("layout", LAYOUTS)
def test_compiled_step_matches_eager(layout: str) -> None:
    """torch's compiled-optimizer tests (test/inductor/test_compiled_optimizers.py), one short case per
    layout, to rounding on both (inductor fuses the ops into other roundings, for torch's SGD as well:
    a few float32 ulps after 3 steps)."""
    torch._dynamo.reset()
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.1, foreach=True)
    ts, eager = _build(psi.PSISGD, layout, kw)
    qs, compiled = _build(psi.PSISGD, layout, kw)
    step = torch.compile(compiled.step)
    for _ in range(3):
        for xs, o, fn in ((ts, eager, eager.step), (qs, compiled, step)):
            o.zero_grad()
            _loss(xs).backward()
            fn()
    torch.testing.assert_close(qs, ts, rtol=1e-6, atol=1e-6)
    bufs = [[o.state[t]["momentum_buffer"] for t in xs] for o, xs in ((compiled, qs), (eager, ts))]
    torch.testing.assert_close(*bufs, rtol=1e-6, atol=1e-6)
