"""Attach, pins, cleanup and the counters collector against the real kernel, with tiny raw
programs (no compiler): tcx at the head with a foreign program present, in-place program swap,
a defunct link after the device is re-created, the legacy clsact filter and its shadowing,
map-shape checks of pins, and that cleanup never touches foreign programs or filters."""

from __future__ import annotations

import ctypes
import os
import stat

import pytest
from bpf_backend_lab import in_netns, load_ret_prog, prog_id, sh
from conftest import require
from prometheus_client import CollectorRegistry

from nodecryptor.datapath.bpf import abi, attach, collector, inspect, pins, syscall
from nodecryptor.core.settings import Settings

pytestmark = pytest.mark.privileged

TCX_NEXT = -1
TC_ACT_OK = 0
CBPF_ACCEPT = "1,6 0 0 4294967295,"  # classic BPF "ret #-1": a foreign, non-nodecryptor filter


@pytest.fixture
def veth_ns(netns):
    """A namespace with an up veth pair eth0/peer0."""
    ns = netns("att")
    sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0", netns=ns)
    sh("ip", "link", "set", "eth0", "up", netns=ns)
    sh("ip", "link", "set", "peer0", "up", netns=ns)
    return ns


@pytest.fixture
def progs():
    fds = []

    def make(retval, name="nc_test_ret"):
        fd = load_ret_prog(retval, name)
        fds.append(fd)
        return fd

    yield make
    for fd in fds:
        fd.close()


@pytest.fixture
def tcx(root):
    ok, why = syscall.tcx_supported()
    require(ok, f"kernel without tcx: {why}")


def test_tcx_attach_goes_to_head_swaps_in_place_and_survives_device_recreation(
    veth_ns, bpffs, progs, tcx
):
    pins.ensure_dirs(bpffs)
    foreign = progs(TC_ACT_OK, "foreign_ok")
    ours1, ours2, ours3 = progs(TCX_NEXT, "nc_v1"), progs(TCX_NEXT, "nc_v2"), progs(TCX_NEXT)
    with in_netns(veth_ns):
        ifindex = attach.ifindex_of("eth0")
        foreign_link = syscall.tcx_link_create(foreign, ifindex, flags=0)  # appended
        try:
            att = attach.tcx_attach(bpffs, "eth0", ours1)
            assert (att.position, att.prog_id, att.defunct, att.shadowed_by) == (
                0,
                prog_id(ours1),
                False,
                "",
            )
            chain = attach.query(ifindex)["tcx"]
            assert [c["prog_id"] for c in chain] == [prog_id(ours1), prog_id(foreign)]

            again = attach.tcx_attach(bpffs, "eth0", ours2)
            assert again.link_id == att.link_id and again.prog_id == prog_id(ours2)

            # Delete and re-create the device: the pinned link is defunct and gets replaced.
            sh("ip", "link", "del", "eth0")
            sh("ip", "link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
            sh("ip", "link", "set", "eth0", "up")
            stale = attach.tcx_observe(bpffs, "eth0")
            assert stale is not None and stale.defunct
            fresh = attach.tcx_attach(bpffs, "eth0", ours3)
            assert not fresh.defunct and fresh.link_id != att.link_id
            assert fresh.ifindex == attach.ifindex_of("eth0") != ifindex
            assert fresh.position == 0 and fresh.prog_id == prog_id(ours3)

            assert attach.tcx_detach(bpffs, "eth0") is True
            assert attach.tcx_detach(bpffs, "eth0") is False  # missing is success
            assert attach.query(attach.ifindex_of("eth0"))["tcx"] == []
        finally:
            foreign_link.close()


def test_tcx_program_in_front_is_reported_as_shadowing(veth_ns, bpffs, progs, tcx):
    pins.ensure_dirs(bpffs)
    with in_netns(veth_ns):
        attach.tcx_attach(bpffs, "eth0", progs(TCX_NEXT))
        ahead = syscall.tcx_link_create(
            progs(TC_ACT_OK, "foreign_head"), attach.ifindex_of("eth0"), flags=syscall.BPF_F_BEFORE
        )
        try:
            att = attach.tcx_observe(bpffs, "eth0")
            assert att.position == 1 and "run before nodecryptor" in att.shadowed_by
        finally:
            ahead.close()
            attach.tcx_detach(bpffs, "eth0")


def test_legacy_filter_replaced_in_place_and_shadowing_detected(veth_ns, progs, root):
    ours1, ours2 = progs(TCX_NEXT), progs(TCX_NEXT)
    with in_netns(veth_ns):
        att = attach.tc_attach("eth0", ours1)
        assert (att.mode, att.prio, att.handle, att.position, att.shadowed_by) == (
            "tc",
            1,
            attach.TC_HANDLE,
            0,
            "",
        )
        att = attach.tc_attach("eth0", ours2)  # replace, not a second filter
        filters = attach.query(attach.ifindex_of("eth0"))["tc"]
        assert [f["ours"] for f in filters] == [True]

        # A filter at a lower precedence (prio 5) does not shadow...
        sh(
            "tc",
            "filter",
            "add",
            "dev",
            "eth0",
            "egress",
            "prio",
            "5",
            "handle",
            "0x5",
            "bpf",
            "bytecode",
            CBPF_ACCEPT,
        )
        assert attach.tc_observe("eth0").shadowed_by == ""
        # ...one listed before ours at the same priority does.
        sh(
            "tc",
            "filter",
            "add",
            "dev",
            "eth0",
            "egress",
            "prio",
            "1",
            "handle",
            "0x7",
            "bpf",
            "bytecode",
            CBPF_ACCEPT,
        )
        shadow = attach.tc_observe("eth0").shadowed_by
        assert "prio 1 handle 0x7" in shadow, shadow

        assert attach.tc_devices() == {"eth0": attach.ifindex_of("eth0")}
        # The id of the program behind nodecryptor's own filter, which start-up's repair of
        # split generations needs (pyroute2 does not decode TCA_BPF_ID).
        assert attach.tc_programs() == {"eth0": syscall.prog_info(ours2).id}
        assert attach.tc_programs(attach.INGRESS) == {}
        assert attach.tc_detach("eth0") is True
        assert attach.tc_detach("eth0") is False
        left = attach.query(attach.ifindex_of("eth0"))["tc"]
        assert sorted(f["handle"] for f in left) == ["0x5", "0x7"]


def test_cleanup_removes_only_nodecryptor_objects(veth_ns, bpffs, progs, tcx):
    pins.ensure_dirs(bpffs)
    foreign_tcx, ours = progs(TC_ACT_OK, "foreign_ok"), progs(TCX_NEXT)
    settings = Settings(bpffs=bpffs)
    with in_netns(veth_ns):
        eth0, peer0 = attach.ifindex_of("eth0"), attach.ifindex_of("peer0")
        foreign_link = syscall.tcx_link_create(foreign_tcx, eth0, flags=0)
        foreign_pin = os.path.join(bpffs, "foreign_link")
        syscall.obj_pin(foreign_link, foreign_pin)
        foreign_link.close()
        try:
            sh("tc", "qdisc", "add", "dev", "eth0", "clsact")
            sh(
                "tc",
                "filter",
                "add",
                "dev",
                "eth0",
                "egress",
                "prio",
                "1",
                "handle",
                "0x4e43",
                "bpf",
                "bytecode",
                CBPF_ACCEPT,
            )  # our handle, but not our name
            with pytest.raises(OSError, match="foreign filter .* holds handle 0x4e43"):
                attach.tc_attach("eth0", ours)  # never replaces somebody else's filter
            attach.tcx_attach(bpffs, "eth0", ours)
            attach.tc_attach("peer0", ours)
            pins.pin_prog(bpffs, ours)
            assert inspect.active(settings)

            report = inspect.cleanup(settings)

            assert report["tcx_links"] == ["eth0"] and report["tc_filters"] == ["peer0"]
            assert not os.path.exists(pins.root(bpffs))
            assert os.path.exists(foreign_pin)
            assert [c["prog_id"] for c in attach.query(eth0)["tcx"]] == [prog_id(foreign_tcx)]
            assert [f["handle"] for f in attach.query(eth0)["tc"]] == ["0x4e43"]
            assert attach.query(peer0)["tc"] == []
            assert not inspect.active(settings)
        finally:
            os.unlink(foreign_pin)


def _pin_map_at(path: str, spec: abi.MapSpec, max_entries: int) -> None:
    with syscall.map_create(
        spec.map_type, spec.key_size, spec.value_size, max_entries, spec.flags, spec.name
    ) as created:
        syscall.obj_pin(created, path)


def test_generations_switch_current_and_remove_stale(bpffs):
    """Each start or growth pins maps into a new generation; ``current`` moves to it once it
    is attached and the older generations (and other ABI versions' directories) go."""
    pins.ensure_dirs(bpffs)
    spec = abi.MAPS_BY_NAME["nc_config_map"]
    old_abi = os.path.join(pins.root(bpffs), "v1")
    os.mkdir(old_abi, 0o700)
    numbers = []
    for _ in range(3):
        number, path = pins.new_generation(bpffs)
        numbers.append(number)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o700
        _pin_map_at(os.path.join(path, spec.name), spec, 1)
    assert pins.generations(bpffs) == numbers == [1, 2, 3]
    assert pins.current_generation(bpffs) is None
    pins.set_current(bpffs, 2)
    assert pins.current_generation(bpffs) == 2
    assert os.path.exists(pins.map_path(bpffs, spec.name))
    pins.set_current(bpffs, 3)
    removed = pins.remove_stale(bpffs, keep=3)
    assert sorted(removed) == sorted(
        [pins.generation_dir(bpffs, 1), pins.generation_dir(bpffs, 2), old_abi]
    )
    assert pins.generations(bpffs) == [3] and pins.current_generation(bpffs) == 3
    assert pins.new_generation(bpffs)[0] == 4
    assert pins.remove_all(bpffs) and not os.path.exists(pins.root(bpffs))


def test_collector_reads_counters_at_scrape_time_and_counts_failed_reads(bpffs):
    settings = Settings(bpffs=bpffs)
    pins.ensure_dirs(bpffs)
    spec = abi.MAPS_BY_NAME["nc_counters"]
    fd = syscall.map_create(
        spec.map_type, spec.key_size, spec.value_size, abi.COUNTER_MAX, 0, spec.name
    )
    ncpu = syscall.possible_cpus()
    values = (abi.Counter * ncpu)(*[abi.Counter(packets=3, bytes=300) for _ in range(ncpu)])
    syscall.map_update(fd, ctypes.c_uint32(abi.Reason.ENCRYPT), values)
    number, path = pins.new_generation(bpffs)
    syscall.obj_pin(fd, os.path.join(path, spec.name))
    pins.set_current(bpffs, number)
    fd.close()
    registry = CollectorRegistry()
    collector.register(registry, settings)

    def sample(name, **labels):
        return registry.get_sample_value(name, labels)

    assert (
        sample(
            "nodecryptor_datapath_packets_total", reason="cluster-destination", verdict="encrypt"
        )
        == 3 * ncpu
    )
    assert (
        sample("nodecryptor_datapath_bytes_total", reason="cluster-destination", verdict="encrypt")
        == 300 * ncpu
    )
    assert (
        sample(
            "nodecryptor_datapath_packets_total", reason="not-cluster-destination", verdict="pass"
        )
        == 0
    )
    assert sample("nodecryptor_datapath_events_total", event="mss-clamped") == 0
    assert sample("nodecryptor_datapath_read_errors_total") == 0

    pins.unlink(pins.map_path(bpffs, spec.name))
    assert (
        sample(
            "nodecryptor_datapath_packets_total", reason="cluster-destination", verdict="encrypt"
        )
        is None
    )
    assert sample("nodecryptor_datapath_read_errors_total") == 2  # this scrape and the last
