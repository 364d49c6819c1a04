"""Differential test: the shared case table through the kernel's own route lookup.

Every ``routable`` case of tests/datapath_cases.py is applied (the DesiredState the agent would
compute for the case's node) and explained through ``RTM_GETROUTE`` in a namespace that holds
that node's addresses; the verdict must equal the one the BPF program gives. Non-routable cases
are listed by id so a change to the table is noticed here.
"""

from __future__ import annotations

import pytest

from nodecryptor.datapath.iprule import inspect
from nodecryptor.datapath.iprule.backend import IpRuleDatapath
from tests.datapath_cases import (
    CASES,
    WG_IFNAME,
    R_UNCOVERED_OPEN,
    R_WG_DOWN_OPEN,
    desired_for,
    settings_for,
)

from .conftest import sh

pytestmark = pytest.mark.privileged

ROUTABLE = [c for c in CASES if c.routable]
NOT_ROUTABLE = {c.id: c.why_not_routable for c in CASES if not c.routable}

EXPECTED_NOT_ROUTABLE = {
    # WireGuard's own output is recognised by its fwmark: the kernel does match marks, but the
    # case differs from its unmarked twin only in the mark, which the table keeps apart.
    "v4-mark-0x1e00",
    "v4-mark-0x0e00",
    "v4-mark-other",
    "v6-mark-0x1e00",
    # ICMPv6 neighbour discovery never goes through a route lookup of a remote prefix.
    "v6-nd-133-router-solicitation",
    "v6-nd-134-router-advertisement",
    "v6-nd-135-neighbour-solicitation",
    "v6-nd-136-neighbour-advertisement",
    "v6-nd-137-redirect",
    "v6-nd-136-after-hop-by-hop",
    # Later fragments: routing decides once per datagram, before fragmentation.
    "v4-later-fragment-of-exempt",
    "v4-later-fragment-of-encrypted",
    "v4-later-fragment-unseen",
    "v4-later-fragment-not-cluster",
    "v6-later-fragment-of-exempt",
    "v6-later-fragment-of-encrypted",
    "v6-later-fragment-unseen",
    "v4-pod-to-remote-pod-later-fragment-cilium",
    "v4-dirty-cb-later-fragment-of-exempt",
    "v6-dirty-cb-later-fragment-of-exempt",
    # Only a packet parser sees these.
    "arp-not-ip",
    "v4-truncated-tcp-header",
    "v6-truncated-udp-header",
    "disabled-config",
    # Ip rules have no connection state; they exempt replies by source port alone.
    "v4-cp-sport-6443-without-flow",
    "v4-cp-sport-2379-to-worker-pod-without-flow",
}

# Reasons policy routing cannot know: with fail-open the prefix is simply absent from the
# table, which looks exactly like a non-cluster destination (the verdict, pass, is the same).
REASON_UNKNOWABLE = {R_WG_DOWN_OPEN, R_UNCOVERED_OPEN}


def test_non_routable_cases_are_the_known_ones():
    assert set(NOT_ROUTABLE) == EXPECTED_NOT_ROUTABLE
    assert len(NOT_ROUTABLE) == len(EXPECTED_NOT_ROUTABLE)
    assert all(NOT_ROUTABLE.values()), "every non-routable case must say why"
    assert len(ROUTABLE) == len(CASES) - len(EXPECTED_NOT_ROUTABLE)


@pytest.mark.parametrize("local_node", sorted({c.local_node for c in ROUTABLE}))
def test_routable_cases_match_the_bpf_verdicts(root, node_ns, local_node):
    ns, wg_index = node_ns(local_node)
    cases = [c for c in ROUTABLE if c.local_node == local_node]
    mismatches = []
    datapath = IpRuleDatapath(settings_for(cases[0]), netns=ns).start()
    try:
        results = []
        for case in cases:
            # One datapath re-applied per case: every case is also an update of the last one.
            datapath.settings = settings = settings_for(case)
            # WireGuard "down" is realised in the kernel too, so explain sees the same state.
            state = "down" if case.extra.get("wg_down") else "up"
            sh(ns, "ip", "link", "set", WG_IFNAME, state)
            datapath.apply(desired_for(case, wg_index))
            results.append((case, inspect.explain(settings, case.query, netns=ns)))
    finally:
        datapath.close()
    for case, got in results:
        reason_ok = got.reason == case.expected_reason or case.expected_reason in REASON_UNKNOWABLE
        if got.verdict != case.expected_verdict or not reason_ok:
            mismatches.append(
                (
                    case.id,
                    case.expected_verdict,
                    case.expected_reason,
                    got.verdict,
                    got.reason,
                    got.details,
                )
            )
    assert [m[:5] for m in mismatches] == []
    # w2 is the local node only of the exemption-policy rows (it serves "storage").
    assert len(cases) >= (5 if local_node == "w2" else 10)
