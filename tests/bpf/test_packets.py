"""The datapath case table through the real program: BCC compile and load, diff.sync of the
desired state the policy computes from tests/datapath_cases.CLUSTER, then BPF_PROG_TEST_RUN of
every crafted packet, checking verdict, reason, return code, redirect target and counters."""

from __future__ import annotations

import dataclasses
import os

import pytest

import datapath_cases as dc
import frames
from conftest import have_bcc, require
from nodecryptor.datapath.base import VERDICT_DROP, VERDICT_ENCRYPT, VERDICT_EXEMPT
from nodecryptor.datapath.bpf import abi, program, testrun
from nodecryptor.datapath.bpf.maps import decode, diff
from nodecryptor.core.settings import Settings

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]

WG_IFINDEX = 7  # test-run never performs the redirect, so any ifindex can stand for the device
EXPECTED_RETVAL = {VERDICT_ENCRYPT: abi.TC_ACT_REDIRECT, VERDICT_DROP: abi.TC_ACT_SHOT}


@pytest.fixture(scope="module")
def loaded():
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    prog = program.load(Settings())
    yield prog
    prog.close()


def frame_for(case: dc.Case, **overrides) -> bytes:
    q, extra = case.query, case.extra
    if extra.get("ethertype"):
        return testrun.ethernet(extra["ethertype"], bytes(28))
    kwargs = dict(
        proto=q.proto,
        sport=q.sport,
        dport=q.dport,
        tcp_flags=q.tcp_flags,
        tcp_mss=extra.get("tcp_mss"),
        icmp_type=q.icmp_type,
        payload_len=extra.get("payload_len", 16),
        ipv6_ext=tuple(extra.get("ipv6_ext", ())),
        frag=extra.get("frag"),
        truncate_l4=extra.get("truncate_l4", False),
        vlan=extra.get("vlan"),
    )
    kwargs.update(overrides)
    return testrun.build_frame(dc.source_address(case), q.dst, **kwargs)


def _ones_complement_sum(data: bytes) -> int:
    """RFC 1071 sum, written here on purpose instead of using testrun's: the packets are
    built with testrun's checksum code, so grading the program's rewrite with that same code
    could hide a shared mistake."""
    if len(data) % 2:
        data += b"\0"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def independent_tcp_check(frame: bytes) -> tuple[bool, int | None]:
    """(checksums valid, MSS option) of an Ethernet frame carrying TCP, computed from the raw
    bytes alone: a segment is intact when the sum over pseudo-header and segment, checksum
    field included, is 0xFFFF; IPv4 also needs its header to sum to 0xFFFF."""
    ethertype = int.from_bytes(frame[12:14], "big")
    ip = frame[14:]
    if ethertype == 0x0800:
        ihl = (ip[0] & 0x0F) * 4
        total_length = int.from_bytes(ip[2:4], "big")
        assert ip[9] == 6, "not TCP"
        header_ok = _ones_complement_sum(ip[:ihl]) == 0xFFFF
        segment = ip[ihl:total_length]
        pseudo = ip[12:20] + b"\0\x06" + len(segment).to_bytes(2, "big")
    elif ethertype == 0x86DD:
        assert ip[6] == 6, "TCP directly after the IPv6 header expected"
        header_ok = True
        segment = ip[40 : 40 + int.from_bytes(ip[4:6], "big")]
        pseudo = ip[8:40] + len(segment).to_bytes(4, "big") + b"\0\0\0\x06"
    else:
        raise AssertionError(f"unexpected ethertype {ethertype:#06x}")
    valid = header_ok and _ones_complement_sum(pseudo + segment) == 0xFFFF
    options = segment[20 : (segment[12] >> 4) * 4]
    mss, i = None, 0
    while i < len(options) and options[i] != 0:
        if options[i] == 1:
            i += 1
            continue
        if options[i] == 2 and options[i + 1] == 4:
            mss = int.from_bytes(options[i + 2 : i + 4], "big")
        i += max(options[i + 1], 2)
    return valid, mss


def test_independent_check_sees_a_broken_checksum():
    """The check above can fail: one flipped bit in the TCP payload is caught."""
    frame = testrun.build_frame(
        "192.168.50.11", "192.168.50.12", proto="tcp", sport=1, dport=2, tcp_flags="S", tcp_mss=1460
    )
    assert independent_tcp_check(frame) == (True, 1460)
    broken = bytearray(frame)
    broken[-1] ^= 0x01
    assert independent_tcp_check(bytes(broken))[0] is False


def seed_flows(loaded, case: dc.Case) -> None:
    """For ``inbound_flow`` cases: the entry nc_ingress writes when the peer opens the
    connection (tests/bpf/test_ingress.py runs that path itself)."""
    if not case.extra.get("inbound_flow"):
        return
    from nodecryptor.datapath.bpf import syscall
    import ipaddress

    src, dst = ipaddress.ip_address(dc.source_address(case)), ipaddress.ip_address(case.query.dst)
    key = abi.FlowKey(
        family=src.version,
        protocol=testrun.PROTO_NUMBERS[case.query.proto],
        local_port=case.query.sport,
        remote_port=case.query.dport,
    )
    key.local[: len(src.packed)] = list(src.packed)
    key.remote[: len(dst.packed)] = list(dst.packed)
    syscall.map_update(loaded.map_fds["nc_flows"], key, abi.FlowVal(origin=abi.FLOW_INBOUND))


def packets(counters: dict) -> dict[str, int]:
    return {name: c["packets"] for name, c in counters.items()}


def test_table_covers_every_reason():
    reasons = {c.expected_reason for c in dc.CASES}
    assert reasons == {
        name for r, name in abi.REASON_NAMES.items() if abi.direction_of(r) == "egress"
    }
    assert len(dc.CASES) >= 40


@pytest.mark.parametrize("case", dc.CASES, ids=lambda c: c.id)
def test_case(loaded, case):
    check_case(loaded, case)


@pytest.fixture(scope="module")
def reused(tmp_path_factory):
    """The program as a restarting agent gets it: compiled once in the loader's child
    process into a private bpffs, then opened again from its pins without compiling."""
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    from nodecryptor.datapath.bpf import loader, pins

    bpffs = tmp_path_factory.mktemp("bpffs")
    require(os.system(f"mount -t bpf bpf {bpffs}") == 0, "cannot mount a bpffs")
    settings = Settings(bpffs=str(bpffs))
    try:
        pins.ensure_dirs(settings.bpffs)
        compiled = loader.obtain(settings, pins.new_generation(settings.bpffs)[1])
        compiled.loaded.close()
        got = loader.obtain(settings, pins.new_generation(settings.bpffs)[1])
        assert (compiled.reused, got.reused, got.key) == (False, True, compiled.key)
        yield got.loaded
        got.loaded.close()
    finally:
        os.system(f"umount {bpffs}")


@pytest.mark.parametrize("case", dc.CASES, ids=lambda c: c.id)
def test_case_on_reused_program(reused, case):
    """The pinned program a restart reuses is the program: every row of the table."""
    check_case(reused, case)


def check_case(loaded, case: dc.Case) -> None:
    diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
    seed_flows(loaded, case)
    before = packets(decode.read_counters(loaded.map_fds))
    runs = 1
    cb = case.extra.get("cb", ())
    if case.extra.get("first_fragment_seen"):
        first = dict(case.extra["frag"], offset=0, more=True)
        testrun.run(loaded.prog_fd, frame_for(case, frag=first), mark=case.query.mark, cb=cb)
        runs += 1
    frame = frame_for(case)
    result = testrun.run(loaded.prog_fd, frame, mark=case.query.mark, cb=cb)
    after = packets(decode.read_counters(loaded.map_fds))

    assert (result.verdict, result.reason_name) == (case.expected_verdict, case.expected_reason)
    assert result.retval == EXPECTED_RETVAL.get(case.expected_verdict, abi.TCX_NEXT)
    assert result.target == (WG_IFINDEX if case.expected_verdict == VERDICT_ENCRYPT else 0)
    delta = {name: after[name] - before[name] for name in after}
    assert delta[case.expected_reason] >= 1
    assert sum(delta[abi.REASON_NAMES[r]] for r in abi.Reason) == runs

    if "expect_mss" in case.extra:
        assert independent_tcp_check(result.data_out) == (True, case.extra["expect_mss"])
        clamped = case.extra["expect_mss"] < case.extra["tcp_mss"]
        assert delta["mss-clamped"] == (1 if clamped else 0)
    elif case.expected_verdict != VERDICT_ENCRYPT and not case.extra.get("ethertype"):
        # Nothing but a redirect may change the packet.
        assert result.data_out == frame
    if case.extra.get("vlan") and case.expected_verdict == VERDICT_ENCRYPT:
        # Popped before the redirect: WireGuard is an L3 device.
        assert result.data_out[12:14] != b"\x81\x00"
        assert frames.parse_frame(result.data_out).dst == case.query.dst


def test_more_ipv6_extension_headers_than_walked_is_malformed(loaded):
    """Seven extension headers before TCP: the program walks six, so it cannot see the
    ports and encrypts (a BPF-only case, kept out of the shared table)."""
    case = dc.CASES_BY_ID["v6-six-ext-headers-to-cp-6443"]
    diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
    six = case.extra["ipv6_ext"]
    assert testrun.run(loaded.prog_fd, frame_for(case)).reason_name == dc.R_EXEMPT_DPORT
    result = testrun.run(loaded.prog_fd, frame_for(case, ipv6_ext=six + ("dest",)))
    assert (result.reason_name, result.target) == (dc.R_MALFORMED, WG_IFINDEX)


def test_headers_beyond_the_direct_read_window(loaded):
    """A 328-byte hop-by-hop header puts TCP past the bytes the program reads directly: the
    ports then come through bpf_skb_load_bytes, with the same verdicts."""
    for case_id in ("v6-worker-to-cp-6443", "v6-worker-to-cp-2381"):
        case = dc.CASES_BY_ID[case_id]
        diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
        src = dc.source_address(case)
        tcp = testrun.tcp_segment(src, case.query.dst, case.query.sport, case.query.dport)
        options = b"\x01\xff" + bytes(255) + b"\x01\x43" + bytes(67)  # two PadN options
        hop = bytes([testrun.IPPROTO_TCP, 40]) + options  # (40 + 1) * 8 = 328 bytes
        frame = testrun.ethernet(
            testrun.ETH_P_IPV6,
            testrun.ipv6_packet(src, case.query.dst, testrun.IPPROTO_HOPOPTS, hop + tcp),
        )
        result = testrun.run(loaded.prog_fd, frame)
        assert result.reason_name == case.expected_reason, case_id


def test_counter_bytes_are_frame_length(loaded):
    case = dc.CASES_BY_ID["v4-node-to-remote-node"]
    diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
    before = decode.read_counters(loaded.map_fds)[case.expected_reason]["bytes"]
    frame = frame_for(case, payload_len=333)
    testrun.run(loaded.prog_fd, frame)
    after = decode.read_counters(loaded.map_fds)[case.expected_reason]["bytes"]
    assert after - before == len(frame)


@pytest.mark.parametrize("proto,oversize", [("udp", True), ("icmp", True), ("tcp", False)])
def test_oversize_counted_for_redirected_non_tcp(loaded, proto, oversize):
    case = dc.CASES_BY_ID["v4-node-to-remote-node"]
    desired = dc.desired_for(case, wg_ifindex=WG_IFINDEX)
    diff.sync(loaded.map_fds, desired)
    before = decode.read_counters(loaded.map_fds)["oversize"]["packets"]
    # IP header + L4 header + payload just above the largest packet WireGuard carries whole.
    big = frame_for(case, proto=proto, tcp_flags="A", payload_len=desired.max_packet_v4)
    small = frame_for(case, proto=proto, tcp_flags="A", payload_len=100)
    assert testrun.run(loaded.prog_fd, big).verdict == VERDICT_ENCRYPT
    assert testrun.run(loaded.prog_fd, small).verdict == VERDICT_ENCRYPT
    after = decode.read_counters(loaded.map_fds)["oversize"]["packets"]
    assert after - before == (1 if oversize else 0)


def test_mss_clamp_not_applied_when_disabled_by_zero(loaded):
    case = dc.CASES_BY_ID["v4-syn-mss-clamped"]
    desired = dataclasses.replace(dc.desired_for(case, wg_ifindex=WG_IFINDEX), mss_v4=0)
    diff.sync(loaded.map_fds, desired)
    result = testrun.run(loaded.prog_fd, frame_for(case))
    assert result.verdict == VERDICT_ENCRYPT
    assert frames.tcp_mss(result.data_out) == case.extra["tcp_mss"]


def test_explain_frame_matches_case_verdict(loaded):
    """packet_for_query (what `nodecryptor explain` sends) is classified like the table's
    own frames for cases a PacketQuery describes completely."""
    checked = 0
    for case in dc.CASES:
        if case.extra:
            continue
        diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
        frame = testrun.packet_for_query(case.query, dc.source_address(case))
        result = testrun.run(loaded.prog_fd, frame, mark=case.query.mark)
        assert result.reason_name == case.expected_reason, case.id
        checked += 1
    assert checked >= 30


def test_explain_program_decides_but_changes_no_state(loaded):
    """`nodecryptor explain` runs the dry-run twin (nc_explain) on the live maps: same verdict,
    no counter change, and a first fragment is not remembered (a later fragment still finds
    its first unseen)."""
    case = dc.CASES_BY_ID["v4-later-fragment-of-exempt"]
    diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
    first = frame_for(case, frag=dict(case.extra["frag"], offset=0, more=True))
    before = decode.read_counters(loaded.map_fds)
    dry = testrun.run(loaded.explain_fd, first)
    assert decode.read_counters(loaded.map_fds) == before
    assert dry.verdict == testrun.run(loaded.prog_fd, first).verdict == VERDICT_EXEMPT
    assert decode.read_counters(loaded.map_fds) != before  # the real run counted

    later = frame_for(case)
    other_id = dict(case.extra["frag"], id=0x7A7A)  # used by no other case
    testrun.run(loaded.explain_fd, frame_for(case, frag=dict(other_id, offset=0, more=True)))
    unseen = testrun.run(loaded.prog_fd, frame_for(case, frag=other_id))
    assert unseen.reason_name == "fragment-first-unseen"
    assert testrun.run(loaded.prog_fd, later).reason_name == case.expected_reason


@pytest.mark.parametrize(
    "cb",
    [(), dc.LXC_CB, dc.LXC_CB_RANDOM, (0, 0, 0x4E434452, 0, 0)],
    ids=["clean", "lxc", "random", "old-marker-only"],
)
def test_verdicts_do_not_depend_on_cb(loaded, cb):
    """Every case of the table gives the same verdict, reason and counter change whatever an
    earlier program left in skb->cb[], on both entry points (explain counts nothing)."""
    for case in dc.CASES:
        if case.extra.get("first_fragment_seen") or case.extra.get("ethertype"):
            continue
        diff.sync(loaded.map_fds, dc.desired_for(case, wg_ifindex=WG_IFINDEX))
        seed_flows(loaded, case)
        frame = frame_for(case)
        before = packets(decode.read_counters(loaded.map_fds))
        live = testrun.run(loaded.prog_fd, frame, mark=case.query.mark, cb=cb)
        counted = packets(decode.read_counters(loaded.map_fds))
        dry = testrun.run(loaded.explain_fd, frame, mark=case.query.mark, cb=cb)
        assert packets(decode.read_counters(loaded.map_fds)) == counted, case.id
        assert live.reason_name == dry.reason_name == case.expected_reason, case.id
        assert counted[case.expected_reason] - before[case.expected_reason] == 1, case.id
