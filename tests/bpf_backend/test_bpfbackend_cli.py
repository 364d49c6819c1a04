"""Flag validation of the inspection commands and the BPF backend's start-up refusals; these
need neither root nor BPF."""

from __future__ import annotations

import pytest

from nodecryptor.cli import main
from nodecryptor.datapath.base import Datapath
from nodecryptor.datapath.bpf.backend import BpfDatapath
from nodecryptor.core.errors import NotSupported
from nodecryptor.core.settings import Settings


@pytest.mark.parametrize(
    "args, flag, value",
    [
        (["--dst", "10.0.0.300"], "--dst", "10.0.0.300"),
        (["--dst", "node-b"], "--dst", "node-b"),
        (["--dst", "10.0.0.1", "--src", "fd00::1"], "--src", "fd00::1"),
        (["--dst", "10.0.0.1", "--dport", "65536"], "--dport", "65536"),
        (["--dst", "10.0.0.1", "--sport", "-1"], "--sport", "-1"),
        (["--dst", "10.0.0.1", "--proto", "gre"], "--proto", "gre"),
        (["--dst", "10.0.0.1", "--proto", "icmpv6"], "--proto", "icmpv6"),
        (["--dst", "10.0.0.1", "--mark", "0xzz"], "--mark", "0xzz"),
        (["--dst", "10.0.0.1", "--mark", "0x100000000"], "--mark", "0x100000000"),
        (["--dst", "10.0.0.1", "--device", "a/b"], "--device", "a/b"),
    ],
)
def test_explain_rejects_bad_input_with_exit_2_naming_flag_and_value(args, flag, value, capsys):
    assert main(["explain", *args]) == 2
    err = capsys.readouterr().err
    assert flag in err and repr(value) in err, err


def test_bpf_dump_without_pins_says_so(tmp_path, capsys):
    assert main(["bpf", "dump", "--bpffs", str(tmp_path)]) == 1
    assert "no maps pinned" in capsys.readouterr().err


def test_constructor_does_no_io_and_start_refuses_without_bpffs(tmp_path):
    datapath = BpfDatapath(Settings(bpffs=str(tmp_path / "absent")))
    assert isinstance(datapath, Datapath)
    obs = datapath.observe()
    assert not obs.ready and obs.reason == "bpf datapath not started"
    with pytest.raises(NotSupported) as info:
        BpfDatapath(Settings(bpffs=str(tmp_path))).start()
    assert info.value.feature == "bpffs" and str(tmp_path) in info.value.why
    with pytest.raises(ValueError, match="attach_mode"):
        BpfDatapath(Settings(), attach_mode="xdp")


@pytest.mark.parametrize(
    "spec",
    ["1-65535", "1-65535,udp/1-65535,sctp/1-65535", ",".join(str(p) for p in range(1000, 1032, 2))],
)
def test_exempt_port_spec_that_fits_is_accepted(spec, capsys):
    # plan fails later for want of a cluster, but not on the flag
    main(
        [
            "plan",
            "--node-name",
            "w1",
            "--control-plane-exempt-ports",
            spec,
            "--kubeconfig",
            "/nonexistent",
        ]
    )
    assert "--control-plane-exempt-ports" not in capsys.readouterr().err


def test_exempt_port_spec_beyond_the_datapath_exits_2_naming_flag_and_value(capsys):
    spec = ",".join(str(p) for p in range(1000, 1034, 2))  # 17 separate ranges
    assert main(["plan", "--node-name", "w1", "--control-plane-exempt-ports", spec]) == 2
    err = capsys.readouterr().err
    assert "--control-plane-exempt-ports" in err and repr(spec) in err and "16" in err, err
