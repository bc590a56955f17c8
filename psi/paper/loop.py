"""The one training loop of the small experiments (notebooks 01-03).

Why one loop: the experiments compare runs step by step (two equivalent networks drifting
apart, SGD against PSI-SGD on the same path, a rate measured over many horizons), which is only
fair when every run sees the same batches in the same order. :func:`train_steps` draws them from
its own seeded generator, so two calls with the same ``seed`` and data size see the same batches
whatever the model or optimizer.

It is a generator: it yields after every step, when the parameters are updated and ``.grad``
still holds the gradient that step used, so a caller measures what it needs (a distance, a
norm, a full-batch gradient) without a copy of the loop. What must be read at the parameters
the gradient was taken at (the gradient norm of the theorems, ``||w(i)|| ||G(i)||``) goes in the
``before_step`` hook, called when the gradient is ready and the step not yet taken.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["Step", "batch_indices", "steps_per_epoch", "train_steps"]


@dataclass(frozen=True)
class Step:
    """What one step did: ``index`` steps taken so far (1 after the first); ``loss`` of the batch
    it used, at the parameters before the step; ``epoch_end``: it finished a pass over the data."""

    index: int
    loss: float
    epoch_end: bool


def steps_per_epoch(n: int, batch_size: int | None) -> int:
    """Steps in one pass over ``n`` samples (the remainder of a pass is dropped; full batch: 1)."""
    if batch_size is None or batch_size >= n:
        return 1
    return n // batch_size


def batch_indices(n: int, batch_size: int | None, generator: torch.Generator) -> Iterator[tuple[Tensor | None, bool]]:
    """An endless stream of ``(indices, epoch_end)``: successive random permutations of ``range(n)``
    cut into batches of ``batch_size`` (random reshuffling; the remainder of each pass is dropped,
    so every batch has the same size and BN's statistics the same noise). ``batch_size`` None or
    ``>= n`` gives ``(None, True)`` for ever: the whole data set, every step (full batch)."""
    per_epoch = steps_per_epoch(n, batch_size)
    if per_epoch == 1 and (batch_size is None or batch_size >= n):
        while True:
            yield None, True
    while True:
        perm = torch.randperm(n, generator=generator)
        for k in range(per_epoch):
            yield perm[k * batch_size:(k + 1) * batch_size], k == per_epoch - 1


def train_steps(model: nn.Module, opt: torch.optim.Optimizer, x: Tensor, y: Tensor, steps: int,
                batch_size: int | None = None, loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
                seed: int = 0, before_step: Callable[[Tensor], None] | None = None) -> Iterator[Step]:
    """Take ``steps`` optimizer steps on ``(x, y)`` in train mode and yield after each.

    Batches come from :func:`batch_indices` with a generator seeded by ``seed``. A non-finite
    batch loss is yielded without a step, and the loop ends there (a diverged run).
    ``before_step(loss)``, if given, runs after the backward pass and before every step."""
    g = torch.Generator().manual_seed(seed)
    batches = batch_indices(len(x), batch_size, g)
    model.train()
    for k in range(1, steps + 1):
        idx, epoch_end = next(batches)
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        opt.zero_grad()
        loss = loss_fn(model(xb), yb)
        loss.backward()
        value = float(loss.detach())
        if before_step is not None:
            before_step(loss.detach())
        if not torch.isfinite(loss):
            yield Step(k, value, epoch_end)
            return
        opt.step()
        yield Step(k, value, epoch_end)
