"""``python -m psi.bench optimizer`` and ``ops``: the cost of one optimizer step, eager and compiled, against
torch's SGD (and SGDP, geoopt's RiemannianSGD), and what the step dispatches: aten ops, host syncs and an
estimate of the GPU kernels (:class:`StepCounter`)."""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

import psi
from psi.bench.epoch import sync
from psi.bench.opcount import OpCounter
from psi.engine.models import build_model
from psi.engine.optimizers import OPTIMIZERS, build_optimizer


def _contenders(model: nn.Module, example: torch.Tensor, compile_: bool) -> dict[str, Callable[[], object]]:
    """Every contender's step, each on its own copy of ``model`` (PSISGD's flat path lays the parameters
    out in buffers of its own: two optimizers on the same tensors would take them from each other)."""
    out: dict[str, Callable[[], object]] = {}

    def add(name: str, make: Callable[[nn.Module], torch.optim.Optimizer], compiled: bool = False) -> None:
        m = copy.deepcopy(model)
        for p, q in zip(model.parameters(), m.parameters(), strict=True):
            q.grad = p.grad.clone()
        opt = make(m)
        out[name] = torch.compile(opt.step) if compiled else opt.step

    def psi_(**kw: Any) -> Callable[[nn.Module], torch.optim.Optimizer]:
        return lambda m: psi.PSISGD(psi.param_groups(m, example), lr=0.1, momentum=0.9, **kw)

    def sgd(m: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, foreach=True)

    add("torch SGD (foreach)", sgd)
    add("torch Adam (foreach)", lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True))
    add("torch Adam (fused)", lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, fused=True))
    add("psi.PSISGD (flat, default)", psi_())
    add("psi.PSISGD (fused=False)", psi_(fused=False))
    add("psi.PSISGD (foreach=False)", psi_(foreach=False))
    if compile_:
        add("torch SGD (compiled)", sgd, True)
        add("psi.PSISGD (compiled)", psi_(), True)
    try:
        from adamp import SGDP

        add("adamp.SGDP", lambda m: SGDP(m.parameters(), lr=0.1, momentum=0.9, nesterov=True))
    except ImportError:
        pass
    try:
        import geoopt

        add("geoopt.RiemannianSGD", lambda m: geoopt.optim.RiemannianSGD(m.parameters(), lr=0.1, momentum=0.9))
    except ImportError:
        pass
    return out


def bench_optimizer(model_name: str, steps: int, rounds: int, device: torch.device, compile_: bool) -> dict[str, float]:
    """Median seconds per step of every contender on ``model_name``'s parameters (the rounds interleave
    the contenders, so that a machine's drift hits them alike)."""
    torch.manual_seed(0)
    model = build_model(model_name).to(device)
    example = torch.randn(4, 3, 32, 32, device=device)
    with torch.no_grad():  # all contenders update the same tensors: start from moderate norms
        for p in model.parameters():
            p.grad = torch.randn_like(p) * 1e-3
    contenders = _contenders(model, example, compile_)
    for step in contenders.values():  # warm-up (and compilation)
        for _ in range(3):
            step()
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        for name, step in contenders.items():
            sync(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            sync(device)
            times[name].append((time.perf_counter() - t) / steps)
    return {k: statistics.median(v) for k, v in times.items()}


class StepCounter(OpCounter):
    """An :class:`OpCounter` that also says what a CPU run cannot show directly about a GPU step.

    - ``host_reads``: reads (``.item()``) of ``host_tensors``, tensors that stay on the CPU
      whatever the device: torch's Adam keeps its ``step`` counters there unless it is
      ``capturable`` or ``fused`` (and only then reads them), so that reading them never waits
      for a GPU. ``device_syncs`` is ``sync_count`` without them.
    - ``kernels``: an estimate of the GPU kernel launches. A view launches none, nor does an op
      on host tensors only or ``.item()``; a ``_foreach_`` op launches one kernel only when its tensor lists
      agree in dtype, sizes and strides (CUDA's fast route, ``check_fast_path_restrictions``
      in ATen's ``ForeachUtils.h``), else one per tensor (its slow path: a list multiplied by
      per-neuron columns, say); every other aten op launches one.
    """

    def __init__(self, host_tensors: Iterable[Tensor] = ()) -> None:
        super().__init__()
        self._host = {id(t) for t in host_tensors}
        self.host_reads = 0
        self.kernels = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        self.kernels += self._kernels(func, args)
        if func is torch.ops.aten._local_scalar_dense.default and id(args[0]) in self._host:
            self.host_reads += 1
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _kernels(self, func, args: tuple) -> int:  # noqa: ANN001
        if func.namespace != "aten" or func.is_view or func is torch.ops.aten._local_scalar_dense.default:
            return 0  # .item() copies a value back (a sync, counted as such), it launches no kernel
        lists = [a for a in args if isinstance(a, (list, tuple)) and a and isinstance(a[0], Tensor)]
        tensors = [a for a in args if isinstance(a, Tensor)] + [t for xs in lists for t in xs]
        if tensors and all(id(t) in self._host for t in tensors):
            return 0
        if not func.name().startswith("aten::_foreach_"):
            return 1
        return 1 if all(_same_layout(xs) for xs in zip(*lists, strict=True)) else len(lists[0])

    @property
    def device_syncs(self) -> int:
        return self.sync_count - self.host_reads


def _same_layout(tensors: tuple[Tensor, ...]) -> bool:
    """Same dtype, sizes and strides (a stride of a size-1 dimension is free), as CUDA's fast route wants."""
    t0 = tensors[0]
    return all(t.dtype == t0.dtype and t.shape == t0.shape and
               all(n == 1 or a == b for n, a, b in zip(t0.shape, t0.stride(), t.stride(), strict=True))
               for t in tensors[1:])


@dataclass
class StepOps:
    """What one ``opt.step()`` dispatched: aten ops, host syncs (reads of host-resident
    counters excluded), those reads, the GPU kernels it would launch (an estimate, see
    :class:`StepCounter`) and the optimizer's number of parameter groups."""

    ops: int
    syncs: int
    host_reads: int
    kernels: int
    groups: int


# ``ops`` rows beside build_optimizer's: PSISGD's per-tensor reference path, torch's Adam on every tensor
VARIANTS: dict[str, Callable[[nn.Module, Tensor], torch.optim.Optimizer]] = {
    "psi-sgd (fused=False)": lambda m, x: _per_tensor(build_optimizer("psi-sgd", m, x)),
    "psi-sgdm (fused=False)": lambda m, x: _per_tensor(build_optimizer("psi-sgdm", m, x)),
    "torch adam (foreach)": lambda m, x: torch.optim.Adam(m.parameters(), foreach=True),
    "torch adam (fused)": lambda m, x: torch.optim.Adam(m.parameters(), fused=True),
}


def _per_tensor(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    for g in opt.param_groups:  # psi groups per tensor, plain groups torch's foreach SGD
        g["fused"] = False
    return opt


def step_ops(name: str, model_name: str, at: Iterable[int] = (3,), seed: int = 0) -> dict[int, StepOps]:
    """Count steps number ``at`` (1-based; the first creates the buffers) of optimizer ``name``
    on ``model_name``. The gradients come from a backward pass on a small random batch before
    the first step and before each counted one (SGDP's branches, and so its count, depend on
    how they lie to the weights); the other steps reuse them."""
    torch.manual_seed(seed)
    model = build_model(model_name)
    x, y = torch.randn(4, 3, 8, 8), torch.randint(10, (4,))  # the CIFAR models pool globally: 8x8 will do
    opt = VARIANTS[name](model, x[:2]) if name in VARIANTS else build_optimizer(name, model, x[:2])
    out, wanted = {}, set(at)
    for step in range(1, max(wanted) + 1):
        if step == 1 or step in wanted:
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
        if step not in wanted:
            opt.step()
            continue
        steps = (s.get("step") for s in opt.state.values())
        host = [t for t in steps if isinstance(t, Tensor) and t.device.type == "cpu"]
        with StepCounter(host) as c:
            opt.step()
        out[step] = StepOps(c.total, c.device_syncs, c.host_reads, c.kernels, len(opt.param_groups))
    return out


def print_ops(models: list[str]) -> None:
    print(f"torch {torch.__version__}; one opt.step() after 2 warm-up steps, counted with psi.bench.opcount.OpCounter;\n"
          f"GPU kernels: an estimate (psi.bench.StepCounter: views launch none, a foreach op with broadcast\n"
          f"operands one per tensor)")
    for model_name in models:
        counts = {name: step_ops(name, model_name)[3] for name in [*OPTIMIZERS, *VARIANTS]}
        n = sum(p.numel() for p in build_model(model_name).parameters())
        print(f"\n{model_name} ({n / 1e6:.2f}M parameters)")
        print(f"  {'optimizer':<22} {'groups':>6} {'aten ops':>9} {'/ sgd':>7} {'host syncs':>11} {'GPU kernels':>12}")
        for name, c in counts.items():
            note = f"  (+{c.host_reads} .item() of Adam's step counters, kept on the CPU)" if c.host_reads else ""
            print(f"  {name:<22} {c.groups:>6} {c.ops:>9} {c.ops / counts['sgd'].ops:>7.2f} {c.syncs:>11} "
                  f"{c.kernels:>12}{note}")
