"""Processes for the tests: a script under torchrun, a run killed with SIGKILL mid-way."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def torchrun_script(path: Path, script: str, port: int, nproc: int = 2, timeout: int = 300,
                    **env: str) -> subprocess.CompletedProcess:
    """Write ``script`` to ``path`` and run it in ``nproc`` processes under torchrun (gloo, one thread each)."""
    path.write_text(script)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                           "--master_port", str(port), str(path)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def kill_after_epochs(cmd: list[str], out: Path, epochs: int, cwd: Path, timeout: float = 300) -> None:
    """Start ``cmd`` (a psi.train run writing under ``out``) and SIGKILL it once its metrics.jsonl holds
    ``epochs`` lines (or after ``timeout`` seconds)."""
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + timeout
    while time.time() < deadline:
        files = list(out.glob("*/metrics.jsonl"))
        if files and len(files[0].read_text().splitlines()) >= epochs:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
