"""The `alerts` lab scenario with a real Prometheus: WireGuard broken on one worker and clear
text from a rogue host fire NodecryptorWireGuardDown and NodecryptorCleartextAccepted for the
right nodes only, and everything resolves after the repair (see nodecryptor_testkit/lab/
alerts.py). BPF datapath only: it is the one that counts clear text. About a minute."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import have_bcc, require

from nodecryptor_testkit.lab import report
from nodecryptor_testkit.lab.flows import PortAllocator
from nodecryptor_testkit.lab.lab import Lab
from nodecryptor_testkit.lab.scenarios import run_scenario
from nodecryptor_testkit.lab.spec import make_spec

pytestmark = [pytest.mark.e2e, pytest.mark.privileged, pytest.mark.slow]


def test_alerts_scenario_with_a_real_prometheus():
    require(os.geteuid() == 0, "needs root (network namespaces, bpffs)")
    for tool, package in (("prometheus", "prometheus"), ("promtool", "prometheus"),
                          ("wg", "wireguard-tools"), ("wireguard-go", "wireguard-go"),
                          ("tcpdump", "tcpdump")):
        require(shutil.which(tool) is not None, f"{tool} not installed (Debian package {package})")
    ok, why = have_bcc()
    require(ok, why)
    lab = Lab(make_spec(3), datapath="bpf")
    lab.up()
    try:
        result = run_scenario(lab, "alerts", PortAllocator())
    finally:
        lab.down()
    assert result.ok, "\n" + report.table(result)
    timeline = [v for k, v in result.facts.items() if k.startswith("alert timeline")]
    assert any("firing   NodecryptorWireGuardDown{node=w2}" in line for line in timeline), timeline
    assert any("resolved NodecryptorCleartextAccepted{node=w1}" in line
               for line in timeline), timeline
