"""The layout of the C sources under bpf/, read as text (no BCC, no privileges): every map is
declared in bpf/lib/maps.h and nowhere else, the entry file holds only the entry points (both
decisions live in lib headers), and the packet tables' longest IPv6 extension-header chain is
the one the program walks."""

from __future__ import annotations

import re
from pathlib import Path

import datapath_cases as dc
from nodecryptor.datapath.bpf import abi

BPF = Path(__file__).resolve().parents[2] / "bpf"
# BCC's map declaration macros, and the project's wrapper around them.
_MAP_DECL = re.compile(
    r"^\s*(NC_MAP|BPF_TABLE\w*|BPF_F_TABLE|BPF_(HASH|ARRAY|PERCPU_\w+|LPM_"
    r"TRIE|LRU_\w+|PROG_ARRAY|DEVMAP|CPUMAP|XSKMAP|SOCK\w+|STACK_TRACE|"
    r"PERF_\w+|RINGBUF\w*|QUEUE|STACK|CGROUP\w*|INODE\w*|TASK\w*|SK_\w+))\s*\(",
    re.MULTILINE,
)


def _sources() -> list[Path]:
    return sorted(p for p in BPF.rglob("*") if p.suffix in (".c", ".h"))


def _code(path: Path) -> str:
    """The file without comments and without #define lines (macro bodies are no declarations)."""
    text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.DOTALL)
    return re.sub(r"^\s*#\s*define\b.*?(?<!\\)$", "", text, flags=re.MULTILINE | re.DOTALL)


def test_every_map_is_declared_in_maps_h_only():
    declared = {}
    for path in _sources():
        for match in _MAP_DECL.finditer(_code(path)):
            declared.setdefault(path.relative_to(BPF).as_posix(), []).append(match.group(1))
    assert list(declared) == ["lib/maps.h"], declared
    maps_h = _code(BPF / "lib" / "maps.h")
    names = set(re.findall(r"NC_MAP\([^;]*?,\s*(nc_\w+)\s*,", maps_h, flags=re.DOTALL))
    assert names == {spec.name for spec in abi.MAP_SPECS}


def test_entry_file_holds_only_the_entry_points():
    code = _code(BPF / "nodecryptor.c")
    functions = re.findall(
        r"^(?:static\s+)?[\w\s\*]+?\b(\w+)\s*\([^;{]*\)\s*\{", code, flags=re.MULTILINE
    )
    assert functions == ["nc_egress", "nc_explain", "nc_ingress", "nc_explain_ingress"]
    bodies = re.findall(r"\{\s*(.*?)\s*\}", code, flags=re.DOTALL)
    assert bodies == [
        "return nc_egress_decide(skb, 0);",
        "return nc_egress_decide(skb, 1);",
        "return nc_ingress_decide(skb, 0);",
        "return nc_ingress_decide(skb, 1);",
    ]


def test_tables_longest_ipv6_chain_is_the_programs_limit():
    limit = re.search(r"#define NC_IPV6_EXT_MAX (\d+)", (BPF / "lib" / "parse.h").read_text())
    assert limit and int(limit.group(1)) == len(dc.SIX_EXT)
