"""How a run stops without losing anything: a NaN loss (:class:`TrainingDiverged`, naming epoch and step),
SIGTERM (:class:`Preempted`, exit :data:`PREEMPTED_EXIT`) at a step every process agrees on, and the
partial epoch (:class:`Partial`) a checkpoint keeps so that the same command resumes there."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the metrics of the epochs before are kept."""


class Preempted(Exception):
    """SIGTERM arrived (what SLURM sends before it preempts or times out a job): the step under way
    finished, a checkpoint of it was written, and the same command resumes from there."""


PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143: the status of a process ended by SIGTERM, as schedulers expect


@dataclass
class Partial:
    """An epoch under way: its first ``step`` steps done, their summed loss, correct count and images,
    each step's loss (the first non-finite one is named), and the seconds spent. A checkpoint written
    on SIGTERM holds one, so the resumed epoch goes on from the next step with the same numbers."""

    epoch: int
    steps: int
    device: torch.device
    step: int = 0
    loss_sum: Tensor = None  # type: ignore[assignment]
    correct: Tensor = None  # type: ignore[assignment]
    losses: Tensor = None  # type: ignore[assignment]
    seen: int = 0
    seconds: float = 0.0
    # (step, per-layer statistics on the device, None without such layers) every few steps
    # (psi.engine.epoch.trace_every), read with the epoch's totals
    trace: list[tuple[int, Tensor]] = field(default_factory=list)

    def __post_init__(self) -> None:
        def on_device(t: Tensor | None, dtype: torch.dtype, shape: tuple[int, ...]) -> Tensor:
            return torch.zeros(shape, dtype=dtype, device=self.device) if t is None else t.to(self.device)

        self.loss_sum = on_device(self.loss_sum, torch.float64, ())
        self.correct = on_device(self.correct, torch.long, ())
        self.losses = on_device(self.losses, torch.float32, (self.steps,))
        self.trace = [(int(s), None if t is None else t.to(self.device)) for s, t in self.trace]

    def state(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "step": self.step, "loss_sum": self.loss_sum, "correct": self.correct,
                "losses": self.losses, "seen": self.seen, "seconds": self.seconds,
                "trace": self.trace}


# Under torchrun every process must stop at the same step: they agree every STOP_POLL steps (one host
# read each time, in data-parallel runs only; a single process reads its own flag, no device at all).
STOP_POLL = 16


class Stop:
    """SIGTERM during a run: note it, let the step under way finish, then stop at a step boundary
    (:func:`train_epoch` asks :meth:`asked`), checkpoint and raise :class:`Preempted`. Installed only
    in the main thread (signals reach no other); the previous handler comes back afterwards."""

    def __init__(self, world: int, device: torch.device) -> None:
        self.world, self.device, self.received = world, device, False
        self._previous: Any = None

    def __enter__(self) -> Stop:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._note)
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _note(self, signum: int, frame: Any) -> None:
        self.received = True

    def asked(self, step: int) -> bool:
        """Whether to stop before ``step`` (the same answer on every process of the run)."""
        if self.world == 1:
            return self.received
        if step % STOP_POLL:
            return False
        flag = torch.tensor([float(self.received)], device=self.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
