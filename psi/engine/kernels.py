"""What decides a CPU run's bits, and the pin that makes them the same on any x86-64 machine (issue 16).

torch picks its CPU kernels by the instruction set the CPU has: ATen's vectorized kernels
(``ATEN_CPU_CAPABILITY``: default, avx2, avx512) and oneDNN's convolutions (``ONEDNN_MAX_CPU_ISA``)
take AVX-512 where it exists, and sum in another order than under AVX2: the same command gives
other numbers on an AVX-512 machine than on an AVX2 one (SGD, seed 0 of the quick profile: 23.07
against 23.59). Pinned to AVX2 (:data:`PIN`), an AMD EPYC with AVX-512 (Zen 4) gives the AVX2 EPYC's
numbers to the last digit (23.59, measured with the layered code of issue 17); an Intel Xeon with
AVX-512 does not (22.99 pinned, 23.43 not): the pin removes the instruction set as a cause, not every
cause (MKL dispatches by vendor on its own, oneDNN's blocking follows the caches), and
tests/test_kernels.py checks the bits per CPU model (tests/data/pinned_run.json).
Besides the instruction set, the thread count (how reductions are split) and torch's version decide
the bits; :func:`record` writes them all down, and every run keeps it in its ``config.json``
and ``summary.json``.

Both variables are read once, when torch first dispatches a kernel: they must be in the
environment before the process trains (``run_all.sh`` exports them; ``python -m psi.grid`` and
``python -m psi.study.design`` start themselves again with them set, :func:`reexec`).
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from typing import Any

__all__ = ["PIN", "PINNED_PROFILES", "CPU_ISAS", "pin", "env_for", "reexec", "record", "label", "describe",
           "UNRECORDED"]

# The AVX2 kernels: what the machine that made reference/quick had at best (a 2-core AMD EPYC).
PIN = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# the profiles whose results are compared to the bit with a committed reference (tests, reference/quick)
PINNED_PROFILES = ("smoke", "quick")
# --cpu-isa: avx2 (the pin, default for the pinned profiles) or native (the CPU's best: faster, other bits)
CPU_ISAS = ("avx2", "native")
UNRECORDED = "unrecorded"  # the kernels label of a run made before runs recorded them


def _x86_64(machine: str | None = None) -> bool:
    return (machine or platform.machine()).lower() in ("x86_64", "amd64")


def pin(machine: str | None = None) -> dict[str, str]:
    """The environment that pins the AVX2 kernels: :data:`PIN` on x86-64, nothing elsewhere (an ARM
    CPU has neither variable's values; its kernels are its own)."""
    return dict(PIN) if _x86_64(machine) else {}


def env_for(profile: str | None, cpu_isa: str = "avx2", base: Mapping[str, str] | None = None,
            machine: str | None = None) -> dict[str, str]:
    """``base`` (default: this process's environment) as a process of ``profile`` should train under:
    pinned (:func:`pin`) for the profiles of :data:`PINNED_PROFILES` with ``cpu_isa="avx2"``, without
    either variable with ``cpu_isa="native"`` (the lift: the CPU's best kernels), as it is for the
    other profiles (GPU profiles: what the user set)."""
    if cpu_isa not in CPU_ISAS:
        raise ValueError(f"cpu_isa {cpu_isa!r}: valid: {', '.join(CPU_ISAS)}")
    env = dict(os.environ if base is None else base)
    if cpu_isa == "native":
        for k in PIN:
            env.pop(k, None)
    elif profile in PINNED_PROFILES:
        env.update(pin(machine))
    return env


def reexec(env: Mapping[str, str], module: str, argv: list[str]) -> None:
    """Start ``python -m module argv`` again in this process (``os.execve``) under ``env`` when this
    process's environment differs from it in a pinned variable; return when it does not. The
    variables are read when torch first dispatches a kernel, so setting them in a running process
    after ``import torch`` is not reliable: a new process is. The re-started one finds them set."""
    if all(os.environ.get(k) == env.get(k) for k in PIN):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], dict(env))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def record() -> dict[str, Any]:
    """What decides this process's CPU bits: the kernels ATen dispatches to (``cpu_capability``, as
    torch reports it: DEFAULT, AVX2, AVX512, ...), the two variables as set (None: the CPU's best),
    torch's intra-op threads, the CPU model, the machine and torch's version."""
    import torch

    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "ATEN_CPU_CAPABILITY": os.environ.get("ATEN_CPU_CAPABILITY"),
            "ONEDNN_MAX_CPU_ISA": os.environ.get("ONEDNN_MAX_CPU_ISA"),
            "threads": torch.get_num_threads(), "cpu_model": _cpu_model(), "machine": platform.machine(),
            "torch": torch.__version__}


def label(rec: Mapping[str, Any] | None) -> str:
    """A record as a short string, ``ATen capability/oneDNN ISA/threads`` and torch's version:
    ``AVX2/AVX2/1t torch 2.13.0+cpu`` (``native``: oneDNN's ISA not capped); two runs whose labels
    differ may differ in the last bits for that reason alone. :data:`UNRECORDED` for none."""
    if not rec:
        return UNRECORDED
    return (f"{rec.get('cpu_capability')}/{rec.get('ONEDNN_MAX_CPU_ISA') or 'native'}/{rec.get('threads')}t "
            f"torch {rec.get('torch')}")


def describe(profile: str | None = None) -> str:
    """This process's kernels in words (:func:`label`); for a pinned profile that is not running under
    the pin (a notebook opened in Jupyter, ``--cpu-isa native``), what that means and how to pin it."""
    line = "CPU kernels: " + label(record())
    if profile in PINNED_PROFILES and any(os.environ.get(k) != v for k, v in pin().items()):
        line += (f"; not the {profile} profile's AVX2 pin, so its results may differ in the last bits from the "
                 f"same runs on other machines (reference/quick; pinned: ./run_all.sh, or Jupyter started with "
                 f"ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2)")
    return line
