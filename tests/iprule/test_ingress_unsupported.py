"""The ip-rule datapath cannot classify arriving packets: it reports ingress
enforcement as unsupported in status, observe(), the metric, and withholds readiness when
``enforce`` was asked for, instead of pretending."""

from __future__ import annotations

import dataclasses

import pytest

from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from nodecryptor.observe.metrics import Metrics
from tests.datapath_cases import CASES_BY_ID, desired_for, settings_for


@pytest.mark.parametrize("mode,ready", [("audit", True), ("off", True), ("enforce", False)])
def test_ingress_enforcement_reported_unsupported(node_ns, mode, ready):
    ns, wg = node_ns("w1")
    case = CASES_BY_ID["v4-node-to-remote-node"]
    settings = dataclasses.replace(settings_for(case), ingress_enforcement=mode)
    metrics = Metrics()
    datapath = IpRuleDatapath(settings, metrics=metrics, netns=ns).start()
    try:
        datapath.apply(desired_for(case, wg))
        obs = datapath.observe()
    finally:
        datapath.close()
    try:
        assert metrics.registry.get_sample_value("nodecryptor_ingress_enforcement_supported") == 0
        report = obs.details["ingress_enforcement"]
        assert report["supported"] is False and report["requested"] == mode
        assert obs.ready is ready
        if not ready:
            assert "ingress enforcement unsupported" in obs.reason
        status = inspect.status(settings, netns=ns)
        assert status["ingress_enforcement"]["supported"] is False
    finally:
        inspect.cleanup(settings, netns=ns)
