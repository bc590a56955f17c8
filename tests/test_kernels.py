"""psi.engine.kernels (issue 16): what decides a CPU run's bits is recorded by every run; the smoke and quick
profiles train under the AVX2 pin in every process (run_all.sh, psi.grid's workers, psi.grid itself);
a short pinned run gives the committed bits, and a run under other kernels does not."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from psi.engine import kernels, trainer
from psi.engine.config import Config
from psi.grid import cli
from psi.grid.cli import main
from tests import pinned_run
from tests.procs import env

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
AVX2 = X86 and " avx2" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else X86
needs_avx2 = pytest.mark.skipif(not AVX2, reason="the pin is AVX2's: this CPU is not x86-64 with AVX2")
RECORD = ("cpu_capability", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "threads", "cpu_model", "machine", "torch")
CHILD = "import json; from psi.engine import kernels; print(json.dumps(kernels.record()))"


def _unpinned(**extra: str) -> dict[str, str]:
    e = env(**extra)
    for k in kernels.PIN:
        if k not in extra:
            e.pop(k, None)
    return e


def test_the_pin_is_for_the_compared_profiles_on_x86_64_and_native_lifts_it():
    assert kernels.PIN == {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert kernels.pin("x86_64") == kernels.PIN and kernels.pin("aarch64") == {}
    base = {"PATH": "/bin"}
    for profile in ("smoke", "quick"):
        assert kernels.env_for(profile, base=base, machine="x86_64") == {**base, **kernels.PIN}
        assert kernels.env_for(profile, base=base, machine="aarch64") == base
    assert kernels.env_for("paper", base=base, machine="x86_64") == base  # GPU profiles: as the user set it
    assert kernels.env_for("quick", "native", base={**base, **kernels.PIN}, machine="x86_64") == base
    with pytest.raises(ValueError, match="avx2, native"):
        kernels.env_for("quick", "avx512")


@needs_avx2
def test_a_child_started_under_the_pin_runs_avx2_and_records_it():
    pinned = json.loads(subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True,
                                       env=kernels.env_for("quick", base=_unpinned()), check=True).stdout)
    assert set(pinned) == set(RECORD)
    assert (pinned["cpu_capability"], pinned["ATEN_CPU_CAPABILITY"], pinned["ONEDNN_MAX_CPU_ISA"]) == (
        "AVX2", "avx2", "AVX2")
    lifted = json.loads(subprocess.run([sys.executable, "-c", CHILD], cwd=ROOT, capture_output=True, text=True,
                                       env=kernels.env_for("quick", "native", base=env(**kernels.PIN)),
                                       check=True).stdout)
    assert lifted["ATEN_CPU_CAPABILITY"] is None and lifted["ONEDNN_MAX_CPU_ISA"] is None
    assert kernels.label(pinned).startswith("AVX2/AVX2/") and "/native/" in kernels.label(lifted)
    assert kernels.label(None) == kernels.UNRECORDED


def test_every_run_records_its_kernels_and_keeps_its_folder_name(tmp_path):
    cfg = Config(dataset="synthetic", model="smallcnn", optimizer="psi-sgdm", epochs=1, batch_size=50,
                       subset=100, out=str(tmp_path), progress=False)
    assert cfg.key() == "5078d781"  # the key of before the record: old run folders keep their names
    s = trainer.run(cfg)
    config = json.loads((cfg.run_dir() / "config.json").read_text())
    for rec in (config["kernels"], s["kernels"]):
        assert set(rec) == set(RECORD) and rec == kernels.record()


def _run_all(tmp_path, *args, **extra):
    r = subprocess.run(["bash", "run_all.sh", "--profile", "smoke", "--dry-run", "--out", str(tmp_path), *args],
                       cwd=ROOT, capture_output=True, text=True, timeout=600,
                       env={**_unpinned(**extra), "PYTHON": sys.executable})
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


@needs_avx2
def test_run_all_exports_the_pin_for_smoke_and_lifts_it_with_cpu_isa_native(tmp_path):
    out = _run_all(tmp_path)
    assert "CPU: AVX2 kernels (oneDNN ISA AVX2)" in out  # a python it started: what the notebooks' kernels inherit
    assert "kernels: AVX2/AVX2/" in out and "pinned to AVX2" in out  # psi.grid, and what its workers get
    out = _run_all(tmp_path, "--cpu-isa", "native", **kernels.PIN)  # set by the user, lifted by the option
    assert "oneDNN ISA native" in out and "/native/" in out and "pinned to AVX2" not in out


@needs_avx2
def test_python_m_psi_grid_starts_itself_again_under_the_pin(tmp_path):
    r = subprocess.run([sys.executable, "-m", "psi.grid", "run", "--profile", "smoke", "--device", "cpu", "--out",
                        str(tmp_path), "--dry-run", "--measure-steps", "1"], cwd=ROOT, capture_output=True, text=True,
                       env=_unpinned(), timeout=600)
    assert r.returncode == 0, r.stderr
    assert "kernels: AVX2/AVX2/" in r.stdout  # this process's own kernels: what it trains (slurm's selection)


def test_psi_grid_gives_its_workers_the_pin(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr(cli, "launch_workers", lambda *a, **kw: seen.append(a[9] if len(a) > 9 else kw["base_env"]) or [])
    for k in kernels.PIN:
        monkeypatch.delenv(k, raising=False)
    args = ["run", "--profile", "smoke", "--device", "cpu", "--out", str(tmp_path)]
    main(args)  # the selection's workers (then it stops: nothing was trained)
    assert all(seen[0].get(k) == v for k, v in kernels.pin().items()) and seen[0]["PATH"] == os.environ["PATH"]
    monkeypatch.setenv("ATEN_CPU_CAPABILITY", "avx2")
    main([*args, "--cpu-isa", "native"])
    assert not set(kernels.PIN) & set(seen[1])


@pytest.fixture(scope="module")
def pinned(tmp_path_factory):
    if not AVX2:
        pytest.skip("the pin is AVX2's: this CPU is not x86-64 with AVX2")
    return pinned_run.run(tmp_path_factory.mktemp("pinned"), pinned_run.pinned_env())


def test_a_short_pinned_run_gives_the_committed_bits(pinned):
    """The CI bit check: under the pin, the bits committed for this CPU model. On a model with an entry
    this must hold (a change of code, torch or kernels that moves a bit fails it). A model without one
    is the open part of issue 16: the AVX2 pin gave one result on the AMD EPYCs (AVX2, and AVX-512 Zen 4:
    reference/quick's SGD seed 0 to the last digit, 23.59) but another on an Intel Xeon (AVX-512: 22.99),
    so there the values are reported as an expected failure (and a match to an entry as a pass), with the
    command that adds the entry, instead of turning every CI run on that machine red."""
    doc = pinned_run.read()
    assert pinned["kernels"]["cpu_capability"] == "AVX2" and pinned["kernels"]["threads"] == 1
    assert pinned["run"] == doc["run"]
    got = {k: pinned[k] for k in pinned_run.VALUES}
    here = pinned["kernels"]["cpu_model"]
    entries = doc["by_cpu_model"]
    if here not in entries:
        same = [m for m, e in entries.items() if {k: e[k] for k in pinned_run.VALUES} == got]
        if same:
            return  # an unrecorded model that gives a recorded model's bits: the pin held
        pytest.xfail(f"no committed bits for {here} (recorded: {', '.join(entries)}), and it matches none of them: "
                     f"{got}; add it with PYTHONPATH=. python -m tests.pinned_run --write")
    want = entries[here]
    assert pinned["kernels"]["torch"] == want["made_under"]["torch"], "another torch: other bits are expected"
    assert got == {k: want[k] for k in pinned_run.VALUES}, (
        f"the pinned run gave other bits than {pinned_run.FILE.name} holds for {here}; here: {pinned['kernels']}")


def test_the_same_run_under_other_kernels_gives_other_bits(pinned, tmp_path):
    """The comparison is sensitive: ATen's and oneDNN's baseline kernels give other last bits."""
    other = pinned_run.run(tmp_path, _unpinned(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41"))
    assert other["kernels"]["cpu_capability"] == "DEFAULT"
    assert other["model_sha256"] != pinned["model_sha256"]
    assert other["final_train_loss"] != pinned["final_train_loss"]
