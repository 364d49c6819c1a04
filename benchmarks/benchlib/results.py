"""The results file: its contract (checked before anything is written), the tables printed
from it, and the performance targets evaluated against it.

Contract of ``benchmarks/results/latest.json`` (later checks read it):

    {"machine": {...},
     "datapath": [{"config": "baseline"|"bpf"|"iprule"|"seed",
                   "traffic": "non-cluster"|"forwarded"|"cluster",
                   "nodes": N, "pps": float, "ratio_to_baseline": float}],
     "per_packet": [{"case": "empty"|"miss"|"hit-node"|"hit-pod"|"exempt",
                     "family": 4|6, "nodes": N, "ns": float}],
     "control_plane": [{"datapath": "bpf"|"iprule", "nodes": N, "ready_s": float,
                        "rss_mb": float, "peak_rss_mb": float, "p50_ms": float,
                        "p99_ms": float}]}

Rows hold exactly these keys. Everything else a run knows (how it was measured, the sender's
ceiling, CPU per event, set-up times, why a section is missing) goes under ``notes``.
"""

from __future__ import annotations

import json
import math
import os
import time

DATAPATH_KEYS = {
    "config": str,
    "traffic": str,
    "nodes": int,
    "pps": float,
    "ratio_to_baseline": float,
}
PER_PACKET_KEYS = {"case": str, "family": int, "nodes": int, "ns": float}
CONTROL_PLANE_KEYS = {
    "datapath": str,
    "nodes": int,
    "ready_s": float,
    "rss_mb": float,
    "peak_rss_mb": float,
    "p50_ms": float,
    "p99_ms": float,
}
ENUMS = {
    "config": {"baseline", "bpf", "iprule", "seed"},
    "traffic": {"non-cluster", "forwarded", "cluster"},
    "case": {"empty", "miss", "hit-node", "hit-pod", "exempt"},
    "family": {4, 6},
    "datapath": {"bpf", "iprule"},
}
SECTIONS = {
    "datapath": DATAPATH_KEYS,
    "per_packet": PER_PACKET_KEYS,
    "control_plane": CONTROL_PLANE_KEYS,
}


def contract_problems(doc: dict) -> list[str]:
    """Everything in ``doc`` that breaks the contract; empty when it holds. Numbers must be
    finite and positive (a node count may be 0)."""
    problems = []
    if not isinstance(doc.get("machine"), dict) or not doc["machine"]:
        problems.append("machine: missing or empty")
    for section, keys in SECTIONS.items():
        rows = doc.get(section)
        if not isinstance(rows, list):
            problems.append(f"{section}: not a list")
            continue
        for i, row in enumerate(rows):
            where = f"{section}[{i}]"
            if not isinstance(row, dict) or set(row) != set(keys):
                problems.append(
                    f"{where}: keys {sorted(row) if isinstance(row, dict) else row}"
                    f" != {sorted(keys)}"
                )
                continue
            for key, typ in keys.items():
                value = row[key]
                if typ is float:
                    ok = (
                        isinstance(value, (int, float))
                        and not isinstance(value, bool)
                        and math.isfinite(value)
                        and value > 0
                    )
                elif typ is int:
                    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
                else:
                    ok = isinstance(value, str)
                if not ok:
                    problems.append(f"{where}.{key}: {value!r} is not a valid {typ.__name__}")
                elif key in ENUMS and value not in ENUMS[key]:
                    problems.append(f"{where}.{key}: {value!r} not one of {sorted(ENUMS[key])}")
    return problems


def write(doc: dict, results_dir: str, label: str) -> tuple[str, str]:
    """Write the timestamped file and ``latest.json``; returns both paths."""
    problems = contract_problems(doc)
    if problems:
        raise ValueError("results break the contract: " + "; ".join(problems[:10]))
    os.makedirs(results_dir, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    path = os.path.join(results_dir, f"{stamp}-{label}.json")
    text = json.dumps(doc, indent=1, sort_keys=False) + "\n"
    for p in (path, os.path.join(results_dir, "latest.json")):
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(text)
        os.replace(tmp, p)
    return path, os.path.join(results_dir, "latest.json")


# ---- tables ---------------------------------------------------------------------------------


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)
    ]

    def line(cells):
        return "  ".join(c.rjust(w) for c, w in zip(cells, widths))

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def datapath_table(rows: list[dict]) -> str:
    by = {(r["nodes"], r["traffic"], r["config"]): r for r in rows}
    out = []
    for nodes in sorted({r["nodes"] for r in rows}):
        for traffic in ("non-cluster", "forwarded", "cluster"):
            base = by.get((nodes, traffic, "baseline"))
            if base is None:
                continue
            cells = [f"{nodes:,}", traffic, f"{base['pps']:,.0f}"]
            for config in ("bpf", "iprule", "seed"):
                r = by.get((nodes, traffic, config))
                cells.append(f"{r['pps']:,.0f} ({r['ratio_to_baseline']:.2f}x)" if r else "-")
            out.append(cells)
    return _table(
        ["nodes", "traffic", "baseline pps", "bpf pps (x)", "iprule pps (x)", "seed pps (x)"], out
    )


def empty_floor(rows: list[dict], family: int, nodes: int) -> float | None:
    """The empty program's ns for this family: measured at the same size when there is such a
    row, else the median of the family's empty rows (an empty program has no maps, so its cost
    does not depend on the size)."""
    same = [
        r["ns"]
        for r in rows
        if r["case"] == "empty" and r["family"] == family and r["nodes"] == nodes
    ]
    if same:
        return same[0]
    other = sorted(r["ns"] for r in rows if r["case"] == "empty" and r["family"] == family)
    return other[len(other) // 2] if other else None


def per_packet_table(rows: list[dict]) -> str:
    by = {(r["family"], r["nodes"], r["case"]): r["ns"] for r in rows}
    out = []
    for family in (4, 6):
        for nodes in sorted({r["nodes"] for r in rows if r["family"] == family}):
            floor = empty_floor(rows, family, nodes)
            cells = [f"IPv{family}", f"{nodes:,}"]
            for case in ("empty", "miss", "hit-node", "hit-pod", "exempt"):
                ns = by.get((family, nodes, case))
                if ns is None:
                    cells.append("-")
                elif case == "empty" or floor is None:
                    cells.append(f"{ns:.1f}")
                else:
                    cells.append(f"{ns:.1f} (+{ns - floor:.1f})")
            out.append(cells)
    return _table(
        [
            "family",
            "nodes",
            "empty ns",
            "miss ns (+)",
            "hit-node ns (+)",
            "hit-pod ns (+)",
            "exempt ns (+)",
        ],
        out,
    )


def control_plane_table(rows: list[dict], cpu: dict) -> str:
    out = []
    for r in rows:
        key = f"{r['datapath']}/{r['nodes']}"
        out.append(
            [
                r["datapath"],
                f"{r['nodes']:,}",
                f"{r['ready_s']:.2f}",
                f"{r['rss_mb']:.0f}",
                f"{r['peak_rss_mb']:.0f}",
                f"{r['p50_ms']:.0f}",
                f"{r['p99_ms']:.0f}",
                f"{cpu[key]:.1f}" if key in cpu else "-",
            ]
        )
    return _table(
        [
            "datapath",
            "nodes",
            "ready s",
            "RSS MB",
            "peak RSS MB",
            "p50 ms",
            "p99 ms",
            "CPU ms/event",
        ],
        out,
    )


# ---- targets ------------------------------------------------------------------------------


def targets(doc: dict) -> list[tuple[str, bool | None, str]]:
    """(target, met (None: not measured), measured value) for each performance target
    (docs/performance.md)."""
    out = []
    dp = {(r["config"], r["traffic"], r["nodes"]): r for r in doc["datapath"]}
    for config, floor in (("bpf", 0.90), ("iprule", 0.85)):
        r = dp.get((config, "non-cluster", 10_000))
        out.append(
            (
                f"{config} non-cluster at 10,000 nodes >= {floor:.2f}x baseline",
                None if r is None else r["ratio_to_baseline"] >= floor,
                "not measured" if r is None else f"{r['ratio_to_baseline']:.2f}x",
            )
        )
    pp = {(r["case"], r["family"], r["nodes"]): r["ns"] for r in doc["per_packet"]}
    for nodes in (10_000, 50_000):
        for family in (4, 6):
            floor = empty_floor(doc["per_packet"], family, nodes)
            for case, limit in (("miss", 15), ("hit-node", 60), ("hit-pod", 60)):
                ns = pp.get((case, family, nodes))
                name = f"per-packet {case} IPv{family} at {nodes:,} nodes <= +{limit} ns"
                if ns is None or floor is None:
                    out.append((name, None, "not measured"))
                else:
                    out.append((name, ns - floor <= limit, f"+{ns - floor:.1f} ns"))
    for r in doc["control_plane"]:
        if r["nodes"] != 10_000:
            continue
        d = r["datapath"]
        out.append(
            (f"{d} ready at 10,000 nodes <= 10 s", r["ready_s"] <= 10, f"{r['ready_s']:.1f} s")
        )
        out.append(
            (
                f"{d} steady RSS at 10,000 nodes <= 200 MB",
                r["rss_mb"] <= 200,
                f"{r['rss_mb']:.0f} MB",
            )
        )
        out.append(
            (
                f"{d} event->datapath p99 at 10,000 nodes <= 100 ms",
                r["p99_ms"] <= 100,
                f"{r['p99_ms']:.0f} ms",
            )
        )
    return out


def targets_table(doc: dict) -> str:
    rows = [
        [name, "met" if ok else ("MISSED" if ok is False else "n/a"), value]
        for name, ok, value in targets(doc)
    ]
    return _table(["target", "result", "measured"], rows)
