"""docs/ARCHITECTURE.md's module table stays true to the tree: it names every module of the
nodecryptor package, and every module it names exists."""

from __future__ import annotations

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = REPO / "nodecryptor"
DOC = REPO / "docs" / "ARCHITECTURE.md"


def modules_in_tree() -> set[str]:
    return {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
            if p.name != "__init__.py" and "__pycache__" not in p.parts}


def modules_in_table() -> set[str]:
    """Backticked ``*.py`` names in the first column of the table under the header
    ``| module | concern | does I/O |``."""
    lines = DOC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines)
                 if line.replace(" ", "") == "|module|concern|doesI/O|")
    named = set()
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        first_cell = line.split("|")[1]
        named.update(re.findall(r"`([^`]+\.py)`", first_cell))
    return named


def test_every_module_is_in_the_table():
    missing = sorted(modules_in_tree() - modules_in_table())
    assert not missing, f"{DOC.name}: add these modules to the module table: {missing}"


def test_every_module_in_the_table_exists():
    unknown = sorted(modules_in_table() - modules_in_tree())
    assert not unknown, f"{DOC.name}: the module table names modules that do not exist: {unknown}"
