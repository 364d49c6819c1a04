"""The BPF program load counters behind NodecryptorBpfProgramLoadFailed and
NodecryptorBpfCompileStorm: a compile error, a kernel refusal and a good load are each counted
under their result, only a good load sets the timestamp and duration, and a reused pinned
program is no load at all. The compile child and the pins are replaced (no BCC needed); the
backend's own load step and the loader's decision are what run."""

from __future__ import annotations

import types

import pytest

from nodecryptor.core.errors import NotSupported
from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import loader, pins, program
from nodecryptor.datapath.bpf.backend import BpfDatapath
from nodecryptor.observe.metrics import Metrics


def value(metrics: Metrics, name: str, **labels) -> float:
    got = metrics.registry.get_sample_value(name, labels)
    return 0.0 if got is None else got


@pytest.fixture
def datapath(monkeypatch, tmp_path):
    """A backend whose program set is never pinned until ``compile_in_child`` (replaced by
    each test) returns: then ``open_pinned`` finds a stand-in."""
    monkeypatch.setattr(pins, "new_generation", lambda bpffs: (7, str(tmp_path / "gen7")))
    monkeypatch.setattr(pins, "remove_generation", lambda bpffs, number: None)
    monkeypatch.setattr(loader, "_pin_maps", lambda loaded, pin_dir: None)
    pinned: set[str] = set()
    monkeypatch.setattr(
        loader,
        "open_pinned",
        lambda bpffs, key: (
            types.SimpleNamespace(prog_id=1, pin_dir="", compile_seconds=0.0)
            if key in pinned
            else None
        ),
    )
    metrics = Metrics()
    dp = BpfDatapath(Settings(bpffs=str(tmp_path), run_dir=str(tmp_path / "run")), metrics=metrics)
    return dp, metrics, pinned


@pytest.mark.parametrize(
    "error, result",
    [
        (program.CompileFailed("compiling nodecryptor.c failed: boom"), "compile_error"),
        (program.LoadFailed("loading nc_egress failed: Permission denied"), "load_error"),
        (RuntimeError("anything else the child's start raises"), "load_error"),
    ],
)
def test_failed_loads_are_counted_by_result(datapath, monkeypatch, error, result):
    dp, metrics, _ = datapath

    def fail(bpffs, built, pin_dir):
        raise error

    monkeypatch.setattr(loader, "compile_in_child", fail)
    with pytest.raises(NotSupported):
        dp._load_generation({4: 16, 6: 16})
    assert value(metrics, "nodecryptor_bpf_program_loads_total", result=result) == 1
    others = {"ok", "compile_error", "load_error"} - {result}
    assert all(value(metrics, "nodecryptor_bpf_program_loads_total", result=r) == 0 for r in others)
    assert value(metrics, "nodecryptor_bpf_program_loaded_timestamp_seconds") == 0


def test_a_good_load_sets_count_time_and_duration_and_a_reuse_is_not_counted(datapath, monkeypatch):
    dp, metrics, pinned = datapath

    def compiled(bpffs, built, pin_dir):
        pinned.add(built.key)
        return 2.5

    monkeypatch.setattr(loader, "compile_in_child", compiled)
    dp._load_generation({4: 16, 6: 16})
    dp._load_generation({4: 32, 6: 16})  # other map sizes: another program, compiled
    assert value(metrics, "nodecryptor_bpf_program_loads_total", result="ok") == 2
    assert value(metrics, "nodecryptor_bpf_program_loaded_timestamp_seconds") > 1e9
    assert value(metrics, "nodecryptor_bpf_program_load_duration_seconds") == 2.5
    dp._load_generation({4: 16, 6: 16})  # the first program again: reused from its pins
    assert value(metrics, "nodecryptor_bpf_program_loads_total", result="ok") == 2
    assert dp._program["source"] == "reused"


def test_an_unknown_result_keeps_the_label_set_fixed():
    metrics = Metrics()
    metrics.record_program_load("segfault")
    assert value(metrics, "nodecryptor_bpf_program_loads_total", result="load_error") == 1
    assert (
        metrics.registry.get_sample_value(
            "nodecryptor_bpf_program_loads_total", {"result": "segfault"}
        )
        is None
    )
