"""The notebooks: committed clean, parameterized, and run end to end by run_all.sh (smoke profile)."""

import json
import re
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
    # One thread: the smoke networks are tiny, and on a shared 2-core machine a second thread per process
    # only contends (measured: notebook 04's smoke took 124 s with 2 threads, 45 s with 1, under load).
    r = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--out", str(out), "--threads", "1"], cwd=ROOT,
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


THEORY = {"01_symmetry": ["Theorem 1:", "Figure 1, reading D"], "02_geometry": ["Lemma 1 under SGD:"],
          "03_convergence": ["Control: GD on linear least squares", "Verdict on Figure 4:"]}


@pytest.mark.parametrize("stem", THEORY)
def test_theory_notebooks_print_their_findings_and_keep_experiments_in_psi(smoke, stem):
    out, _ = smoke
    nb = json.loads((out / "executed" / f"{stem}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    last = "".join("".join(o["text"]) for o in code[-1].get("outputs", []) if o.get("output_type") == "stream")
    assert all(k in last for k in THEORY[stem]), last  # the closing "what we saw" cell, computed from the runs
    source = "".join("".join(c["source"]) for c in code)
    assert ".backward()" not in source and ".step()" not in source  # training loops live in psi (psi.paper.loop)


def _closing(out: Path, stem: str) -> str:
    nb = json.loads((out / "executed" / f"{stem}.ipynb").read_text())
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    return "".join("".join(o["text"]) for o in code[-1].get("outputs", []) if o.get("output_type") == "stream")


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    assert m, f"{pattern!r} not in the notebook's closing cell:\n{text}"
    return float(m.group(1))


def test_the_key_numbers_the_theory_notebooks_print(smoke):
    """What each theory notebook claims, read from its executed copy: the numbers, not their presence."""
    out, _ = smoke
    n01, n02, n03 = (_closing(out, s) for s in THEORY)
    assert _number(r"moved the outputs by (\S+) with eps = 1e-30", n01) < 1e-9  # invariance (eps 1e-30)
    assert abs(_number(r"has slope (\S+) on log-log axes", n01) + 1) < 0.05  # eq. 5's 1/a law
    assert _number(r"PSI-SGD's at most (\S+) rad", n01) < 1e-9  # Theorem 1: PSI-SGD never leaves its class
    assert _number(r"SGD's two copies are (\S+) rad apart", n01) > 1e-3  # ... while SGD's copies drift
    assert _number(r"Eq\. \(7\): .*? differ by at most (\S+) \(relative\)", n02) < 1e-9
    assert _number(r"gap grows as t\^(\S+) ", n02) == pytest.approx(3, abs=0.2)  # retraction: second order
    assert _number(r"per-neuron increments of \|\|w\|\|\^2 was \S+, (\d+) were negative", n02) == 0  # Lemma 1
    slope, predicted = (_number(p, n03) for p in (r"Control: GD on linear least squares falls (\S+) decades",
                                                  r"predicts (\S+)\)"))
    assert slope == pytest.approx(predicted, rel=0.25)  # the rate measure finds a known geometric fall


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
    assert r.returncode == 2 and "smoke, quick, paper or imagenet" in r.stderr


def test_the_imagenet_profile_fills_table1s_imagenet_rows(tmp_path):
    """Notebook 04 under the imagenet profile (shrunk to one epoch of a generated ILSVRC-like folder), then
    notebook 05: its Table 1 holds the ImageNet ResNet-18 cells beside the paper's, and they leave "not run"."""
    from tests.test_images import make_tree

    tree, runs, figs = make_tree(tmp_path / "imagenet"), tmp_path / "runs", tmp_path / "figures"
    small = "{models: [resnet18], optimizers: [sgd, psi-sgdm], seeds: [0], epochs: 1, batch_size: 8, image_size: 32}"
    for nb, params in (("04_cifar", ["-p", "profile", "imagenet", "-p", "data_dir", str(tree), "-y", small,
                                     "-p", "threads", "1"]),
                       ("05_analysis", [])):
        r = subprocess.run([sys.executable, "-m", "papermill", f"notebooks/{nb}.ipynb", str(tmp_path / f"{nb}.ipynb"),
                            "--cwd", "notebooks", "-p", "runs_dir", str(runs), "-p", "figures_dir", str(figs / nb),
                            *params], cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
    config = json.loads(next(runs.glob("imagenet-resnet18-sgd-*/config.json")).read_text())
    assert (config["epochs"], config["milestones"], config["image_size"]) == (1, [0.3, 0.6, 0.9], 32)
    table = (figs / "05_analysis" / "table1.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| imagenet")]
    assert len(rows) == 1 and "paper 67.72" in rows[0] and "paper 69.42" in rows[0]  # SGD, PSI-SGDM: Table 1
    not_run = (figs / "05_analysis" / "not_run.csv").read_text()
    assert "imagenet,resnet18,sgd," not in not_run and "imagenet,resnet18,adam," in not_run


def _code_lines(path: Path) -> int:
    nb = json.loads(path.read_text())
    return sum(1 for c in nb["cells"] if c["cell_type"] == "code" for ln in "".join(c["source"]).splitlines()
               if ln.strip())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_keeps_its_logic_in_psi(path):
    assert _code_lines(path) <= 70  # psi.paper holds the rest (issue 17)


def test_smoke_trains_under_the_avx2_pin_and_the_analysis_shows_the_kernels(smoke):
    """run_all.sh exports the pin; psi.grid, papermill and notebook 04's kernel inherit it (issue 16)."""
    import platform

    out, stdout = smoke
    if platform.machine().lower() not in ("x86_64", "amd64") or " avx2" not in Path("/proc/cpuinfo").read_text():
        pytest.skip("the pin is AVX2's: this CPU is not x86-64 with AVX2")
    records = [json.loads(p.read_text())["kernels"] for p in (out / "runs").glob("*/config.json")]
    assert records and all((r["cpu_capability"], r["ATEN_CPU_CAPABILITY"], r["ONEDNN_MAX_CPU_ISA"], r["threads"])
                           == ("AVX2", "avx2", "AVX2", 1) for r in records)
    nb = json.loads((out / "executed" / "04_cifar.ipynb").read_text())
    text = "".join("".join(o.get("text", "")) for c in nb["cells"] if c["cell_type"] == "code" for o in c["outputs"])
    # the notebook's own process (its thread count is its own: the runs' records above say 1 thread)
    assert "CPU kernels: AVX2/AVX2/" in text and "not the smoke profile's AVX2 pin" not in text
    table = (out / "figures" / "05_analysis" / "table1.md").read_text()
    assert "| kernels " in table and "AVX2/AVX2/1t torch" in table
    assert "AVX2/AVX2/1t torch" in (out / "figures" / "05_analysis" / "paired.csv").read_text()
