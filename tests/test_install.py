"""psi installs as a package (issue 17): a wheel built from the checkout, installed into a fresh venv with
its declared dependencies, imports every module and runs its commands, with the checkout off the path."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*cmd, cwd, timeout=900) -> str:
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout,
                       env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home())})
    assert r.returncode == 0, f"{' '.join(map(str, cmd))}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """Built from a copy of the tracked files (a build writes build/ and *.egg-info beside its source)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout
    for name in filter(None, files.decode().split("\0")):
        if (ROOT / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((ROOT / name).read_bytes())
    _run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", out, src, cwd=src)
    (whl,) = out.glob("psi-*.whl")
    return whl


def test_the_wheel_holds_every_module(wheel):
    inside = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    assert inside == {p.relative_to(ROOT).as_posix() for p in (ROOT / "psi").rglob("*.py")}


def test_installed_into_a_fresh_venv_it_imports_and_runs(wheel, tmp_path):
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", venv, cwd=tmp_path)
    py = venv / "bin" / "python"
    _run(py, "-m", "pip", "install", "-q", f"{wheel}[notebooks,grid,bench]", cwd=tmp_path)
    names = sorted(n[:-3].replace("/", ".").removesuffix(".__init__") for n in zipfile.ZipFile(wheel).namelist()
                   if n.endswith(".py") and not n.endswith("__main__.py"))
    where = _run(py, "-c", f"import importlib, psi; [importlib.import_module(m) for m in {names!r}]; print(psi.__file__)",
                 cwd=tmp_path)
    assert where.strip().startswith(str(venv)) and str(ROOT) not in where
    for program in ("psi.train", "psi.grid", "psi.bench"):
        assert "usage: python -m " + program in _run(py, "-m", program, "--help", cwd=tmp_path)
    # the method needs torch alone: with every other dependency made unimportable, psi and psi.core import
    blocked = "numpy pandas scipy PIL tqdm matplotlib seaborn sklearn submitit adamp geoopt".split()
    _run(py, "-c", f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); import psi, psi.core.psisgd, "
                   f"psi.core.discovery; print(psi.PSISGD)", cwd=tmp_path)
