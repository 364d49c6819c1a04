"""scripts/vm-load-check.sh, the fast 6.1 verifier step of scripts/test.sh, with a stand-in
harness (same command line and result file as vm-tests/harness.py --load-only): a rejection
fails the step and shows the verifier's last lines; missing VM prerequisites skip it locally
and fail it on CI; and scripts/test.sh runs it before the suite."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "scripts", "vm-load-check.sh")

FAKE = """
import json, sys
args = sys.argv[1:]
assert "--load-only" in args, args
out = args[args.index("--out") + 1]
result = json.loads({result!r})
if result is not None:
    with open(out, "w") as f:
        json.dump(result, f)
sys.exit({rc})
"""


def run_step(tmp_path, result, rc: int, ci: bool = False) -> subprocess.CompletedProcess:
    fake = tmp_path / "harness.py"
    fake.write_text(FAKE.format(result=json.dumps(result), rc=rc))
    env = dict(os.environ, NC_VM_HARNESS=str(fake))
    env.pop("CI", None)
    if ci:
        env["CI"] = "true"
    return subprocess.run(["bash", SCRIPT], capture_output=True, text=True, env=env, cwd=REPO)


def test_a_rejection_fails_the_step_with_the_verifier_tail(tmp_path):
    res = run_step(
        tmp_path,
        {
            "ok": False,
            "error": "DatapathError: load failed",
            "log_tail": ["back-edge from insn 412 to 88"],
        },
        rc=1,
    )
    assert res.returncode == 1
    assert "rejected" in res.stderr and "back-edge from insn 412" in res.stderr


def test_acceptance_passes_and_reports_the_counts(tmp_path):
    res = run_step(tmp_path, {"ok": True, "verified_insns": {"nc_egress": 1234}}, rc=0)
    assert res.returncode == 0, res.stderr
    assert "accepts the program" in res.stdout and "1234" in res.stdout


@pytest.mark.parametrize("ci,expected", [(False, 0), (True, 2)])
def test_missing_prerequisites_skip_locally_and_fail_on_ci(tmp_path, ci, expected):
    res = run_step(tmp_path, None, rc=2, ci=ci)
    assert res.returncode == expected, res.stderr
    if not ci:
        assert "skipped" in res.stderr


def test_test_sh_runs_the_load_check_before_the_suite():
    with open(os.path.join(REPO, "scripts", "test.sh")) as f:
        steps = [line.strip() for line in f if line.strip() and not line.startswith("#")]
    check = steps.index("bash scripts/vm-load-check.sh")
    suite = next(i for i, s in enumerate(steps) if "-m pytest" in s)
    assert check < suite
