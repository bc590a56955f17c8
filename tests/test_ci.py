"""CI runs what the README says: its test command is the README's, character for character."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readmes_test_command():
    readme = re.findall(r"^(python -m pytest[^#\n]*?)\s*(?:#.*)?$", (ROOT / "README.md").read_text(), re.M)
    ci = [ln.strip() for ln in (ROOT / ".ci" / "run").read_text().splitlines() if "pytest" in ln and
          not ln.lstrip().startswith("#")]
    assert len(set(readme)) == 1 and ci == [readme[0]], (readme, ci)
