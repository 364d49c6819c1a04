"""The operator guide cannot drift silently from the code: every flag of `nodecryptor run` is in
its flag table with the parser's default, every metric the code registers is in its metrics
tables, and neither table lists anything the code does not have. Failures name what is missing.
"""

from __future__ import annotations

import argparse
import re

import pytest

from deploy_manifests import GUIDE, REPO
from nodecryptor.cli import build_parser
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.settings import Settings

FLAGS_HEADING = "## Flags of `nodecryptor run`"
METRICS_HEADING = "## Metrics"


def section(text: str, heading: str) -> str:
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def table_rows(markdown: str) -> list[list[str]]:
    """Cells of every table row in ``markdown`` (header and separator rows dropped)."""
    rows = []
    for line in markdown.splitlines():
        line = line.strip()
        if not line.startswith("|") or set(line) <= set("|-: "):
            continue
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[0] in ("Flag", "Metric"):
            continue
        rows.append(cells)
    return rows


def code_text(cell: str) -> str:
    """The text of the first `code span` in a cell."""
    match = re.search(r"`([^`]+)`", cell)
    assert match, f"no `code` in table cell {cell!r}"
    return match.group(1)


def run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices["run"]


def run_flags() -> dict[str, object]:
    """Long option -> default, for every option of `nodecryptor run` except --help."""
    out = {}
    for action in run_parser()._actions:
        longs = [o for o in action.option_strings if o.startswith("--")]
        if longs and longs[0] != "--help":
            out[longs[0]] = action.default
    return out


def default_text(default: object) -> str:
    """How the guide writes a default: unset, true/false, or the value itself."""
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    return str(default)


def documented_flags() -> dict[str, str]:
    rows = table_rows(section(GUIDE.read_text(), FLAGS_HEADING))
    return {code_text(r[0]): r[1] for r in rows}


def exposed_names(families) -> set[str]:
    """Metric names as a scrape shows them (counters with _total, info with _info)."""
    suffix = {"counter": "_total", "info": "_info"}
    return {f.name + suffix.get(f.type, "") for f in families}


def code_metrics() -> set[str]:
    names = exposed_names(Metrics().registry.collect())
    try:
        from nodecryptor.datapath.bpf.collector import DatapathCollector
    except ImportError:
        return names
    # A collector pointed at a bpffs that does not exist still yields every family.
    collector = DatapathCollector(Settings(bpffs="/nonexistent-bpffs"))
    return names | exposed_names(collector.collect())


def documented_metrics() -> set[str]:
    rows = table_rows(section(GUIDE.read_text(), METRICS_HEADING))
    return {code_text(r[0]) for r in rows}


def test_guide_exists_with_both_tables():
    text = GUIDE.read_text()
    assert FLAGS_HEADING in text and METRICS_HEADING in text


def test_every_run_flag_is_documented_with_its_default():
    documented = documented_flags()
    flags = run_flags()
    missing = sorted(set(flags) - set(documented))
    assert not missing, (
        f"{GUIDE.name}: add these flags of `nodecryptor run` to the flag table: {missing}"
    )
    wrong = {
        flag: (documented[flag], default_text(default))
        for flag, default in flags.items()
        if default_text(default) not in documented[flag].replace("`", "")
    }
    assert not wrong, f"{GUIDE.name}: flag defaults differ (documented, expected): {wrong}"


def test_flag_table_lists_no_removed_flag():
    stale = sorted(set(documented_flags()) - set(run_flags()))
    assert not stale, f"{GUIDE.name}: the flag table lists flags `nodecryptor run` lacks: {stale}"


def test_every_metric_is_documented():
    missing = sorted(code_metrics() - documented_metrics())
    assert not missing, f"{GUIDE.name}: add these metrics to the metrics tables: {missing}"


def test_metrics_tables_list_no_unknown_metric():
    stale = sorted(documented_metrics() - code_metrics())
    assert not stale, f"{GUIDE.name}: the metrics tables list metrics the code lacks: {stale}"


@pytest.mark.parametrize(
    "default, text",
    [
        (None, "unset"),
        (False, "false"),
        (True, "true"),
        (":8083", ":8083"),
        ("2379-2380,6443", "2379-2380,6443"),
    ],
)
def test_default_rendering(default, text):
    assert default_text(default) == text


def test_table_parsing_sees_a_missing_flag():
    """The comparison is not vacuous: a table without one flag is reported."""
    rows = [
        r
        for r in table_rows(section(GUIDE.read_text(), FLAGS_HEADING))
        if code_text(r[0]) != "--fail-mode"
    ]
    assert "--fail-mode" in set(run_flags()) - {code_text(r[0]) for r in rows}


def _guide_tokens(pattern: str) -> set[str]:
    return set(re.findall(pattern, GUIDE.read_text()))


def test_cited_tests_exist():
    """Every test the guide cites as evidence is defined somewhere under tests/."""
    defined = set()
    for path in (REPO / "tests").rglob("*.py"):
        defined |= set(re.findall(r"^\s*def (test_\w+)\(", path.read_text(), re.MULTILINE))
    missing = sorted(_guide_tokens(r"\b(test_\w+)\b(?!\.py)") - defined)
    assert not missing, f"{GUIDE.name} cites tests that do not exist (renamed?): {missing}"


def test_cited_files_exist():
    cited = _guide_tokens(r"`((?:tests|nodecryptor|k8s|bpf)/[\w./-]+?)(?:::\w+)?`")
    missing = sorted(p for p in cited if not (REPO / p.rstrip("/")).exists())
    assert not missing, f"{GUIDE.name} cites files that do not exist: {missing}"


def test_cited_packet_cases_exist():
    cases = (REPO / "tests" / "datapath_cases.py").read_text()
    cited = _guide_tokens(r"`(v[46]-[a-z0-9-]+)`")
    assert cited, "the guide cites no packet case"
    missing = sorted(c for c in cited if f'"{c}"' not in cases)
    assert not missing, f"{GUIDE.name} cites packet cases tests/datapath_cases.py lacks: {missing}"
