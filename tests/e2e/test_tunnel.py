"""End-to-end in tunnel mode: the lab's Cilium stand-ins play Cilium with VXLAN (pod traffic
encapsulated between node addresses in ``cilium_vxlan``, peers' allowed-IPs holding node
addresses only), both datapaths. nodecryptor must detect it, drop nothing because pod CIDRs are
not in allowed-IPs, and encrypt the tunnel's UDP like any node traffic; the capture decodes
VXLAN, so a pod flow crossing inside a clear tunnel would still be seen."""

from __future__ import annotations

import pytest
from test_scenarios import require_lab_tools

from nodecryptor_testkit.lab import report
from nodecryptor_testkit.lab.flows import PortAllocator
from nodecryptor_testkit.lab.lab import Lab
from nodecryptor_testkit.lab.scenarios import run_scenario
from nodecryptor_testkit.lab.spec import make_spec

pytestmark = [pytest.mark.e2e, pytest.mark.privileged, pytest.mark.slow]


@pytest.fixture(scope="module", params=["bpf", "iprule"])
def tunnel_lab(request):
    require_lab_tools(request.param)
    the_lab = Lab(make_spec(3), datapath=request.param, routing="tunnel")
    the_lab.up()
    try:
        yield the_lab
    finally:
        the_lab.down()


@pytest.mark.parametrize("scenario", ["matrix", "cilium-restart"])
def test_tunnel_scenario(tunnel_lab, scenario):
    result = run_scenario(tunnel_lab, scenario, PortAllocator(first=36000, last=40000))
    assert result.ok, "\n" + report.table(result)


def test_status_reports_tunnel_mode(tunnel_lab):
    for name in tunnel_lab.nodes:
        st = tunnel_lab.nodecryptor(name, "status")
        assert st["ready"], st["reason"]
        cil = st["cilium"]
        assert cil["routing_mode"] == "tunnel", cil
        assert cil["tunnel_device"] == "cilium_vxlan"
        assert cil["node_ips_in_allowed_ips"] is True
        assert (cil["wg_port"], cil["wg_fwmark"], cil["wg_mtu"]) == (51871, "0xe00", 1405)


def test_tunnel_udp_is_encrypted_and_pod_cidrs_not_destinations(tunnel_lab):
    """explain on a worker: VXLAN to a remote node address is encrypted, a remote pod address
    is no destination of nodecryptor's (Cilium's tunnel carries it), nothing is dropped."""
    w1, w2 = tunnel_lab.spec.workers[0], tunnel_lab.spec.workers[-1]
    vxlan = tunnel_lab.nodecryptor(
        w1.name, "explain", "--dst", str(w2.ipv4), "--proto", "udp", "--dport", "8472"
    )
    assert vxlan["verdict"] == "encrypt", vxlan
    pod = tunnel_lab.nodecryptor(
        w1.name,
        "explain",
        "--src",
        str(w1.pod_ipv4),
        "--dst",
        str(w2.pod_ipv4),
        "--dport",
        "8080",
        "--device",
        "eth0",
    )
    assert pod["verdict"] == "pass" and "drop" not in pod["reason"], pod
