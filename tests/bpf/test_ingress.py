"""The ingress program (nc_ingress, bpf/lib/ingress.h) and the flow-exact bootstrap exemption
(bpf/lib/flows.h) through BPF_PROG_TEST_RUN: the ingress packet table, the flows both programs
share, the leak meter, the dry-run twin, and LRU pressure with thousands of flows."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
from dataclasses import dataclass, field

import pytest

import datapath_cases as dc
from conftest import have_bcc, require
from nodecryptor.datapath.base import VERDICT_DROP, VERDICT_EXEMPT, VERDICT_PASS, PacketQuery
from nodecryptor.datapath.bpf import abi, program, syscall, testrun
from nodecryptor.datapath.bpf.maps import decode, diff
from nodecryptor.core.settings import Settings

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

WG_IFINDEX = 7
_P, _X, _D = VERDICT_PASS, VERDICT_EXEMPT, VERDICT_DROP
N = abi.REASON_NAMES
R = abi.Reason


@pytest.fixture(scope="module")
def loaded():
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    prog = program.load(Settings())
    yield prog
    prog.close()


@dataclass(frozen=True)
class In:
    """A packet arriving on the local node's underlay from ``src``."""

    id: str
    local: str
    src: str
    dst: str
    verdict: str
    reason: R
    mode: str = "audit"
    proto: str = "tcp"
    sport: int = 40000
    dport: int = 22
    flags: str = "S"
    extra: dict = field(default_factory=dict)


W1, W2, CP = dc.W1_V4, dc.W2_V4, dc.CP1_V4
ROWS = [
    In("peer-node-to-node-audit", "w1", W2, W1, _P, R.IN_LEAK_AUDIT),
    In("peer-node-to-node-enforce", "w1", W2, W1, _D, R.IN_LEAK_DROP, "enforce"),
    In("peer-node-to-node-off", "w1", W2, W1, _P, R.IN_LEAK_OFF, "off"),
    In("peer-pod-to-local-node-enforce", "w1", dc.W2_POD_V4, W1, _D, R.IN_LEAK_DROP, "enforce"),
    In("v6-peer-node-to-node-enforce", "w1", dc.W2_V6, dc.W1_V6, _D, R.IN_LEAK_DROP, "enforce"),
    In("peer-udp-enforce", "w1", W2, W1, _D, R.IN_LEAK_DROP, "enforce", proto="udp", dport=53),
    In("peer-icmp-enforce", "w1", W2, W1, _D, R.IN_LEAK_DROP, "enforce", proto="icmp"),
    In("outside-source", "w1", dc.OUTSIDE_V4, W1, _P, R.IN_NOT_CLUSTER, "enforce"),
    In("v6-outside-source", "w1", dc.OUTSIDE_V6, dc.W1_V6, _P, R.IN_NOT_CLUSTER, "enforce"),
    In("peer-to-foreign-destination", "w1", W2, dc.OUTSIDE_V4, _P, R.IN_NOT_CLUSTER, "enforce"),
    In("not-ip", "w1", W2, W1, _P, R.IN_NOT_CLUSTER, "enforce", extra={"ethertype": 0x0806}),
    In("disabled", "w1", W2, W1, _P, R.IN_DISABLED, "enforce", extra={"disabled": True}),
    In(
        "wireguard-port",
        "w1",
        W2,
        W1,
        _P,
        R.IN_WG_PORT,
        "enforce",
        proto="udp",
        sport=dc.WG_PORT,
        dport=dc.WG_PORT,
    ),
    In(
        "v6-nd-135",
        "w1",
        dc.W2_V6,
        dc.W1_V6,
        _P,
        R.IN_ND,
        "enforce",
        proto="icmpv6",
        extra={"icmp_type": 135},
    ),
    In("cp-serves-6443", "cp1", W1, CP, _X, R.IN_EXEMPT_REQUEST, "enforce", dport=6443),
    In(
        "cp-serves-2379-from-worker-pod",
        "cp1",
        dc.W1_POD_V4,
        CP,
        _X,
        R.IN_EXEMPT_REQUEST,
        "enforce",
        dport=2379,
    ),
    In(
        "v6-cp-serves-2380",
        "cp1",
        dc.W1_V6,
        dc.CP1_V6,
        _X,
        R.IN_EXEMPT_REQUEST,
        "enforce",
        dport=2380,
    ),
    In("cp-2381-not-exempt", "cp1", W1, CP, _D, R.IN_LEAK_DROP, "enforce", dport=2381),
    In(
        "cp-udp-6443-not-exempt",
        "cp1",
        W1,
        CP,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="udp",
        dport=6443,
    ),
    In(
        "cp-pod-6443-not-exempt",
        "cp1",
        W1,
        dc.CP1_POD_V4,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        dport=6443,
    ),
    In(
        "peer-pod-to-local-pod-enforce",
        "w1",
        dc.W2_POD_V4,
        dc.W1_POD_V4,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        dport=8080,
    ),
    In("worker-does-not-serve-6443", "w1", W2, W1, _D, R.IN_LEAK_DROP, "enforce", dport=6443),
    In(
        "reply-from-cp-without-flow",
        "w1",
        CP,
        W1,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        sport=6443,
        dport=40000,
        flags="SA",
    ),
    In(
        "reply-from-cp-with-flow",
        "w1",
        CP,
        W1,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        sport=6443,
        dport=40000,
        flags="SA",
        extra={"outbound_flow": True},
    ),
    In(
        "reply-from-worker-sport-6443",
        "w1",
        W2,
        W1,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        sport=6443,
        dport=40001,
        flags="SA",
        extra={"outbound_flow": True},
    ),
    In("truncated-l4", "w1", W2, W1, _D, R.IN_LEAK_DROP, "enforce", extra={"truncate_l4": True}),
    In(
        "later-fragment-of-exempt",
        "cp1",
        W1,
        CP,
        _X,
        R.IN_FRAG_EXEMPT,
        "enforce",
        proto="udp",
        dport=dc.WG_PORT,
        sport=dc.WG_PORT,
        extra={
            "frag": dict(offset=24, more=False, id=0x5151),
            "first_fragment_seen": True,
            "payload_len": 64,
        },
    ),
    In(
        "later-fragment-unseen",
        "cp1",
        W1,
        CP,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="udp",
        dport=dc.WG_PORT,
        extra={"frag": dict(offset=24, more=False, id=0x5252), "payload_len": 64},
    ),
    In(
        "syn-mss-clamped-audit",
        "w1",
        W2,
        W1,
        _P,
        R.IN_LEAK_AUDIT,
        extra={"tcp_mss": 1460, "expect_mss": dc.MSS_V4},
    ),
    In(
        "v6-syn-ack-mss-clamped-off",
        "w1",
        dc.W2_V6,
        dc.W1_V6,
        _P,
        R.IN_LEAK_OFF,
        "off",
        flags="SA",
        extra={"tcp_mss": 1440, "expect_mss": dc.MSS_V6},
    ),
    In(
        "syn-mss-below-limit-kept",
        "w1",
        W2,
        W1,
        _P,
        R.IN_LEAK_AUDIT,
        extra={"tcp_mss": 1200, "expect_mss": 1200},
    ),
    # Bootstrap flows a local pod opens: the pod's SYN to 6443 left exempt (egress remembered
    # the flow with the pod's address), so the control plane's reply passes in every mode.
    In(
        "pod-reply-from-cp-with-flow-enforce",
        "w1",
        CP,
        dc.W1_POD_V4,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        sport=6443,
        dport=40000,
        flags="SA",
        extra={"outbound_flow": True},
    ),
    In(
        "pod-reply-from-cp-with-flow-audit",
        "w1",
        CP,
        dc.W1_POD_V4,
        _X,
        R.IN_EXEMPT_REPLY,
        sport=2379,
        dport=40000,
        flags="SA",
        extra={"outbound_flow": True},
    ),
    In(
        "v6-pod-reply-from-cp-with-flow-enforce",
        "w1",
        dc.CP1_V6,
        dc.W1_POD_V6,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        sport=6443,
        dport=40000,
        flags="SA",
        extra={"outbound_flow": True},
    ),
    In(
        "pod-reply-from-cp-without-flow-enforce",
        "w1",
        CP,
        dc.W1_POD_V4,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        sport=6443,
        dport=40000,
        flags="SA",
    ),
    In(
        "pod-reply-from-cp-pod-with-flow-enforce",
        "w1",
        dc.CP1_POD_V4,
        dc.W1_POD_V4,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        sport=6443,
        dport=40000,
        flags="SA",
        extra={"outbound_flow": True},
    ),
    # ICMP errors quoting an exempt flow (``icmp_error``: type, code and the quoted packet's
    # source, destination and ports; ``flow``: the nc_flows entry seeded first).
    In(
        "frag-needed-quoting-node-flow-enforce",
        "w1",
        CP,
        W1,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        proto="icmp",
        extra={"icmp_error": (3, 4, W1, CP, 40000, 6443), "flow": ("out", W1, 40000, CP, 6443)},
    ),
    In(
        "port-unreachable-quoting-pod-flow-enforce",
        "w1",
        CP,
        dc.W1_POD_V4,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        proto="icmp",
        extra={
            "icmp_error": (3, 3, dc.W1_POD_V4, CP, 40000, 2379),
            "flow": ("out", dc.W1_POD_V4, 40000, CP, 2379),
        },
    ),
    In(
        "v6-packet-too-big-quoting-flow-enforce",
        "w1",
        dc.CP1_V6,
        dc.W1_V6,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        proto="icmpv6",
        extra={
            "icmp_error": (2, 0, dc.W1_V6, dc.CP1_V6, 40000, 6443),
            "flow": ("out", dc.W1_V6, 40000, dc.CP1_V6, 6443),
        },
    ),
    In(
        "cp-frag-needed-quoting-its-reply-enforce",
        "cp1",
        W1,
        CP,
        _X,
        R.IN_EXEMPT_REPLY,
        "enforce",
        proto="icmp",
        extra={"icmp_error": (3, 4, CP, W1, 6443, 41000), "flow": ("in", CP, 6443, W1, 41000)},
    ),
    In(
        "frag-needed-quoting-unknown-flow-enforce",
        "w1",
        CP,
        W1,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="icmp",
        extra={"icmp_error": (3, 4, W1, CP, 40001, 6443), "flow": ("out", W1, 40000, CP, 6443)},
    ),
    In(
        "frag-needed-quoting-another-local-end",
        "w1",
        CP,
        W1,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="icmp",
        extra={
            "icmp_error": (3, 4, dc.W1_POD_V4, CP, 40000, 6443),
            "flow": ("out", dc.W1_POD_V4, 40000, CP, 6443),
        },
    ),
    In(
        "echo-reply-carrying-a-quote",
        "w1",
        CP,
        W1,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="icmp",
        extra={"icmp_error": (0, 0, W1, CP, 40000, 6443), "flow": ("out", W1, 40000, CP, 6443)},
    ),
    In(
        "v6-packet-too-big-quote-with-ext-header",
        "w1",
        dc.CP1_V6,
        dc.W1_V6,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="icmpv6",
        extra={
            "icmp_error": (2, 0, dc.W1_V6, dc.CP1_V6, 40000, 6443),
            "quote_ext": ("dest",),
            "flow": ("out", dc.W1_V6, 40000, dc.CP1_V6, 6443),
        },
    ),
    # The WireGuard port is the node's: clear UDP to a local pod on 51871 is clear text.
    In(
        "udp-51871-to-local-pod-enforce",
        "w1",
        W2,
        dc.W1_POD_V4,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        proto="udp",
        sport=dc.WG_PORT,
        dport=dc.WG_PORT,
    ),
    In(
        "udp-51871-to-local-pod-audit",
        "w1",
        dc.W2_POD_V4,
        dc.W1_POD_V4,
        _P,
        R.IN_LEAK_AUDIT,
        proto="udp",
        sport=40000,
        dport=dc.WG_PORT,
    ),
    # The extension-header chains egress walks (six) are walked on ingress too; a longer
    # chain hides the ports from both, and both fail closed (test_ext_chain_limit_agrees).
    In(
        "v6-cp-serves-6443-six-ext-headers",
        "cp1",
        dc.W1_V6,
        dc.CP1_V6,
        _X,
        R.IN_EXEMPT_REQUEST,
        "enforce",
        dport=6443,
        extra={"ipv6_ext": dc.SIX_EXT},
    ),
    In(
        "v6-cp-6443-seven-ext-headers-enforce",
        "cp1",
        dc.W1_V6,
        dc.CP1_V6,
        _D,
        R.IN_LEAK_DROP,
        "enforce",
        dport=6443,
        extra={"ipv6_ext": dc.SIX_EXT + ("dest",)},
    ),
]


def desired_for(row: In):
    case = dc.Case(
        id=row.id,
        local_node=row.local,
        query=PacketQuery(dst=row.dst, src=row.dst, proto=row.proto),
        expected_verdict="",
        expected_reason="",
        extra={"disabled": True} if row.extra.get("disabled") else {},
    )
    desired = dc.desired_for(case, wg_ifindex=WG_IFINDEX)
    return dataclasses.replace(desired, ingress_enforcement=row.mode)


def icmp_error_frame(
    src: str,
    dst: str,
    icmp_type: int,
    code: int,
    quoted_src: str,
    quoted_dst: str,
    sport: int,
    dport: int,
    quote_ext=(),
) -> bytes:
    """An ICMP(v6) message from ``src`` to ``dst`` quoting a TCP segment quoted_src:sport ->
    quoted_dst:dport, as a router or host sends it: the IP header and the first 8 bytes of
    the TCP header (IPv4, RFC 792), or as much of the packet as fits (IPv6)."""
    _, segment = testrun.l4_payload(quoted_src, quoted_dst, "tcp", sport, dport, "S")
    if ipaddress.ip_address(src).version == 4:
        quote = testrun.ipv4_packet(
            quoted_src, quoted_dst, testrun.IPPROTO_TCP, segment, total_length=20 + 1400
        )[:28]
        message = testrun.icmp_message(icmp_type, code, quote)
        return testrun.ethernet(
            testrun.ETH_P_IP, testrun.ipv4_packet(src, dst, testrun.IPPROTO_ICMP, message)
        )
    quote = testrun.ipv6_packet(
        quoted_src, quoted_dst, testrun.IPPROTO_TCP, segment, tuple(quote_ext)
    )
    message = testrun.icmpv6_message(src, dst, icmp_type, code, quote)
    return testrun.ethernet(
        testrun.ETH_P_IPV6, testrun.ipv6_packet(src, dst, testrun.IPPROTO_ICMPV6, message)
    )


def frame(row: In, **over) -> bytes:
    if row.extra.get("ethertype"):
        return testrun.ethernet(row.extra["ethertype"], bytes(28))
    if "icmp_error" in row.extra:
        return icmp_error_frame(
            row.src, row.dst, *row.extra["icmp_error"], quote_ext=row.extra.get("quote_ext", ())
        )
    kw = dict(
        proto=row.proto,
        sport=row.sport,
        dport=row.dport,
        tcp_flags=row.flags,
        tcp_mss=row.extra.get("tcp_mss"),
        icmp_type=row.extra.get("icmp_type", 8),
        payload_len=row.extra.get("payload_len", 16),
        frag=row.extra.get("frag"),
        truncate_l4=row.extra.get("truncate_l4", False),
        ipv6_ext=tuple(row.extra.get("ipv6_ext", ())),
    )
    kw.update(over)
    return testrun.build_frame(row.src, row.dst, **kw)


def flow_key(family, proto, local, lport, remote, rport) -> abi.FlowKey:
    key = abi.FlowKey(family=family, protocol=proto, local_port=lport, remote_port=rport)
    key.local[: len(local)] = list(local)
    key.remote[: len(remote)] = list(remote)
    return key


def seed_outbound(loaded, row: In) -> None:
    src, dst = ipaddress.ip_address(row.src), ipaddress.ip_address(row.dst)
    key = flow_key(
        dst.version, testrun.PROTO_NUMBERS[row.proto], dst.packed, row.dport, src.packed, row.sport
    )
    syscall.map_update(loaded.map_fds["nc_flows"], key, abi.FlowVal(origin=abi.FLOW_OUTBOUND))


def seed_flow(loaded, origin: str, local: str, lport: int, remote: str, rport: int) -> None:
    """An nc_flows entry as egress (``out``) or nc_ingress (``in``) would have written it."""
    local_ip, remote_ip = ipaddress.ip_address(local), ipaddress.ip_address(remote)
    key = flow_key(
        local_ip.version, testrun.IPPROTO_TCP, local_ip.packed, lport, remote_ip.packed, rport
    )
    value = abi.FlowVal(origin=abi.FLOW_OUTBOUND if origin == "out" else abi.FLOW_INBOUND)
    syscall.map_update(loaded.map_fds["nc_flows"], key, value)


def packets(loaded) -> dict[str, int]:
    return {k: v["packets"] for k, v in decode.read_counters(loaded.map_fds).items()}


def flows(loaded) -> dict[bytes, int]:
    spec = abi.MAPS_BY_NAME["nc_flows"]
    return {
        bytes(k): v.origin
        for k, v in syscall.map_items(loaded.map_fds["nc_flows"], spec.key, spec.value)
    }


def leaks(loaded) -> dict[bytes, int]:
    spec = abi.MAPS_BY_NAME["nc_leaks"]
    return {
        bytes(k): v.packets
        for k, v in syscall.map_items(loaded.map_fds["nc_leaks"], spec.key, spec.value)
    }


def clear_lru(loaded, name: str) -> None:
    spec = abi.MAPS_BY_NAME[name]
    for key in list(syscall.map_keys(loaded.map_fds[name], spec.key)):
        syscall.map_delete(loaded.map_fds[name], key)


def test_table_covers_every_ingress_reason():
    assert {r.reason for r in ROWS} == set(abi.INGRESS_REASONS)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_ingress_row(loaded, row):
    diff.sync(loaded.map_fds, desired_for(row))
    clear_lru(loaded, "nc_flows")
    if row.extra.get("outbound_flow"):
        seed_outbound(loaded, row)
    if "flow" in row.extra:
        seed_flow(loaded, *row.extra["flow"])
    runs = 1
    if row.extra.get("first_fragment_seen"):
        testrun.run(
            loaded.ingress_fd, frame(row, frag=dict(row.extra["frag"], offset=0, more=True))
        )
        runs += 1
    pkt = frame(row)
    before, leaks_before = packets(loaded), leaks(loaded)
    dry = testrun.run(loaded.explain_ingress_fd, pkt)
    assert packets(loaded) == before and leaks(loaded) == leaks_before, "the twin wrote"
    result = testrun.run(loaded.ingress_fd, pkt)
    after = packets(loaded)
    assert (result.verdict, result.reason) == (row.verdict, row.reason)
    assert dry.reason == row.reason
    assert result.retval == (abi.TC_ACT_SHOT if row.verdict == _D else abi.TCX_NEXT)
    assert result.target == 0
    delta = {k: after[k] - before[k] for k in after}
    assert delta[N[row.reason]] == 1
    assert sum(delta[N[r]] for r in abi.Reason) == 1
    metered = row.reason in (R.IN_LEAK_AUDIT, R.IN_LEAK_DROP)
    assert (sum(leaks(loaded).values()) - sum(leaks_before.values())) == (1 if metered else 0)
    if "expect_mss" in row.extra:
        from test_packets import independent_tcp_check

        assert independent_tcp_check(result.data_out) == (True, row.extra["expect_mss"])
        clamped = row.extra["expect_mss"] < row.extra["tcp_mss"]
        assert delta["ingress-mss-clamped"] == (1 if clamped else 0)
    elif not row.extra.get("ethertype"):
        assert result.data_out == pkt  # nothing else rewrites an ingress packet
    if row.reason == R.IN_EXEMPT_REQUEST:
        assert abi.FLOW_INBOUND in flows(loaded).values()


def _egress(loaded, src, dst, sport, dport, flags="A"):
    return testrun.run(
        loaded.prog_fd, testrun.build_frame(src, dst, sport=sport, dport=dport, tcp_flags=flags)
    )


def _ingress(loaded, src, dst, sport, dport, flags="A"):
    return testrun.run(
        loaded.ingress_fd, testrun.build_frame(src, dst, sport=sport, dport=dport, tcp_flags=flags)
    )


def _sync(loaded, local, mode="enforce"):
    row = In("x", local, W1, W1, _P, R.IN_LEAK_AUDIT, mode)
    diff.sync(loaded.map_fds, desired_for(row))
    clear_lru(loaded, "nc_flows")


def test_control_plane_replies_only_to_flows_a_peer_opened(loaded):
    """Source port 6443 alone no longer leaves in the clear."""
    _sync(loaded, "cp1")
    before = packets(loaded)
    # A local process with source port 6443 to a worker's ssh and to a worker pod: encrypted.
    assert _egress(loaded, CP, W1, 6443, 22, "S").reason == R.ENCRYPT
    assert _egress(loaded, CP, dc.W1_POD_V4, 6443, 8080, "S").reason == R.ENCRYPT
    assert _egress(loaded, CP, W1, 6443, 41000, "SA").reason == R.ENCRYPT
    assert packets(loaded)["exempt-reply-without-flow"] - before["exempt-reply-without-flow"] == 3
    # The worker opens 6443: the request is exempt on ingress, the reply exempt on egress.
    assert _ingress(loaded, W1, CP, 41000, 6443, "S").reason == R.IN_EXEMPT_REQUEST
    assert _egress(loaded, CP, W1, 6443, 41000, "SA").reason == R.EXEMPT_SPORT
    # ... for that flow only: another client port of the same worker is encrypted.
    assert _egress(loaded, CP, W1, 6443, 41001, "SA").reason == R.ENCRYPT
    assert packets(loaded)["exempt-flow-added"] - before["exempt-flow-added"] == 1
    # The dry-run twin answers from the flow table but adds no flow.
    dry = testrun.run(
        loaded.explain_ingress_fd, testrun.build_frame(W2, CP, sport=42000, dport=2379)
    )
    assert dry.reason == R.IN_EXEMPT_REQUEST and len(flows(loaded)) == 1


def test_worker_accepts_replies_only_to_flows_it_opened(loaded):
    _sync(loaded, "w1")
    assert _ingress(loaded, CP, W1, 6443, 43000, "SA").reason == R.IN_LEAK_DROP
    assert _egress(loaded, W1, CP, 43000, 6443, "S").reason == R.EXEMPT_DPORT
    assert _ingress(loaded, CP, W1, 6443, 43000, "SA").reason == R.IN_EXEMPT_REPLY
    assert _ingress(loaded, CP, W1, 6443, 43001, "SA").reason == R.IN_LEAK_DROP
    # A worker pretending to be the control plane's reply is not a control-plane node.
    assert _ingress(loaded, W2, W1, 6443, 43000, "SA").reason == R.IN_LEAK_DROP


def test_leak_meter_keys_source_port_protocol(loaded):
    _sync(loaded, "w1", "audit")
    clear_lru(loaded, "nc_leaks")
    for _ in range(3):
        _ingress(loaded, W2, W1, 40000, 22, "S")
    _ingress(loaded, W2, W1, 40000, 80, "S")
    spec = abi.MAPS_BY_NAME["nc_leaks"]
    got = {
        (str(ipaddress.ip_address(bytes(k.src)[:4])), k.dport, k.protocol): v.packets
        for k, v in syscall.map_items(loaded.map_fds["nc_leaks"], spec.key, spec.value)
    }
    assert got == {(W2, 22, 6): 3, (W2, 80, 6): 1}
    # off: passed, not metered.
    _sync(loaded, "w1", "off")
    _ingress(loaded, W2, W1, 40000, 23, "S")
    assert len(leaks(loaded)) == 2


def test_flow_lru_under_pressure(loaded):
    """More exempt flows than nc_flows holds (65,536): the LRU evicts, the evictions are
    measurable (flows added minus flows held), an evicted long-lived connection's replies are
    encrypted (never leaked), and the peer's next packet restores the entry."""
    _sync(loaded, "cp1")
    before = packets(loaded)["exempt-flow-added"]
    assert _ingress(loaded, W1, CP, 50000, 2379, "S").reason == R.IN_EXEMPT_REQUEST
    extra = abi.FLOWS_MAX + 4096
    peers = [str(ipaddress.ip_address(0x0A_F4_01_00) + i) for i in range(256)]  # w1's pods
    for i in range(extra):
        pkt = testrun.build_frame(peers[i % 256], CP, sport=1024 + i // 256, dport=6443)
        assert testrun.run(loaded.ingress_fd, pkt).reason == R.IN_EXEMPT_REQUEST
    added = packets(loaded)["exempt-flow-added"] - before
    held = len(flows(loaded))
    assert added == extra + 1
    assert held <= abi.FLOWS_MAX
    evicted = added - held
    assert evicted >= extra + 1 - abi.FLOWS_MAX
    print(f"\nflows added {added}, held {held}, evicted {evicted}")
    reply = _egress(loaded, CP, W1, 2379, 50000)
    if reply.reason == R.ENCRYPT:  # evicted: encrypted, not leaked ...
        assert _ingress(loaded, W1, CP, 50000, 2379).reason == R.IN_EXEMPT_REQUEST
    # ... and after the peer's next packet the reply is exempt again.
    assert _egress(loaded, CP, W1, 2379, 50000).reason == R.EXEMPT_SPORT


@pytest.mark.parametrize("mode", ["audit", "enforce"])
@pytest.mark.parametrize(
    "pod,cp", [(dc.W1_POD_V4, CP), (dc.W1_POD_V6, dc.CP1_V6)], ids=["v4", "v6"]
)
def test_pod_bootstrap_flow_end_to_end(loaded, mode, pod, cp):
    """A local pod's connection to the API server: egress lets the SYN out in the clear and
    remembers the flow with the pod's address; the control plane's SYN-ACK and an ICMP error
    about the flow come back in the clear and pass, unmetered, in audit and in enforce."""
    _sync(loaded, "w1", mode)
    clear_lru(loaded, "nc_leaks")
    assert _egress(loaded, pod, cp, 44000, 6443, "S").reason == R.EXEMPT_DPORT
    family = ipaddress.ip_address(pod).version
    want = bytes(
        flow_key(
            family,
            testrun.IPPROTO_TCP,
            ipaddress.ip_address(pod).packed,
            44000,
            ipaddress.ip_address(cp).packed,
            6443,
        )
    )
    assert flows(loaded) == {want: abi.FLOW_OUTBOUND}
    assert _ingress(loaded, cp, pod, 6443, 44000, "SA").reason == R.IN_EXEMPT_REPLY
    too_big = (3, 4) if family == 4 else (2, 0)
    error = icmp_error_frame(cp, pod, *too_big, pod, cp, 44000, 6443)
    assert testrun.run(loaded.ingress_fd, error).reason == R.IN_EXEMPT_REPLY
    assert leaks(loaded) == {}
    # Another port of the same pod has no flow: clear text, judged by the mode.
    leak = R.IN_LEAK_DROP if mode == "enforce" else R.IN_LEAK_AUDIT
    assert _ingress(loaded, cp, pod, 6443, 44001, "SA").reason == leak
    other = icmp_error_frame(cp, pod, *too_big, pod, cp, 44001, 6443)
    assert testrun.run(loaded.ingress_fd, other).reason == leak
    assert sum(leaks(loaded).values()) == 2


@pytest.mark.parametrize(
    "chain,exempt", [(dc.SIX_EXT, True), (dc.SIX_EXT + ("dest",), False)], ids=["six", "seven"]
)
def test_ext_chain_limit_agrees(loaded, chain, exempt):
    """Both directions walk the same IPv6 extension-header chains: the longest one egress
    parses is exempt on both sides; one header more hides the ports from both, and both fail
    closed (egress encrypts it as malformed, ingress treats it as clear text)."""

    def run(prog_fd, src, dst):
        pkt = testrun.build_frame(src, dst, sport=45000, dport=6443, ipv6_ext=chain)
        return testrun.run(prog_fd, pkt)

    _sync(loaded, "w1")
    out = run(loaded.prog_fd, dc.W1_V6, dc.CP1_V6)
    _sync(loaded, "cp1")
    into = run(loaded.ingress_fd, dc.W1_V6, dc.CP1_V6)
    if exempt:
        assert (out.reason, into.reason) == (R.EXEMPT_DPORT, R.IN_EXEMPT_REQUEST)
    else:
        assert (out.reason, out.target) == (R.MALFORMED, WG_IFINDEX)
        assert (into.reason, into.retval) == (R.IN_LEAK_DROP, abi.TC_ACT_SHOT)
