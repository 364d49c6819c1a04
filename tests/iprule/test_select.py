"""Datapath selection: auto falls back to ip rules with the reason, bpf never falls back,
and the mode not chosen is removed."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from nodecryptor.datapath import select
from nodecryptor.datapath.choice import last_choice
from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor.core.errors import NotSupported, SettingsError
from nodecryptor.observe.metrics import Metrics
from tests.datapath_cases import CASES_BY_ID, desired_for, settings_for

pytestmark = pytest.mark.privileged

CASE = CASES_BY_ID["v4-node-to-remote-node"]


@pytest.fixture
def run_dir(tmp_path):
    return str(tmp_path / "run")


def bpf_unavailable(settings, metrics):
    """A BPF starter that fails as on a node without kernel headers."""
    raise NotSupported("bpf datapath", "no kernel headers (test)")


def info(metrics: Metrics) -> dict:
    return {
        s.labels["datapath"]: s.labels["reason"]
        for fam in metrics.registry.collect()
        if fam.name == "nodecryptor_datapath"
        for s in fam.samples
    }


def test_auto_falls_back_when_bpf_is_unavailable(node_ns, bpffs, run_dir):
    ns, wg = node_ns("w1")
    settings = dataclasses.replace(
        settings_for(CASE), datapath="auto", bpffs=bpffs, run_dir=run_dir
    )
    metrics = Metrics()
    datapath, reason = select.choose_datapath(
        settings, metrics, netns=ns, bpf_starter=bpf_unavailable
    )
    try:
        assert isinstance(datapath, select.HandOver)
        assert isinstance(datapath.backend, IpRuleDatapath)
        assert "fell back to ip rules" in reason and "no kernel headers (test)" in reason
        assert info(metrics) == {"iprule": reason}
        choice = last_choice(settings)
        assert (choice["datapath"], choice["reason"]) == ("iprule", reason)
        datapath.apply(desired_for(CASE, wg))
        assert inspect.status(settings, netns=ns)["active"]
    finally:
        datapath.close()
        inspect.cleanup(settings, netns=ns)


def test_auto_falls_back_when_bcc_cannot_be_imported(node_ns, bpffs, run_dir, monkeypatch):
    ns, _ = node_ns("w1")
    # A None entry makes "import nodecryptor.datapath.bpf.backend" raise ImportError, as on a
    # machine without bcc.
    monkeypatch.setitem(sys.modules, "nodecryptor.datapath.bpf.backend", None)
    settings = dataclasses.replace(
        settings_for(CASE), datapath="auto", bpffs=bpffs, run_dir=run_dir
    )
    datapath, reason = select.choose_datapath(settings, None, netns=ns)
    datapath.close()
    assert datapath.name == "iprule"
    assert "ModuleNotFoundError" in reason  # an ImportError subclass


def test_bpf_requested_never_falls_back(node_ns, bpffs, run_dir):
    ns, _ = node_ns("w1")
    settings = dataclasses.replace(settings_for(CASE), datapath="bpf", bpffs=bpffs, run_dir=run_dir)
    with pytest.raises(NotSupported) as err:
        select.choose_datapath(settings, None, netns=ns, bpf_starter=bpf_unavailable)
    assert "no kernel headers (test)" in str(err.value)
    assert not inspect.active(settings, netns=ns)
    assert last_choice(settings) is None


@pytest.mark.parametrize("field,flag", [("datapath", "--datapath"), ("fail_mode", "--fail-mode")])
def test_unknown_mode_names_the_flag(field, flag):
    with pytest.raises(SettingsError) as err:
        dataclasses.replace(settings_for(CASE), **{field: "ebpf"})
    assert (err.value.flag, err.value.value) == (flag, "ebpf")


def test_choosing_bpf_removes_ip_rules(node_ns, bpffs, run_dir, bcc_available):
    ns, wg = node_ns("w1")
    settings = dataclasses.replace(settings_for(CASE), bpffs=bpffs, run_dir=run_dir)
    earlier = IpRuleDatapath(settings, netns=ns).start()
    earlier.apply(desired_for(CASE, wg))
    earlier.close()
    assert inspect.active(settings, netns=ns)
    datapath, reason = select.choose_datapath(
        dataclasses.replace(settings, datapath="auto"), None, netns=ns
    )
    try:
        assert datapath.name == "bpf", reason
        assert reason.startswith("auto: BPF")
        # The old rules keep enforcing until BPF has applied once ...
        assert inspect.active(settings, netns=ns)
        # No devices: the BPF backend runs in this process's namespace (the host's), and it
        # must attach nowhere there; the map sync is the apply that counts.
        datapath.apply(desired_for(CASE, wg, devices=()))
        # ... and are gone right after.
        assert datapath.handed_over
        assert not inspect.active(settings, netns=ns)
        assert inspect.status(settings, netns=ns)["rule_count"] == 0
    finally:
        datapath.close()
        datapath.cleanup()


@pytest.mark.parametrize(
    "field,value",
    [
        ("iprule_table", 254),
        ("iprule_table", 0),
        ("iprule_table", 253),  # its guard table: main
        ("iprule_table", 2**32 - 1),
        ("iprule_priority_base", 32700),
        ("iprule_priority_base", 0),
    ],
)
def test_band_and_table_settings_are_checked(field, value):
    settings = dataclasses.replace(settings_for(CASE), **{field: value})
    with pytest.raises(SettingsError) as err:
        IpRuleDatapath(settings).start()
    assert err.value.flag == field and err.value.value == value
