"""The notebooks: committed clean, parameterized, and run end to end by run_all.sh (smoke profile)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def test_five_notebooks_in_reading_order():
    assert [p.stem for p in NOTEBOOKS] == ["01_symmetry", "02_geometry", "03_convergence", "04_cifar", "05_analysis"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs_and_with_one_parameters_cell(path):
    nb = json.loads(path.read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in code)
    assert sum("parameters" in c.get("metadata", {}).get("tags", []) for c in nb["cells"]) == 1
    assert "import psi" in "".join("".join(c["source"]) for c in code) or "from psi" in "".join(
        "".join(c["source"]) for c in code)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    r = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--out", str(out), "--threads", "2"], cwd=ROOT,
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    return out, r.stdout


def test_run_all_smoke_executes_every_notebook_without_errors(smoke):
    out, stdout = smoke
    for i, p in enumerate(NOTEBOOKS, 1):
        assert f"[{i}/5] {p.stem}" in stdout
        nb = json.loads((out / "executed" / p.name).read_text())
        outputs = [o for c in nb["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
        assert outputs and not [o for o in outputs if o.get("output_type") == "error"]
        figs = list((out / "figures" / p.stem).glob("*.png"))
        assert figs, f"{p.stem} saved no figure"
    assert (out / "figures" / "05_analysis" / "table1.md").read_text().count("|") > 10
    verdict = (out / "figures" / "05_analysis" / "verdict.md").read_text()
    assert verdict.startswith("- Scale of synthetic smallcnn") and "vs SGD" in verdict


def test_rerun_reuses_finished_runs(smoke):
    out, _ = smoke
    before = {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}
    r = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--out", str(out), "--only", "04"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert before and before == {p: p.stat().st_mtime_ns for p in (out / "runs").glob("*/summary.json")}


def test_a_failing_notebook_stops_the_run_and_names_the_cell(tmp_path):
    r = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--out", str(tmp_path), "--only", "05"], cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 1
    assert 'Exception encountered at "In [' in r.stderr and "no finished run" in r.stderr
    assert (tmp_path / "executed" / "05_analysis.ipynb").is_file()


def test_a_wrong_parameter_is_named(tmp_path):
    r = subprocess.run([sys.executable, "-m", "papermill", "notebooks/04_cifar.ipynb",
                        str(tmp_path / "x.ipynb"), "-p", "profile", "fast", "-p", "runs_dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "parameter profile='fast'" in r.stderr and "smoke, quick, paper" in r.stderr


def test_run_all_refuses_a_bad_profile():
    r = subprocess.run(["bash", "run_all.sh", "--profile", "fast"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "smoke, quick or paper" in r.stderr
