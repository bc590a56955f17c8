"""The CI bit check (issue 16): a short training run under the AVX2 pin, whose result is committed in
``tests/data/pinned_run.json`` per CPU model and compared to the bit by ``tests/test_kernels.py``.
The pin was meant to give one result on every x86-64 machine with AVX2; measured, it does between the
AMD EPYCs (the AVX2 one that made reference/quick and an AVX-512 Zen 4), not between an AMD EPYC and an
Intel Xeon (AVX-512): so the file holds one entry per CPU model the bits were measured on, and a model
without an entry is reported, not failed.

Add this machine's entry (``--write``: the others are kept), or regenerate every entry only when the
numbers are meant to change (a new torch, a change to the engine or the run's arguments), and say so
in the commit:

    PYTHONPATH=. python -m tests.pinned_run --write
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
FILE = ROOT / "tests" / "data" / "pinned_run.json"
# ResNet-20 (convolutions through oneDNN, BN and the optimizer through ATen's kernels), 18 steps, one thread
ARGS = ["--dataset", "synthetic", "--model", "resnet20", "--optimizer", "psi-sgdm", "--epochs", "3",
        "--batch-size", "50", "--subset", "300", "--threads", "1", "--quiet"]
VALUES = ("final_train_loss", "final_test_acc", "final_test_loss", "model_sha256")


def state_sha256(state: dict[str, Any]) -> str:
    """sha256 of a model's state: every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for k in sorted(state):
        t = state[k].detach().cpu().contiguous()
        h.update(f"{k} {t.dtype} {tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def run(out: Path, env: dict[str, str]) -> dict[str, Any]:
    """``python -m psi.train ARGS --out out`` under ``env``; its values and its kernels record."""
    import torch

    r = subprocess.run([sys.executable, "-m", "psi.train", *ARGS, "--out", str(out)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600)
    if r.returncode:
        raise RuntimeError(f"the pinned run failed ({r.returncode}):\n{r.stderr[-3000:]}")
    (d,) = [p for p in out.iterdir() if p.is_dir()]
    summary = json.loads((d / "summary.json").read_text())
    last = json.loads((d / "metrics.jsonl").read_text().splitlines()[-1])
    ck = torch.load(d / "checkpoint.pt", map_location="cpu", weights_only=False)
    return {"final_train_loss": summary["final_train_loss"], "final_test_acc": summary["final_test_acc"],
            "final_test_loss": last["test_loss"], "model_sha256": state_sha256(ck["model"]),
            "kernels": summary["kernels"], "run": d.name}


def read() -> dict[str, Any]:
    """The committed file (a file of the earlier layout, one result, becomes one entry of ``by_cpu_model``)."""
    doc = json.loads(FILE.read_text())
    if "by_cpu_model" not in doc:
        one = {k: doc.pop(k) for k in (*VALUES, "made_under")}
        doc["by_cpu_model"] = {one["made_under"]["cpu_model"]: one}
    return doc


def pinned_env() -> dict[str, str]:
    from psi.engine import kernels
    from tests.procs import env

    return env(**kernels.PIN)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m tests.pinned_run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--write", action="store_true", help=f"write {FILE.relative_to(ROOT)} (else print)")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        got = run(Path(tmp), pinned_env())
    doc = read() if FILE.is_file() else {}
    doc.update({"command": "ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 OMP_NUM_THREADS=1 python -m psi.train "
                           + " ".join(ARGS) + " --out DIR",
                "regenerate": "PYTHONPATH=. python -m tests.pinned_run --write", "run": got["run"]})
    by_cpu = doc.setdefault("by_cpu_model", {})
    by_cpu[got["kernels"]["cpu_model"]] = {**{k: got[k] for k in VALUES}, "made_under": got["kernels"]}
    text = json.dumps(doc, indent=1) + "\n"
    if a.write:
        FILE.write_text(text)
        print(f"written: {FILE}")
    else:
        print(text, end="")


if __name__ == "__main__":
    main()
