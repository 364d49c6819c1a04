"""The Makefile declares as phony only targets it defines: `make <name>` of a declared target
never ends in "No rule to make target"."""

from __future__ import annotations

import pathlib
import re

MAKEFILE = pathlib.Path(__file__).resolve().parents[1] / "Makefile"


def test_every_phony_target_has_a_rule():
    text = MAKEFILE.read_text()
    phony = {t for line in re.findall(r"^\.PHONY:(.*)$", text, re.M) for t in line.split()}
    rules = set(re.findall(r"^([A-Za-z0-9_.-]+):(?!=)", text, re.M)) - {".PHONY"}
    assert phony, "no .PHONY line found"
    assert not phony - rules, f"phony targets without a rule: {sorted(phony - rules)}"
