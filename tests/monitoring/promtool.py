"""promtool for the monitoring tests: found on PATH (Debian's prometheus package, installed by
scripts/setup.sh), required on CI, and run on files written to a temporary directory."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from tests.conftest import require


@pytest.fixture
def promtool() -> str:
    path = shutil.which("promtool")
    require(path is not None, "promtool not installed (Debian package prometheus)")
    return path


def run(promtool: str, *args: str, cwd=None, stdin: str | None = None):
    return subprocess.run([promtool, *args], cwd=cwd, input=stdin, capture_output=True,
                          text=True, timeout=120)


def write_yaml(path, doc) -> str:
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return str(path)


def check_expressions(promtool: str, tmp_path, exprs: dict[str, str]):
    """Parse PromQL expressions with `promtool check rules` (each as a recording rule: the
    check parses every expression without needing a server). Returns the completed run."""
    rules = [{"record": f"check:{i}", "expr": expr} for i, expr in enumerate(exprs.values())]
    path = write_yaml(tmp_path / "exprs.yaml", {"groups": [{"name": "exprs", "rules": rules}]})
    return run(promtool, "check", "rules", path)
