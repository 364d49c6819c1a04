"""Render scenario results: one table per scenario (flow, expected, observed, ok), measured
facts under it, and a final summary; or all of it as JSON."""

from __future__ import annotations

from collections.abc import Iterable

from .flows import Result


def table(result: Result) -> str:
    head = (
        f"== {result.scenario} ({result.datapath} datapath) "
        f"{'PASS' if result.ok else 'FAIL'} in {result.seconds:.1f} s"
    )
    lines = [head]
    if result.error:
        lines.append(f"   error: {result.error}")
    if result.rows:
        width = max(len(r.label) for r in result.rows)
        wexp = max(8, max(len(r.expected) for r in result.rows))
        wobs = max(8, max(len(r.observed) for r in result.rows))
        lines.append(
            f"   {'FLOW / CHECK':<{width}}  {'EXPECTED':<{wexp}}  {'OBSERVED':<{wobs}}  OK"
        )
        for r in result.rows:
            detail = f"  ({r.detail})" if r.detail and not r.ok else ""
            lines.append(
                f"   {r.label:<{width}}  {r.expected:<{wexp}}  {r.observed:<{wobs}}  "
                f"{'ok' if r.ok else 'NO'}{detail}"
            )
    for key, value in result.facts.items():
        lines.append(f"   {key}: {value}")
    return "\n".join(lines)


def summary(results: Iterable[Result], timings: dict[str, float]) -> str:
    results = list(results)
    lines = ["== summary"]
    for r in results:
        bad = sum(1 for row in r.rows if not row.ok)
        state = "PASS" if r.ok else ("ERROR" if r.error else f"FAIL ({bad} rows differ)")
        lines.append(f"   {r.datapath:<7} {r.scenario:<10} {state:<22} {r.seconds:6.1f} s")
    for key, value in timings.items():
        lines.append(f"   {key}: {value:.1f} s")
    failed = [r for r in results if not r.ok]
    lines.append(
        "   all scenarios passed"
        if not failed
        else f"   {len(failed)} of {len(results)} scenario runs failed"
    )
    return "\n".join(lines)


def to_json(results: Iterable[Result], timings: dict[str, float]) -> dict:
    results = list(results)
    return {
        "ok": all(r.ok for r in results),
        "timings_seconds": {k: round(v, 2) for k, v in timings.items()},
        "results": [
            {
                "scenario": r.scenario,
                "datapath": r.datapath,
                "ok": r.ok,
                "seconds": round(r.seconds, 2),
                "error": r.error,
                "facts": r.facts,
                "rows": [
                    {
                        "flow": row.label,
                        "expected": row.expected,
                        "observed": row.observed,
                        "ok": row.ok,
                        "detail": row.detail,
                    }
                    for row in r.rows
                ],
            }
            for r in results
        ],
    }
