"""Processes for the tests: scripts and runs under torchrun, a run held at a point the test chooses.

Safe when two copies of the suite run at once on one machine (or under ``pytest -n``): no fixed port
(``torchrun --standalone`` binds port 0 itself and holds it; a rendezvous that needs an endpoint gets a
store the test process hosts on a port the OS hands out, see :func:`rendezvous_store`), and no
outcome decided by timing (:class:`Gated` holds a run until the test lets it go or kills it).
"""

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]

# What every inline torchrun script starts with: the group joined, and ended on every way out (gloo
# aborts the process at exit, "terminate called without an active exception", when a group is left
# alive; try/finally would miss an exception raised before it and sys.exit inside it does not).
PROLOGUE = f"""\
import atexit, sys
sys.path.insert(0, {str(ROOT)!r})
import torch.distributed as dist
dist.init_process_group("gloo")
atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())
"""


def env(**extra: str) -> dict[str, str]:
    """The environment of a child: one thread each (two cores shared by everything), no progress bars."""
    return {**os.environ, "OMP_NUM_THREADS": "1", "PSI_PROGRESS": "0", **extra}


def torchrun(nproc: int = 2) -> list[str]:
    """``torchrun --standalone``: one node, the rendezvous on a port its agent binds (port 0) and keeps."""
    return [*TORCHRUN, "--standalone", "--nproc-per-node", str(nproc)]


def torchrun_script(path: Path, script: str, nproc: int = 2, timeout: int = 300,
                    **extra: str) -> subprocess.CompletedProcess:
    """Write :data:`PROLOGUE` + ``script`` to ``path`` and run it in ``nproc`` processes under torchrun
    (gloo, one thread each); ``dist`` is torch.distributed, its group joined."""
    path.write_text(PROLOGUE + script)
    return subprocess.run([*torchrun(nproc), str(path)], capture_output=True, text=True, timeout=timeout,
                          env=env(**extra))


@contextlib.contextmanager
def rendezvous_store() -> Iterator[list[str]]:
    """A c10d rendezvous for torchrun agents started as separate "nodes" on this machine: this process
    hosts its TCP store on a port the OS picks (held until the block ends: no window in which another
    program could take it), each agent joins as a client (``is_host=false``), under a run id of its
    own (two suites never meet in one rendezvous). Yields the launcher's rendezvous options."""
    from torch.distributed import TCPStore

    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=300))
    try:
        yield ["--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}",
               "--rdzv-id", f"psi-test-{uuid.uuid4().hex}", "--rdzv-conf", "is_host=false"]
    finally:
        del store


# A psi.train process whose training stops at a point the test chooses: just before optimizer step
# ``steps + 1`` of epoch ``epoch`` (steps 0: before the epoch's first step, so the epochs before it are
# all on disk), it prints GATE_LINE and waits for a line on its stdin. The run folder's lock is held.
GATE_LINE = "psi-test: at the gate"
_GATE = """\
import inspect, sys
from psi.engine import trainer
from psi.train import main
epoch, steps, argv = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
real = trainer.train_epoch  # looked up there by the trainer
signature = inspect.signature(real)

def gated(*a, **kw):
    bound = signature.bind(*a, **kw)
    if bound.arguments["epoch"] == epoch:
        step, done = bound.arguments["step"], [0]
        def held():
            if done[0] == steps:
                print({line!r}, flush=True)
                sys.stdin.readline()
            done[0] += 1
            return step()
        bound.arguments["step"] = held
    return real(*bound.args, **bound.kwargs)

trainer.train_epoch = gated
main(argv)
"""


class Gated:
    """``python -m psi.train ARGS`` held at epoch ``epoch`` (after ``steps`` of its steps) until the test
    calls :meth:`release` (it then runs on) or :meth:`kill` (SIGKILL, as ``kill -9`` mid-epoch).
    stderr goes to ``log`` (a pipe could fill while the test waits on stdout)."""

    def __init__(self, args: list[str], epoch: int, log: Path, steps: int = 0, cwd: Path = ROOT):
        self.log = log
        self._err = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", _GATE.format(line=GATE_LINE), str(epoch), str(steps),
                                      *args], cwd=cwd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, text=True, env=env())
        self.pid = self.proc.pid

    def wait_for_gate(self) -> None:
        """Block until the run is at the gate (no polling, no clock: its stdout says so); raise if it
        ended before reaching it."""
        for line in self.proc.stdout:
            if line.strip() == GATE_LINE:
                return
        self.proc.wait()
        raise AssertionError(f"the run ended (exit {self.proc.returncode}) before its gate:\n"
                             f"{self.log.read_text()[-3000:]}")

    def release(self, timeout: float = 600) -> int:
        """Let the run go on; its exit status once it has finished."""
        self.proc.stdin.write("\n")
        self.proc.stdin.close()
        self.stdout = self.proc.stdout.read()
        return self._done(timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self._done(60)

    def _done(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self._err.close()
            self.proc.stdout.close()

    def __enter__(self) -> "Gated":
        return self

    def __exit__(self, *exc) -> None:
        if self.proc.poll() is None:
            self.kill()


def kill_at_epoch(args: list[str], epoch: int, log: Path, steps: int = 1) -> None:
    """Run ``python -m psi.train ARGS`` and SIGKILL it mid-way through epoch ``epoch`` (after ``steps`` of
    its steps): epochs 0..epoch-1 are on disk, exactly, and epoch ``epoch``'s first steps are lost."""
    with Gated(args, epoch, log, steps) as run:
        run.wait_for_gate()
        run.kill()


