"""One epoch of a run: its training steps under the schedule, with the NaN check and the stop signal
(:func:`train_epoch`), the evaluation (:func:`evaluate`), and the metrics row written after it (:func:`epoch_row`)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from psi.engine.cifar import BatchLoader
from psi.engine.config import Config, lr_factor, set_lr
from psi.engine.files import write_json
from psi.engine.imageloader import ImageLoader
from psi.engine.optimizers import effective_lr
from psi.engine.stop import Partial, Stop, TrainingDiverged

TRACE_POINTS = 8  # points per epoch of the in-epoch trace (the loss, norms and rate every few steps)


def trace_every(steps: int) -> int:
    """The steps between two points of an epoch's trace: about :data:`TRACE_POINTS` points per epoch, a
    point every step in an epoch of fewer steps. A constant count, so the one read per epoch stays one."""
    return max(1, steps // TRACE_POINTS)


def _psi_layers(opt: torch.optim.Optimizer) -> dict[str, list[torch.Tensor]]:
    layers = getattr(opt, "psi_layers", None)
    if layers is None:  # an optimizer built without the side table: per-layer groups carry the name
        layers = {g["name"]: g["params"] for g in opt.param_groups if g.get("psi")}
    return layers


def _psi_layer_tensor(opt: torch.optim.Optimizer, optimizer: str) -> torch.Tensor | None:
    """Per scale-invariant layer, on the device: neuron norm mean/min/max and the effective learning rate
    (:func:`psi.engine.optimizers.effective_lr`, which says why each method gets its rule); ``None``
    without such layers. Nothing read back to the host."""
    layers = _psi_layers(opt)
    if not layers:
        return None
    lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    rows = []
    for tensors in layers.values():
        w = tensors[0].detach()
        sq = w.reshape(w.shape[0], -1).square().sum(1).double()
        norms = sq.sqrt()
        lr = float(lr_of[id(tensors[0])])  # a float, or a CPU tensor (compiled steps): no device read
        rows.append(torch.stack([norms.mean(), norms.min(), norms.max(), effective_lr(optimizer, lr, sq)]))
    return torch.stack(rows)


def _layer_dict(names: list[str], values: list[list[float]]) -> dict[str, dict[str, float]]:
    return {name: {"norm_mean": mean, "norm_min": lo, "norm_max": hi, "eff_lr": eff}
            for name, (mean, lo, hi, eff) in zip(names, values, strict=True)}


def _psi_layer_stats(opt: torch.optim.Optimizer, optimizer: str) -> dict[str, dict[str, float]]:
    """:func:`_psi_layer_tensor` read back, by layer name: one host read for all layers (once per epoch)."""
    t = _psi_layer_tensor(opt, optimizer)
    return {} if t is None else _layer_dict(list(_psi_layers(opt)), t.tolist())


def _trace(part: Partial, losses: list[float], layers: list[list[list[float]]],
           images_per_step: int, epoch: int) -> list[dict[str, Any]]:
    """The epoch's trace rows: at each traced step, the images seen since the run began, the mean training
    loss of the steps since the point before, and the layers' mean neuron norm and effective rate."""
    rows = []
    for (s, _), loss, stats in zip(part.trace, losses, layers or [[]] * len(losses), strict=True):
        row = {"step": s, "images": (epoch * part.steps + s) * images_per_step, "train_loss": loss}
        if stats:
            eff = [r[3] for r in stats if math.isfinite(r[3])]
            row.update(psi_norm_mean=sum(r[0] for r in stats) / len(stats),
                       psi_eff_lr=sum(eff) / len(eff) if eff else float("nan"))
        rows.append(row)
    return rows


@torch.inference_mode()
def evaluate(model: nn.Module, loader: BatchLoader | ImageLoader, autocast: Callable[[], Any]) -> tuple[float, float]:
    """(mean loss, accuracy) over the loader, accumulated on the device and read once. A loader that
    gives each process a slice (``world > 1``: image folders) is summed over the processes, every one
    evaluating rank 0's model: without SyncBatchNorm (the CPU) each process's BN statistics took their
    last update from its own slice, so rank 0's are sent to all first."""
    sharded = getattr(loader, "world", 1) > 1
    if sharded:
        for b in model.buffers():
            torch.distributed.broadcast(b, src=0)
    model.eval()
    loss = torch.zeros((), device=loader.device, dtype=torch.float64)
    correct = torch.zeros((), device=loader.device, dtype=torch.long)
    n = 0
    for x, y in loader.epoch(0):
        with autocast():
            out = model(x)
        loss += F.cross_entropy(out.float(), y, reduction="sum").double()
        correct += (out.argmax(1) == y).sum()
        n += len(y)
    totals = torch.stack([loss, correct.double(), torch.tensor(float(n), device=loader.device, dtype=torch.float64)])
    if sharded:
        torch.distributed.all_reduce(totals)
    loss_value, correct_value, n_value = totals.tolist()
    return loss_value / n_value, correct_value / n_value


def epoch_row(cfg: Config, epoch: int, start: int, part: Partial, rank: int, world: int, model: nn.Module,
               opt: torch.optim.Optimizer, evaluation: BatchLoader | ImageLoader, eval_name: str,
               autocast: Callable[[], Any], out: Path) -> dict[str, Any]:
    """The metrics row of a finished epoch (its evaluation included); :class:`TrainingDiverged` if its
    loss is not finite, naming the first step whose loss was not (one host read per epoch either way)."""
    loss_sum, correct, seen = part.loss_sum, part.correct, part.seen
    if world > 1:  # each step's loss too: the trace's is the processes' mean, resumed or not
        torch.distributed.all_reduce(loss_sum)
        torch.distributed.all_reduce(correct)
        torch.distributed.all_reduce(part.losses)
        seen *= world
    # the trace's mean losses between its points, read with the totals: still one read per epoch
    cum = torch.cat([part.losses.new_zeros(1), part.losses.double().cumsum(0) / world])
    ends = [s for s, _ in part.trace]
    starts = [0, *ends[:-1]]
    chunks = [(cum[e] - cum[b]) / (e - b) for b, e in zip(starts, ends, strict=True)]
    layers = [t for _, t in part.trace if t is not None]
    values = torch.cat([torch.stack([loss_sum, correct.double(), *chunks])]
                       + [t.double().flatten() for t in layers]).tolist()
    train_loss, train_correct = values[0] / seen, values[1]
    n_layers = len(layers[0]) if layers else 0
    flat = values[2 + len(chunks):]
    stats = [[flat[(j * n_layers + k) * 4:(j * n_layers + k + 1) * 4] for k in range(n_layers)]
             for j in range(len(layers))]
    trace = _trace(part, values[2:2 + len(chunks)], stats, seen // max(part.step, 1), epoch)
    if not math.isfinite(train_loss):
        bad = (~torch.isfinite(part.losses)).nonzero()
        at = f" at step {int(bad[0]) + 1} of {part.steps}" if len(bad) else ""
        msg = (f"{out.name}: the training loss became {train_loss}{at} in epoch {epoch + 1}; the checkpoint after "
               f"epoch {epoch} and the metrics of the {epoch} epochs before are kept in {out}. Lower the learning "
               f"rate (now {float(opt.param_groups[0]['initial_lr'])}) or check the data; delete {out} to run it "
               f"again.")
        if rank == 0:
            write_json(out / "failed.json", {"error": msg, "epoch": epoch, "step": int(bad[0]) if len(bad) else None})
        raise TrainingDiverged(msg)
    last = epoch == cfg.epochs - 1
    # a full test pass costs about a third of a training pass per image: on a CPU with a small
    # training subset it can cost more than the epoch, so eval_every may skip it (rows say null)
    eval_loss = eval_acc = None
    t1 = time.perf_counter()
    if last or (cfg.eval_every and (epoch + 1) % cfg.eval_every == 0):
        eval_loss, eval_acc = evaluate(model, evaluation, autocast)
    eval_seconds = time.perf_counter() - t1
    return {"epoch": epoch, "lr": lr_factor(cfg, epoch) * float(opt.param_groups[0]["initial_lr"]),
            "train_loss": train_loss, "train_acc": train_correct / seen,
            f"{eval_name}_loss": eval_loss, f"{eval_name}_acc": eval_acc,
            "epoch_seconds": part.seconds, "images_per_second": seen / part.seconds, "eval_seconds": eval_seconds,
            "warmup": epoch == start,  # this process's first epoch: compilation, cuDNN benchmarking
            "psi_layers": _psi_layer_stats(opt, cfg.optimizer), "trace": trace}


def train_epoch(cfg: Config, net: nn.Module, opt: torch.optim.Optimizer, step: Callable[[], Any],
                 scaler: torch.amp.GradScaler, train: BatchLoader, epoch: int, autocast: Callable[[], Any],
                 show: bool, name: str, part: Partial, stop: Stop) -> None:
    """The steps of one epoch from ``part.step`` on, added up in ``part`` on the device; stops early
    when ``stop`` says so (SIGTERM). Nothing in it reads a value back to the host (tests/test_gpu_path.py
    counts) in one process; a data-parallel run reads one flag every :data:`STOP_POLL` steps."""
    net.train()
    steps = len(train)
    batches = train.epoch(epoch, start=part.step)
    if show:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=steps, initial=part.step, desc=f"{name} epoch {epoch + 1}/{cfg.epochs}",
                       leave=False)
    for i, (x, y) in enumerate(batches, part.step):
        if stop.asked(i):
            break
        set_lr(opt, lr_factor(cfg, epoch + i / steps))
        with autocast():
            # bn_split > 1: BN statistics per slice, as that many processes without SyncBatchNorm
            logits = net(x) if cfg.bn_split == 1 else torch.cat([net(c) for c in x.chunk(cfg.bn_split)])
            loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        if scaler.is_enabled():  # fp16: GradScaler reads found_inf on the host once per step (torch's design)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            step()
        part.losses[i] = loss.detach()
        part.loss_sum += loss.detach().double() * len(y)
        part.correct += (logits.detach().argmax(1) == y).sum()
        part.seen += len(y)
        part.step = i + 1
        if part.step % trace_every(steps) == 0:  # device tensors only: read with the epoch's totals
            part.trace.append((part.step, _psi_layer_tensor(opt, cfg.optimizer)))
