"""The check's driver: each stage in a process of its own, within its share of ``--budget``, recorded
whatever it does (``ok``, ``failed`` with the tail of its error, ``timeout``, ``skipped``), the JSON
rewritten after every stage, then a Markdown summary."""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

STAGES = ("env", "tests", "compile", "kernels", "engine", "nvjpeg", "cifar")
# Each stage's share of the budget, in seconds per 480 (the default budget): cifar takes what is left.
SHARES = {"env": 15, "tests": 45, "compile": 45, "kernels": 90, "engine": 110, "nvjpeg": 25}
def grace(box: float) -> float:
    """Seconds a stage may overrun its box (to write its result) before it is killed."""
    return min(15.0, max(2.0, 0.1 * box))


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m psi.check", description=__doc__)
    ap.add_argument("--device", default="cuda", help="cuda (one GPU) or cpu (with --tiny: the self-test)")
    ap.add_argument("--budget", type=float, default=480.0, help="seconds for the whole check (default 480)")
    ap.add_argument("--out", default="check.json", help="the JSON file (a .md summary is written beside it)")
    ap.add_argument("--tiny", action="store_true", help="toy sizes: every stage in seconds (the CPU self-test)")
    ap.add_argument("--data-dir", default=None, help="folder with cifar10-jpeg.tar.gz or CIFAR-10 (default "
                    "$PSI_DATA, else ./data, else the folder scripts/gpu-prepare.sh fills)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES), help="a subset, in this order")
    return ap


def data_dir(given: str | None) -> str | None:
    """The folder the cifar stage reads: the option, ``$PSI_DATA``, ``./data`` with the archive in it, or
    ``gpu-check/data`` (what scripts/gpu-prepare.sh fills in the checkout)."""
    if given:
        return given
    if os.environ.get("PSI_DATA"):
        return os.environ["PSI_DATA"]
    root = Path(__file__).resolve().parents[2]
    for d in (Path("data"), root / "data", root / "gpu-check" / "data"):
        if (d / "cifar10-jpeg.tar.gz").is_file() or (d / "cifar-10-batches-py").is_dir():
            return str(d)
    return None


def run_stage(name: str, args: argparse.Namespace, seconds: float) -> dict[str, Any]:
    """Run one stage in a child process (``python -m psi.check.stages``) within ``seconds``; its result
    is what the child wrote to its result file (partial results too, where it was cut off)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", "psi.check.stages", name, "--device", args.device, "--seconds", f"{seconds:.0f}",
               "--result", str(result), "--work", tmp]
        cmd += ["--tiny"] if args.tiny else []
        cmd += ["--data-dir", args.data_dir] if args.data_dir else []
        t = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + grace(seconds))
            status = "ok" if p.returncode == 0 else "failed"
            err = "" if p.returncode == 0 else (p.stderr or p.stdout)[-3000:]
        except subprocess.TimeoutExpired as e:
            tail = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr or ""
            status, err = "timeout", f"killed after {seconds + grace(seconds):.0f} s; stderr tail: {tail[-1500:]}"
        out: dict[str, Any] = {"status": status, "seconds": round(time.perf_counter() - t, 1), "box_seconds": seconds}
        if result.is_file():
            data = json.loads(result.read_text())
            if data.pop("stage_skipped", None):
                out["status"] = "skipped"
            out["result"] = data
        if err:
            out["error"] = err
        return out


def summary_md(report: dict[str, Any]) -> str:
    """A short Markdown page of the report: each stage's status and its headline figures."""
    env = report["stages"].get("env", {}).get("result", {})
    lines = [f"# psi.check: {env.get('device_name', report['device'])}", "",
             f"torch {env.get('torch', '?')}, CUDA {env.get('cuda', '-')}, budget {report['budget_s']:.0f} s, "
             f"took {report['seconds']:.0f} s{' (tiny)' if report['tiny'] else ''}", "",
             "| stage | status | seconds | headline |", "|---|---|---|---|"]
    for name, st in report["stages"].items():
        head = st.get("result", {}).get("headline", "") or st.get("error", "").strip().splitlines()[-1:] or [""]
        head = head if isinstance(head, str) else head[0]
        lines.append(f"| {name} | {st['status']} | {st['seconds']} | {head.replace('|', '/')[:200]} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.budget <= 0:
        raise SystemExit(f"psi.check: --budget must be positive seconds, got {args.budget}")
    args.data_dir = args.data_dir if args.tiny else data_dir(args.data_dir)  # tiny: real data only if given
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"device": args.device, "tiny": args.tiny, "budget_s": args.budget,
                              "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "host": platform.node(),
                              "data_dir": args.data_dir, "stages": {}, "seconds": 0.0}
    scale = args.budget / 480.0
    for name in args.stages:
        left = args.budget - (time.perf_counter() - start)
        if left < 3:
            report["stages"][name] = {"status": "skipped", "seconds": 0.0, "error": "no time left in --budget"}
            continue
        later = sum(SHARES.get(n, 0) * scale for n in args.stages[args.stages.index(name) + 1:])
        # --tiny is the self-test: every stage may take what is left (a loaded machine must not fail it)
        box = left if args.tiny else max(3.0, left - later) if name == "cifar" else min(left, SHARES[name] * scale)
        print(f"psi.check: {name} (at most {box:.0f} s)", flush=True)
        report["stages"][name] = st = run_stage(name, args, box)
        report["seconds"] = round(time.perf_counter() - start, 1)
        print(f"psi.check: {name} {st['status']} in {st['seconds']} s", flush=True)
        out.write_text(json.dumps(report, indent=1, default=str))
    report["seconds"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(report, indent=1, default=str))
    out.with_suffix(".md").write_text(summary_md(report))
    print(summary_md(report))
    return 0 if all(s["status"] in ("ok", "skipped") for s in report["stages"].values()) else 1
