"""The end-to-end scenarios, one module each, and their registry. A scenario is a function
``run(lab, ports) -> Result`` taking an up-and-running Lab: a table of (flow or check,
expected, observed) rows plus measured facts (times, packet counts).

To add a scenario, write its module (here or elsewhere in ``nodecryptor_testkit.lab``) with a
``run`` function and add one line to ``SCENARIOS`` below: its name and its module, relative to
this package. The demo and ``make test`` (tests/e2e/test_scenarios.py) run every registered
scenario, in this order.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable

from ..flows import PortAllocator, Result
from ..topology import LabError

SCENARIOS: dict[str, str] = {
    "matrix": ".matrix",
    "bootstrap": ".bootstrap",
    "restart": ".restart",
    "wg-down": ".wg_down",
    "churn": ".churn",
    "exemption": ".exemption",
    "cilium-restart": ".cilium_restart",
    "rogue": ".rogue",
    "peer-health": ".peer_health",
    "alerts": ".alerts",
    "forged-claims": ".forged_claims",
}
"""Scenario name -> module (relative to this package) whose ``run(lab, ports)`` it is."""

NAMES = tuple(SCENARIOS)


def scenario(name: str) -> Callable[..., Result]:
    """The ``run`` function of scenario ``name``; its module is imported on first use."""
    return importlib.import_module(SCENARIOS[name], __name__).run


def run_scenario(lab, name: str, ports: PortAllocator) -> Result:
    """Run one scenario; an exception becomes a failed Result instead of ending the demo."""
    start = time.monotonic()
    try:
        result = scenario(name)(lab, ports)
    except (LabError, OSError, RuntimeError, ValueError, KeyError) as e:
        result = Result(name, lab.datapath, error=f"{type(e).__name__}: {e}")
    result.seconds = time.monotonic() - start
    return result
