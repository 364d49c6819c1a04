"""program.load and diff.sync/read against the kernel: idempotent sync, add-before-prune,
decoding back into the desired state, pinned maps surviving a reload, clear errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import random

import pytest

import datapath_cases as dc
from conftest import have_bcc, require
from nodecryptor.datapath.bpf import abi, program, syscall, testrun
from nodecryptor.datapath.bpf.maps import decode, diff, encode, pinned
from nodecryptor.core.errors import DatapathError
from nodecryptor.core.model import KIND_POD_CIDR, Destination
from nodecryptor.core.settings import MapSizes, Settings

pytestmark = [pytest.mark.privileged, pytest.mark.bpf]


@pytest.fixture(scope="module")
def loaded():
    require(os.geteuid() == 0, "needs root")
    ok, why = have_bcc()
    require(ok, why)
    prog = program.load(Settings())
    yield prog
    prog.close()


def _clear(map_fds):
    for name in (
        "nc_dst_v4",
        "nc_dst_v6",
        "nc_dst_lpm_v4",
        "nc_dst_lpm_v6",
        "nc_local",
        "nc_pods_v4",
        "nc_pods_v6",
    ):
        spec = abi.MAPS_BY_NAME[name]
        for key in list(syscall.map_keys(map_fds[name], spec.key)):
            syscall.map_delete(map_fds[name], key)


def test_sync_is_idempotent_and_prunes(loaded):
    _clear(loaded.map_fds)
    worker = dc.desired_for(dc.CASES_BY_ID["v4-node-to-remote-node"])  # local node w1
    first = diff.sync(loaded.map_fds, worker, now_ns=1)
    # 8 destinations (cp1 and w2: node IP + pod CIDR, both families), 2 addresses,
    # 2 local pod CIDRs whose pod-to-pod traffic is Cilium's (nc_pods_v4/v6)
    assert (first.added, first.removed) == (8 + 2 + 2, 0)
    assert diff.sync(loaded.map_fds, worker, now_ns=2) == diff.SyncStats(0, 0, 0)

    cp = dc.desired_for(dc.CASES_BY_ID["v4-cp-reply-6443-from-node-ip"])  # local node cp1
    switched = diff.sync(loaded.map_fds, cp, now_ns=3)
    # w1's four prefixes, addresses and local pod CIDRs replace cp1's; w2's prefixes stay.
    assert (switched.added, switched.removed) == (4 + 2 + 2, 4 + 2 + 2)
    assert decode.read(loaded.map_fds)["cilium_pod_cidrs"] == ["10.244.0.0/24", "fd00:244::/64"]
    # The config entry (role changed), the exempt ranges (cp1 does not use the "storage"
    # policy), and w2's four prefixes, whose policy masks change: w1 used w2's storage port,
    # cp1 serves the built-in policy to w2.
    assert switched.updated == 1 + 1 + 4


def test_read_decodes_the_desired_state(loaded):
    desired = dc.desired_for(dc.CASES_BY_ID["v4-uncovered-fail-closed"])
    diff.sync(loaded.map_fds, desired, now_ns=12345)
    data = decode.read(loaded.map_fds)
    by_prefix = {d["prefix"]: d for d in data["destinations"]}
    assert set(by_prefix) == {str(d.prefix) for d in desired.destinations}
    for dest in desired.destinations:
        entry = by_prefix[str(dest.prefix)]
        assert entry["kind"] == dest.kind
        assert entry["control_plane"] == dest.control_plane
        assert entry["uncovered"] == (dest.prefix in desired.uncovered)
    assert [(r["protocol"], r["first"], r["last"]) for r in data["exempt_ports"]] == [
        (r.protocol, r.first, r.last) for r in encode.policy_ranges(desired)
    ]
    bits = encode.policy_bits(desired)
    assert [desired.plan.policies[r["policy_bit"]] for r in data["exempt_ports"]] == [
        r.policy for r in encode.policy_ranges(desired)
    ]
    for dest in desired.destinations:
        entry = by_prefix[str(dest.prefix)]
        assert entry["serves_mask"] == sum({1 << bits[r.policy] for r in dest.exempt_ports})
        assert entry["clients_mask"] == sum(1 << bits[n] for n in dest.client_of)
    assert data["local_addresses"] == [str(a) for a in desired.plan.local_addresses]
    cfg = data["config"]
    assert cfg["enabled"] and cfg["wg_up"]
    assert (cfg["wg_ifindex"], cfg["local_role"], cfg["fail_mode"]) == (7, "worker", "closed")
    assert (cfg["mss_v4"], cfg["mss_v6"], cfg["wg_port"]) == (dc.MSS_V4, dc.MSS_V6, dc.WG_PORT)
    assert (cfg["wg_mark"], cfg["wg_mark_mask"]) == (0x0E00, 0x0F00)
    assert cfg["agent_alive_ns"] == 12345
    assert set(data["counters"]) == set(abi.REASON_NAMES.values()) | set(abi.EVENT_NAMES.values())


def test_new_destination_is_added_before_stale_one_is_removed(loaded, monkeypatch):
    """A node's address moving to another prefix is never a moment without either."""
    base = dc.desired_for(dc.CASES_BY_ID["v4-node-to-remote-node"])
    diff.sync(loaded.map_fds, base)
    moved = dataclasses.replace(
        base,
        plan=dataclasses.replace(
            base.plan,
            destinations=tuple(
                dataclasses.replace(d, prefix=ipaddress.ip_network("10.244.9.0/24"))
                if str(d.prefix) == "10.244.2.0/24"
                else d
                for d in base.plan.destinations
            ),
        ),
    )
    calls = []
    real_update, real_delete = syscall.map_update, syscall.map_delete
    monkeypatch.setattr(
        syscall,
        "map_update",
        lambda fd, k, v, flags=0: (calls.append("update"), real_update(fd, k, v, flags))[1],
    )
    monkeypatch.setattr(
        syscall, "map_delete", lambda fd, k: (calls.append("delete"), real_delete(fd, k))[1]
    )
    stats = diff.sync(loaded.map_fds, moved)
    assert (stats.added, stats.removed) == (1, 1)
    # destination update, the config entry, then the stale delete (the summary bits did not
    # change: both prefixes are in 10.244.0.0/16)
    assert calls == ["update", "update", "delete"]


def test_full_map_names_the_problem(bcc_settings_small):
    loaded = program.load(bcc_settings_small)
    try:
        desired = dc.desired_for(dc.CASES_BY_ID["v4-node-to-remote-node"])
        with pytest.raises(
            diff.CapacityError, match="IPv4 destinations: 4 entries needed .* capacity 2"
        ):
            diff.sync(loaded.map_fds, desired)
        # refused before any write: the program still has no configuration
        assert decode.read(loaded.map_fds)["destinations"] == []
        assert not decode.read_config(loaded.map_fds)["enabled"]
    finally:
        loaded.close()


@pytest.fixture
def bcc_settings_small(loaded):
    # Two IPv4 destinations fit, the worker's desired state has four.
    return Settings(map_sizes=MapSizes(destinations_v4=2))


def test_pinned_maps_survive_a_reload(loaded, bpffs):
    pin_dir = os.path.join(bpffs, "v1")
    os.mkdir(pin_dir)
    case = dc.CASES_BY_ID["v4-node-to-remote-node"]
    first = program.load(Settings(), pin_dir)
    try:
        diff.sync(first.map_fds, dc.desired_for(case))
        ids = {name: syscall.map_info(fd).id for name, fd in first.map_fds.items()}
        frame = testrun.build_frame(dc.source_address(case), case.query.dst, dport=22)
    finally:
        first.close()
    assert sorted(os.listdir(pin_dir)) == sorted(abi.MAPS_BY_NAME)

    second = program.load(Settings(), pin_dir)
    try:
        assert {name: syscall.map_info(fd).id for name, fd in second.map_fds.items()} == ids
        # No sync: the new program enforces with the state the pinned maps kept.
        result = testrun.run(second.prog_fd, frame)
        assert result.reason_name == case.expected_reason
        with pinned.open_pinned(pin_dir) as opened:
            assert (
                decode.read(opened)["destinations"] == decode.read(second.map_fds)["destinations"]
            )
            held = list(opened.values())
        assert all(obj.closed for obj in held)  # leaving the block closed every map
    finally:
        second.close()


def test_open_pinned_names_the_missing_pin(tmp_path):
    with pytest.raises(DatapathError, match="nc_dst_v4"):
        pinned.open_pinned(str(tmp_path))


def test_verifier_work_stays_far_below_its_limit(loaded):
    """The lookup loops are walked by the verifier once per slot for every state reaching
    them; the kernel gives up at 1,000,000 instructions (older kernels prune less). Keep a
    wide margin so a small change cannot make the program unloadable."""
    for fd in (loaded.prog_fd, loaded.explain_fd):
        assert 0 < syscall.prog_verified_insns(fd) < 400_000


def test_probe_reports_success(loaded):
    ok, why = program.probe(Settings())
    assert ok, why


def test_probe_reports_a_compile_failure(loaded, tmp_path, monkeypatch):
    broken = tmp_path / "bpf"
    (broken / "include").mkdir(parents=True)
    (broken / "lib").mkdir()
    (broken / "nodecryptor.c").write_text("int nc_egress(struct __sk_buff *skb) { return x; }\n")
    monkeypatch.setattr(program, "bpf_dir", lambda: broken)
    ok, why = program.probe(Settings())
    assert not ok
    assert "compiling" in why


def test_load_error_names_the_verifiers_reason(loaded, tmp_path, monkeypatch, capfd):
    """libbcc raises only EACCES on a rejection; the error carries the end of the verifier's
    log (the rejected instruction and why), and the log still reaches stderr."""
    broken = tmp_path / "bpf"
    (broken / "include").mkdir(parents=True)
    (broken / "lib").mkdir()
    (broken / "nodecryptor.c").write_text(
        "int nc_egress(struct __sk_buff *skb) { return *(int *)(long)skb->data; }\n"
    )
    monkeypatch.setattr(program, "bpf_dir", lambda: broken)
    with pytest.raises(DatapathError) as info:
        program.load(Settings())
    message = str(info.value)
    assert "loading nc_egress failed" in message
    assert "verifier: " in message and "invalid access to packet" in message, message
    assert "invalid access to packet" in capfd.readouterr().err


def _random_destinations(rng: random.Random, family: int, count: int):
    """Prefixes of many lengths, some nested in others (so the longest match matters)."""
    bits = 32 if family == 4 else 128
    # IPv6: more distinct lengths than hash slots, so the shortest go to the LPM trie.
    lengths = (
        [bits, bits, 24, 16, 20, 28, 1, 9]
        if family == 4
        else [
            bits,
            bits,
            64,
            48,
            56,
            80,
            112,
            17,
            31,
            33,
            40,
            44,
            52,
            60,
            68,
            72,
            76,
            88,
            96,
            100,
            104,
            120,
        ]
    )
    prefixes = set()
    while len(prefixes) < count:
        plen = rng.choice(lengths)
        if prefixes and rng.random() < 0.4:  # nest inside an existing prefix
            outer = rng.choice(sorted(prefixes, key=str))
            if outer.prefixlen < bits:
                plen = rng.randint(outer.prefixlen + 1, bits)
                addr = int(outer.network_address) | rng.getrandbits(bits - outer.prefixlen)
                prefixes.add(ipaddress.ip_network((addr, plen), strict=False))
                continue
        addr = rng.getrandbits(bits)
        prefixes.add(ipaddress.ip_network((addr, plen), strict=False))
    return sorted(prefixes, key=lambda p: (p.prefixlen, int(p.network_address)))


def test_lookup_is_longest_prefix_match_through_filters_and_hashes(loaded):
    """Random destination sets of many prefix lengths, nested: every probe address gets the
    value of its longest matching prefix (made visible by the uncovered flag, which turns
    encrypt into drop), and addresses outside every prefix are not cluster destinations. This
    checks the summary and bloom filters (computed in Python, read in C), the masking and the
    longest-first order together."""
    rng = random.Random(2026)
    base = dc.desired_for(dc.CASES_BY_ID["v4-node-to-remote-node"], wg_ifindex=7)
    for family in (4, 6):
        prefixes = _random_destinations(rng, family, 300)
        uncovered = frozenset(p for p in prefixes if rng.random() < 0.5)
        dests = tuple(Destination(p, "n", KIND_POD_CIDR, False) for p in prefixes)
        desired = dataclasses.replace(
            base,
            uncovered=uncovered,
            plan=dataclasses.replace(base.plan, destinations=dests, exempt_ports=()),
        )
        diff.sync(loaded.map_fds, desired)
        lengths = {p.prefixlen for p in prefixes}
        assert decode.read_config(loaded.map_fds)["lpm"][f"v{family}"] == (
            len(lengths) > abi.PLEN_SLOTS
        )
        src = "192.0.2.1" if family == 4 else "2001:db8:ffff::1"
        probes = []
        for p in rng.sample(prefixes, 150):
            host_bits = p.max_prefixlen - p.prefixlen
            probes.append(
                ipaddress.ip_address(
                    int(p.network_address) | (rng.getrandbits(host_bits) if host_bits else 0)
                )
            )
        probes += [ipaddress.ip_address(rng.getrandbits(p.max_prefixlen)) for p in prefixes[:150]]
        wrong = []
        for addr in probes:
            matches = [p for p in prefixes if addr in p]
            if not matches:
                want = "not-cluster-destination"
            else:
                longest = max(matches, key=lambda p: p.prefixlen)
                want = (
                    "no-peer-covers-fail-closed" if longest in uncovered else "cluster-destination"
                )
            got = testrun.run(
                loaded.prog_fd, testrun.build_frame(src, str(addr), dport=9)
            ).reason_name
            if got != want:
                wrong.append((str(addr), want, got))
        assert wrong == [], f"IPv{family}: {wrong[:5]}"
