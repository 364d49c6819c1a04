"""nodecryptor against real kernel WireGuard, in a Debian 6.1 guest booted by vm-tests/harness.py.

One VM boot per run (module fixture); every test judges one fact of the guest's JSON result.
The guest kernel has no tcx, so the BPF datapath takes the legacy clsact path here. Needs root,
qemu, virtme-ng and the guest kernel with matching headers (``bash scripts/setup-vm.sh``);
without them the tests skip locally and fail on CI. See vm-tests/README.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys

import pytest

from conftest import require

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HARNESS = os.path.join(REPO, "vm-tests", "harness.py")
LAST_RESULT = os.path.join(REPO, "vm-tests", ".cache", "last-result.json")
DATAPATHS = ("bpf", "iprule")
FLOWS = ("tcp_node", "udp_node", "icmp_node", "tcp_pod", "udp_pod", "icmp_pod")
VM_TIMEOUT = 600.0


def load_harness():
    spec = importlib.util.spec_from_file_location("nc_vm_harness", HARNESS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their module through sys.modules
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    require(os.geteuid() == 0, "needs root")
    harness = load_harness()
    missing = harness.missing_prerequisites()
    require(not missing, "VM harness prerequisites missing: " + "; ".join(missing))
    result_dir = tmp_path_factory.mktemp("vm")
    try:
        result = harness.run(",".join(DATAPATHS), timeout=VM_TIMEOUT, keep_dir=str(result_dir))
    except harness.HarnessError as e:
        pytest.fail(f"VM run failed: {e}")
    # Kept for people reading the numbers (vm-tests/README.md quotes them).
    os.makedirs(os.path.dirname(LAST_RESULT), exist_ok=True)
    with open(LAST_RESULT, "w") as f:
        json.dump(result, f, indent=1, sort_keys=True)
    for name in os.listdir(result_dir):
        if name.endswith(".log"):
            shutil.copy(os.path.join(result_dir, name), os.path.dirname(LAST_RESULT))
    return result


def datapath(vm, kind: str) -> dict:
    res = vm["datapaths"].get(kind)
    assert res is not None, f"datapath {kind} did not run"
    assert not res["errors"], f"{kind}: {res['errors']}"
    return res


def test_guest_runs_debian_61_kernel(vm):
    assert vm["kernel"].startswith("6.1."), vm["kernel"]
    assert not vm["errors"], vm["errors"]


def test_kernel_wireguard_tunnel_works(vm):
    wg = vm["wireguard"]
    assert wg["kernel_device"], "cilium_wg0 is not a kernel WireGuard device"
    assert wg["handshake"] and wg["ping_through_tunnel"], wg


@pytest.mark.parametrize("flow", FLOWS)
def test_capture_sees_clear_text_without_nodecryptor(vm, flow):
    """The detector works: without a datapath the same flows are visible on the underlay."""
    res = vm["baseline"]["flows"][flow]
    assert res["delivered"] and res["clear_on_underlay"] > 0, res


@pytest.mark.parametrize("kind", DATAPATHS)
def test_datapath_attached_and_ready(vm, kind):
    obs = datapath(vm, kind)["observe"]
    assert obs["attached"] and obs["ready"], obs


@pytest.mark.parametrize("kind", DATAPATHS)
@pytest.mark.parametrize("flow", FLOWS)
def test_flow_leaves_only_as_wireguard_and_arrives_decrypted(vm, kind, flow):
    res = datapath(vm, kind)["flows"]
    one = res["flows"][flow]
    assert one["delivered"], f"{flow} not delivered"
    assert one["clear_on_underlay"] == 0, f"{flow} seen in the clear on A's underlay"
    assert one["decrypted_on_peer"] > 0, f"{flow} did not arrive through B's cilium_wg0"


@pytest.mark.parametrize("kind", DATAPATHS)
def test_nothing_but_wireguard_on_the_underlay(vm, kind):
    res = datapath(vm, kind)["flows"]
    assert res["clear_ip_on_underlay"] == 0 and res["wireguard_packets_on_underlay"] > 0, res


@pytest.mark.parametrize("kind", DATAPATHS)
def test_apiserver_port_to_control_plane_stays_clear(vm, kind):
    res = datapath(vm, kind)["exempt"]
    assert res["delivered"], res
    assert res["clear_payload_on_underlay"] > 0, "6443 request not seen in the clear"
    assert res["via_wireguard_on_peer"] == 0, "6443 request went through WireGuard"


@pytest.mark.parametrize("kind", DATAPATHS)
@pytest.mark.parametrize("transfer", ("a_to_pod", "b_to_a", "a_to_b"))
def test_no_outer_fragments_with_mss_clamping(vm, kind, transfer):
    """Host to host in both directions with nodecryptor on A only: b_to_a is fixed by A's
    egress clamp of its own SYN, a_to_b by A's ingress clamp of B's SYN-ACK (B clamps
    nothing and advertises 1460)."""
    res = datapath(vm, kind)["mtu_clamped"][transfer]
    assert res["transfer"]["ok"], res["transfer"]
    assert res["wireguard_packets"] > 100, res
    assert res["fragments"] == 0, res
    assert res["clear_tcp_on_underlay"] == 0, res


def test_bpf_uses_legacy_clsact_on_61(vm):
    res = datapath(vm, "bpf")
    assert res["start"]["tcx"]["supported"] is False, res["start"]["tcx"]
    filters = res["tc_egress"]
    assert "bpf" in filters and "direct-action" in filters and "pref 1 " in filters, filters
    # cleanup removed nodecryptor's filter and left Cilium's (the stand-in's) alone.
    after = res["tc_egress_after_cleanup"]
    assert "nodecryptor" not in after and "pref 1 " not in after, after
    assert "cil_to_netdev" in after and "pref 2 " in after, after


def test_bpf_ingress_program_on_legacy_clsact_ingress(vm):
    """6.1 has no tcx: nc_ingress is a clsact ingress filter pref 1 on the underlay and on
    cilium_wg0 (where the peer's SYN-ACK arrives, decrypted), removed by cleanup()."""
    res = datapath(vm, "bpf")
    for dev, filters in res["tc_ingress"].items():
        assert "nodecryptor" in filters and "direct-action" in filters, (dev, filters)
        assert "pref 1 " in filters, (dev, filters)
    for dev, filters in res["tc_ingress_after_cleanup"].items():
        assert "nodecryptor" not in filters, (dev, filters)


def test_bpf_ingress_clamps_the_peers_syn_ack(vm):
    """A → B is the direction only the ingress clamp can fix; without clamping it fragments
    (the control), with clamping the ingress program counted its clamps."""
    res = datapath(vm, "bpf")
    unclamped = res["mtu_unclamped"]["a_to_b"]
    assert unclamped["transfer"]["ok"], unclamped["transfer"]
    assert unclamped["fragmented_percent"] > 50, unclamped
    assert res["mtu_clamped"]["a_to_b"]["mss_peer_advertised"] == [1460], res["mtu_clamped"]
    counters = res["observe_end"]["counters"]
    assert counters.get("ingress-mss-clamped", 0) > 0, counters


def test_bpf_without_mss_clamping_fragments_the_peer_sending(vm):
    """The control of the MTU experiment: same transfer, clamping off, fragments appear."""
    res = datapath(vm, "bpf")
    clamped = res["mtu_clamped"]["b_to_a"]
    unclamped = res["mtu_unclamped"]["b_to_a"]
    assert unclamped["transfer"]["ok"], unclamped["transfer"]
    assert unclamped["fragmented_percent"] > 50, unclamped
    expected = res["apply"]["mss_v4"]
    assert clamped["mss_a_advertised"] == [expected], clamped
    assert unclamped["mss_a_advertised"] == [1460], unclamped


def test_real_bpf_program_loads_on_61(vm):
    """The checks above ran on bpf/nodecryptor.c through BpfDatapath. There is no fallback
    program: when the 6.1 verifier rejects it, datapath() fails every BPF test with the load
    error and the tail of the verifier's log."""
    start = datapath(vm, "bpf")["start"]
    assert start["impl"] == "nodecryptor", start
    assert datapath(vm, "bpf")["observe"]["details"]["mode"] == "tc"


@pytest.mark.parametrize("kind", DATAPATHS)
def test_wireguard_reader_reads_kernel_wireguard(vm, kind):
    apply = datapath(vm, kind)["apply"]
    assert apply["wireguard_reader_error"] == "", apply["wireguard_reader_error"]
    assert apply["wg"]["listen_port"] == 51871 and apply["wg"]["fwmark"] == 0xE00, apply["wg"]


def test_bpf_counters_account_for_the_traffic(vm):
    """The program's own per-reason counters saw the redirects, the exemption and the clamps."""
    counters = datapath(vm, "bpf")["observe_end"]["counters"]
    assert counters.get("cluster-destination", 0) > 0, counters
    assert counters.get("exempt-control-plane-port", 0) > 0, counters
    assert counters.get("mss-clamped", 0) > 0, counters
    assert counters.get("wireguard-output", 0) > 0, counters


def _filter_lines(text: str) -> list[str]:
    """The filters themselves (tc also prints a header line per priority, without a handle)."""
    return [line for line in text.splitlines() if line.startswith("filter") and " handle " in line]


def test_cilium_standin_runs_behind_nodecryptor_and_reloads_in_place(vm):
    """The Cilium stand-in (nodecryptor_testkit/lab/standin_datapath.py) attaches where Cilium
    does without tcx: a clsact egress filter at prio 2, behind nodecryptor's prio 1. A Cilium
    restart replaces its filter in place with a new program: nodecryptor's stays first, and the
    checks that ran after the reload (exemption, MTU) passed above."""
    cil = vm["cilium"]
    assert cil["start"]["ok"] and cil["start"]["tcx"] is False, cil["start"]
    assert "cil_to_netdev" in cil["tc_egress_start"], cil["tc_egress_start"]
    res = datapath(vm, "bpf")
    reload = res["cilium_reload"]
    assert reload["ok"], reload
    assert reload["prog_ids"]["cil_to_netdev"] != cil["start"]["prog_ids"]["cil_to_netdev"]
    lines = _filter_lines(res["tc_egress_after_cilium_reload"])
    assert len(lines) == 2, lines
    assert "pref 1 " in lines[0] and "nodecryptor" in lines[0], lines
    assert "pref 2 " in lines[1] and "cil_to_netdev" in lines[1], lines
    assert f"id {reload['prog_ids']['cil_to_netdev']} " in lines[1], lines
    assert res["exempt"] and res["mtu_clamped"], "checks after the reload did not run"
    assert "cil_to_netdev" not in cil["tc_egress_after_stop"], cil["tc_egress_after_stop"]
