"""Every command in the README and the docs/ pages runs as written (issue 17): cheaply checked.

Each ``python -m psi...`` command of a shell block is parsed by the very parser its program uses (its
``main`` is called with ``parse_args`` stopped right after a successful parse: nothing trains), so an
option that does not exist, a bad choice or a moved module fails here; every ``./run_all.sh`` option
must be one the script takes; every import line of a Python block must import.
"""

import argparse
import importlib
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "reference" / "README.md",
         ROOT / "data" / "README.md"]
# the programs the pages may run, and the function each runs
MAINS = {"psi.train": "psi.train:main", "psi.grid": "psi.grid.cli:main", "psi.bench": "psi.bench.cli:main",
         "psi.study.design": "psi.study.design:main",
         "psi.bench.discovery": "psi.bench.discovery:main", "psi.check": "psi.check.cli:main"}


def _blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", path.read_text(), re.M | re.S)


def _shell_commands(path: Path) -> list[str]:
    """The commands of a page's shell blocks: continuation lines joined, comments dropped, split at ``&&``/``;``/``|``."""
    out = []
    for block in _blocks(path, "(?:bash|sh|shell|console)"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #", 1)[0].strip()
            if line.startswith("#") or not line:
                continue
            out += [c.strip() for c in re.split(r"&&|;|\|", line) if c.strip()]
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.M | re.S)
    # commands in the prose (a program named alone, `python -m psi.grid`, is a name, not a command)
    out += [c for c in re.findall(r"`((?:python -m psi|\./run_all\.sh)[^`]*)`", text) if " " in c.split("-m ")[-1]]
    return out


def _psi_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for page in PAGES:
        if not page.is_file():
            continue
        for cmd in _shell_commands(page):
            m = re.search(r"-m (psi[\w.]*)(.*)$", cmd)
            if m and "..." not in cmd:
                # a synopsis: [optional parts] left out, the first of alternatives a|b taken
                args = [a.split("|")[0] for a in shlex.split(re.sub(r"\[[^\]]*\]", "", m.group(2)))]
                found.append((page.relative_to(ROOT).as_posix(), m.group(1), args))
    return found


class _Parsed(Exception):
    pass


def test_the_pages_have_commands_to_check():
    assert len(_psi_commands()) >= 25  # a parser that found none would pass every page


@pytest.mark.parametrize("page,module,args", _psi_commands(), ids=lambda x: x if isinstance(x, str) else " ".join(x))
def test_every_psi_command_parses(page, module, args, monkeypatch):
    assert module in MAINS, f"{page}: python -m {module} is not one of psi's programs ({', '.join(MAINS)})"
    mod, fn = MAINS[module].split(":")
    main = getattr(importlib.import_module(mod), fn)
    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, *a, **kw):
        real(self, *a, **kw)  # exits 2, naming the option, when the command is wrong
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
    try:
        main(args)
    except _Parsed:
        pass
    except SystemExit as e:
        pytest.fail(f"{page}: python -m {module} {shlex.join(args)} does not parse (exit {e.code})")


def test_every_run_all_option_exists():
    script = (ROOT / "run_all.sh").read_text()
    takes = set(re.findall(r"^\s*(--[a-z-]+)\)", script, re.M)) | set(re.findall(r"^\s*(--[a-z-]+)\|", script, re.M))
    for page in PAGES:
        if not page.is_file():
            continue
        for cmd in _shell_commands(page):
            if cmd.startswith("./run_all.sh"):
                unknown = set(re.findall(r"(?<!\S)(--[a-z-]+)", cmd)) - takes
                assert not unknown, f"{page.name}: {cmd}: run_all.sh takes no {', '.join(sorted(unknown))}"


def test_every_import_in_the_pages_imports():
    for page in PAGES:
        if not page.is_file():
            continue
        for block in _blocks(page, "python"):
            for line in block.splitlines():
                if re.match(r"(import|from) \S+", line.strip()):
                    exec(line.strip(), {})  # noqa: S102 - the page's own import line
