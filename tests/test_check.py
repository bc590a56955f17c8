"""``python -m psi.check`` (issue 19): the prepared GPU check runs on the CPU at toy sizes, so that it cannot
rot between the sessions that have a GPU; a failing or overrunning stage is recorded and the next one runs."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from psi.check.cli import STAGES

ROOT = Path(__file__).resolve().parents[1]


def _check(tmp_path, *args, timeout=300):
    out = tmp_path / "check.json"
    p = subprocess.run([sys.executable, "-m", "psi.check", "--out", str(out), *args], cwd=ROOT, capture_output=True,
                       text=True, timeout=timeout)
    return p, json.loads(out.read_text())


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return _check(tmp_path_factory.mktemp("check"), "--device", "cpu", "--tiny")  # synthetic data: no --data-dir


def test_the_tiny_check_runs_every_stage_on_the_cpu(tiny):
    p, report = tiny
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    assert list(report["stages"]) == list(STAGES)
    status = {k: v["status"] for k, v in report["stages"].items()}
    assert status == {**dict.fromkeys(STAGES, "ok"), "nvjpeg": "skipped"}, report
    assert report["seconds"] < report["budget_s"]


def test_its_figures_are_the_ones_the_tests_hold(tiny):
    st = {k: v.get("result", {}) for k, v in tiny[1]["stages"].items()}
    assert st["env"]["torch"] and st["env"]["decoder_auto"] == "pil"
    assert st["tests"]["skipped"] >= 5 and st["tests"]["failed"] == 0  # the cuda-marked tests, skipped here
    assert all(r["breaks"] == 0 and r["graphs"] == 1 for r in st["compile"]["explain"])
    assert {r["channels_last"] for r in st["compile"]["explain"]} == {False, True}
    assert all(v["frames"] == 1 for v in st["compile"]["recompiles"].values())
    steps = st["kernels"]["steps"]
    assert steps["psi-sgd"]["aten_ops"] <= 20 and steps["psi-sgdm"]["aten_ops"] <= 24 and steps["sgd"]["host_syncs"] == 0
    ratios = st["engine"]["seconds_per_epoch"]["smallcnn"]
    assert ratios["psi-sgdm / sgd, eager"] > 0
    study = st["cifar"]
    assert study["first_run"]["epochs"] == 1 and study["paired"]["n"] == 2
    assert set(study["per_seed_acc"]) == {"sgd", "psi-sgdm"}


def test_the_markdown_summary_names_every_stage(tmp_path_factory, tiny):
    # the summary is written beside the JSON: find it through the fixture's folder
    folders = [d for d in Path(tmp_path_factory.getbasetemp()).glob("check*") if (d / "check.md").is_file()]
    text = (folders[0] / "check.md").read_text()
    assert all(f"| {name} |" in text for name in STAGES)


def test_a_failing_stage_is_recorded_and_the_next_runs(tmp_path):
    """--device cuda without a GPU: every stage fails with the reason, each one is tried, the exit code says so."""
    p, report = _check(tmp_path, "--device", "cuda", "--stages", "env", "kernels", timeout=120)
    assert p.returncode == 1
    for name in ("env", "kernels"):
        st = report["stages"][name]
        assert st["status"] == "failed" and "sees no CUDA device" in st["error"], st


def test_a_stage_past_its_box_is_killed_and_recorded(tmp_path):
    """A box of 3 s (32 s of budget: compile's share; --tiny would give a stage all that is left) kills the
    stage after its grace, and says so."""
    p, report = _check(tmp_path, "--device", "cpu", "--budget", "32", "--stages", "compile", timeout=120)
    st = report["stages"]["compile"]
    assert st["status"] == "timeout" and st["box_seconds"] == 3.0 and st["seconds"] < 10, st
    assert p.returncode == 1


def test_gpu_prepare_refuses_a_damaged_archive(tmp_path):
    (tmp_path / "cifar10-jpeg.tar.gz").write_bytes(b"not the archive")
    p = subprocess.run(["bash", str(ROOT / "scripts" / "gpu-prepare.sh"), str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "damaged copy" in p.stderr
