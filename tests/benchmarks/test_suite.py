"""The benchmark suite (benchmarks/suite.py): the results contract, the per-packet fallback,
flag errors, and one run of its smallest form (``--smoke``) checked for shape only — no
number is compared with a threshold, so machine load cannot fail this test."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
from conftest import require

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import suite
from benchlib import results


def valid_doc() -> dict:
    return {
        "machine": {"cpu_model": "x", "cpus": 2},
        "datapath": [
            {
                "config": "bpf",
                "traffic": "non-cluster",
                "nodes": 0,
                "pps": 1.5,
                "ratio_to_baseline": 0.9,
            }
        ],
        "per_packet": [{"case": "hit-node", "family": 6, "nodes": 10_000, "ns": 30.0}],
        "control_plane": [
            {
                "datapath": "iprule",
                "nodes": 1000,
                "ready_s": 1.0,
                "rss_mb": 80.0,
                "peak_rss_mb": 90.0,
                "p50_ms": 100.0,
                "p99_ms": 200.0,
            }
        ],
    }


def test_contract_accepts_a_valid_document():
    assert results.contract_problems(valid_doc()) == []


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("datapath", "pps", float("nan")),
        ("datapath", "pps", 0.0),
        ("datapath", "config", "cilium"),
        ("datapath", "nodes", -1),
        ("per_packet", "family", 5),
        ("per_packet", "ns", float("inf")),
        ("control_plane", "datapath", "fake"),
        ("control_plane", "p99_ms", "fast"),
    ],
)
def test_contract_rejects_bad_values(section, key, value):
    doc = valid_doc()
    doc[section][0][key] = value
    problems = results.contract_problems(doc)
    assert any(f"{section}[0].{key}" in p for p in problems), problems


def test_contract_rejects_extra_and_missing_keys():
    doc = valid_doc()
    doc["datapath"][0]["extra"] = 1
    del doc["control_plane"][0]["rss_mb"]
    problems = results.contract_problems(doc)
    assert any(p.startswith("datapath[0]: keys") for p in problems)
    assert any(p.startswith("control_plane[0]: keys") for p in problems)


def test_write_refuses_a_broken_document(tmp_path):
    doc = valid_doc()
    doc["per_packet"][0]["case"] = "?"
    with pytest.raises(ValueError, match="contract"):
        results.write(doc, str(tmp_path), "t")
    assert not os.listdir(tmp_path)


def test_write_makes_timestamped_file_and_latest(tmp_path):
    path, latest = results.write(valid_doc(), str(tmp_path), "quick")
    assert path.endswith("-quick.json") and latest == str(tmp_path / "latest.json")
    assert json.loads(open(path).read()) == json.loads(open(latest).read()) == valid_doc()


# ---- per-packet section: bpf_cost.py as a subprocess ------------------------------------------


def fake_bpf_cost(tmp_path, body: str) -> str:
    path = tmp_path / "fake_bpf_cost.py"
    path.write_text(body)
    return str(path)


def test_per_packet_without_json_flag_is_recorded_as_unsupported(tmp_path):
    script = fake_bpf_cost(
        tmp_path, "import argparse\nargparse.ArgumentParser(prog='bpf_cost.py').parse_args()\n"
    )
    notes: dict = {}
    assert suite.run_per_packet([0], True, notes, script=script) == []
    assert notes["per_packet"]["status"] == "unsupported"
    assert "--json" in notes["per_packet"]["reason"]


def test_per_packet_other_failure_is_a_failure(tmp_path):
    script = fake_bpf_cost(tmp_path, "import sys\nsys.exit('needs root')\n")
    notes: dict = {}
    assert suite.run_per_packet([0], True, notes, script=script) == []
    assert notes["per_packet"]["status"] == "failed"
    assert "needs root" in notes["per_packet"]["reason"]


def test_per_packet_rows_are_read_from_the_json(tmp_path):
    rows = [{"case": "empty", "family": 4, "nodes": 0, "ns": 20.5}]
    script = fake_bpf_cost(
        tmp_path,
        "import json, sys\n"
        "a = sys.argv\n"
        "json.dump(%r, open(a[a.index('--json') + 1], 'w'))\n" % rows,
    )
    notes: dict = {}
    assert suite.run_per_packet([0, 10], False, notes, script=script) == rows
    assert notes["per_packet"]["status"] == "ok"


def test_per_packet_rows_breaking_the_contract_fail_only_that_section(tmp_path):
    rows = [{"case": "empty", "family": 4, "nodes": 0, "ns": 20.5, "extra": 1}]
    script = fake_bpf_cost(
        tmp_path,
        "import json, sys\n"
        "a = sys.argv\n"
        "json.dump(%r, open(a[a.index('--json') + 1], 'w'))\n" % rows,
    )
    notes: dict = {}
    assert suite.run_per_packet([0], False, notes, script=script) == []
    assert notes["per_packet"]["status"] == "failed"
    assert "contract" in notes["per_packet"]["reason"]


def test_targets_use_the_empty_program_of_any_size_as_floor():
    doc = valid_doc()
    doc["per_packet"] = [
        {"case": "empty", "family": 4, "nodes": 0, "ns": 20.0},
        {"case": "miss", "family": 4, "nodes": 10_000, "ns": 30.0},
        {"case": "hit-node", "family": 4, "nodes": 10_000, "ns": 100.0},
    ]
    got = {name: (ok, value) for name, ok, value in results.targets(doc)}
    assert got["per-packet miss IPv4 at 10,000 nodes <= +15 ns"] == (True, "+10.0 ns")
    assert got["per-packet hit-node IPv4 at 10,000 nodes <= +60 ns"] == (False, "+80.0 ns")
    assert got["per-packet hit-pod IPv4 at 10,000 nodes <= +60 ns"][0] is None


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--only", "datapath,bogus"], "--only"),
        (["--sizes", "10,x"], "--sizes"),
        (["--cp-sizes", "-5"], "--cp-sizes"),
        (["--mode", "huge"], "--mode"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(args, flag):
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "benchmarks", "suite.py"), *args],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert flag in proc.stderr


# ---- the smallest real run ------------------------------------------------------------------


@pytest.mark.privileged
@pytest.mark.bpf
@pytest.mark.slow
def test_smoke_run_writes_the_contract(tmp_path, bcc_available, wireguard_go):
    """~30 s: the suite at 0 and 100 nodes, 0.1 s cells, 1 s of churn. Checks shape only."""
    require(shutil.which("gcc") is not None, "gcc not installed (make bench-deps)")
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(REPO, "benchmarks", "suite.py"),
            "--smoke",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    latest = json.loads((tmp_path / "latest.json").read_text())
    stamped = [p for p in os.listdir(tmp_path) if p.endswith("-smoke.json")]
    assert len(stamped) == 1
    assert json.loads((tmp_path / stamped[0]).read_text()) == latest
    assert results.contract_problems(latest) == []
    for key in ("cpu_model", "cpus", "kernel", "memory_mb", "load_start", "load_end"):
        assert latest["machine"][key], key

    cells = {(r["config"], r["traffic"], r["nodes"]) for r in latest["datapath"]}
    for config in ("baseline", "bpf", "iprule", "seed"):
        for traffic in ("non-cluster", "forwarded"):
            assert (config, traffic, 0) in cells and (config, traffic, 100) in cells
        assert (config, "cluster", 100) in cells  # no cluster destination at 0 nodes
    assert all(
        r["ratio_to_baseline"] == 1.0 for r in latest["datapath"] if r["config"] == "baseline"
    )
    assert {(r["datapath"], r["nodes"]) for r in latest["control_plane"]} == {
        ("bpf", 100),
        ("iprule", 100),
    }
    assert all(math.isfinite(r["p99_ms"]) for r in latest["control_plane"])

    per_packet = latest["notes"]["per_packet"]
    if not latest["per_packet"]:
        # Tolerated in exactly one case: bpf_cost.py does not know --json yet.
        assert per_packet["status"] == "unsupported", per_packet
    else:
        assert per_packet["status"] == "ok"
        assert {r["case"] for r in latest["per_packet"]} >= {"empty", "miss", "hit-node"}
    assert "\nTargets:" in proc.stdout
