"""A running agent's /metrics against the Prometheus conventions: `promtool check metrics`
finds nothing (counters end in _total, units in names, no reserved suffixes), every family has
help text, no label names an address, peer or node, and the set of series does not grow
when the cluster grows from 2 nodes to 42 (bounded label sets)."""

from __future__ import annotations

import pytest

from monitoring_support import ScrapedAgent, families, promtool, run  # noqa: F401 (fixture)

# Label names whose values would be per-peer, per-address or per-node: one series each would
# make every agent's series count grow with the cluster.
UNBOUNDED_LABELS = {
    "peer",
    "node",
    "ip",
    "address",
    "addr",
    "prefix",
    "cidr",
    "key",
    "pubkey",
    "public_key",
    "endpoint",
    "name",
    "instance",
}


@pytest.fixture
def agent(tmp_path):
    a = ScrapedAgent(tmp_path, workers=2)
    yield a
    a.close()


def test_promtool_check_metrics_on_a_running_agent(agent, promtool):
    text = agent.wait_nodes(2)
    out = run(promtool, "check", "metrics", stdin=text)
    assert out.returncode == 0 and not out.stdout.strip() and not out.stderr.strip(), (
        out.stdout + out.stderr
    )
    assert "nodecryptor_bpf_program_loads_total" in text  # the families below are the agent's
    assert "nodecryptor_cleartext_packets_total" in text


def test_promtool_check_metrics_finds_a_violation(promtool):
    """The check is not a no-op: a counter without _total is reported."""
    bad = "# HELP nodecryptor_drops Drops.\n# TYPE nodecryptor_drops counter\nnodecryptor_drops 1\n"
    out = run(promtool, "check", "metrics", stdin=bad)
    assert out.returncode != 0 and "_total" in out.stdout + out.stderr


def test_help_text_and_label_names(agent):
    fams = families(agent.wait_nodes(2))
    assert fams, "no metric families scraped"
    for name, fam in fams.items():
        assert name.startswith("nodecryptor_"), name
        assert fam.documentation.strip(), f"{name} has no help text"
        for sample in fam.samples:
            unbounded = set(sample.labels) & UNBOUNDED_LABELS
            assert not unbounded, f"{sample.name} has per-object labels {unbounded}"


def test_series_do_not_grow_with_the_cluster(agent):
    def series(text):
        return {
            (s.name, tuple(sorted(s.labels.items())))
            for fam in families(text).values()
            for s in fam.samples
            if not s.name.endswith("_created")
        }

    small = series(agent.wait_nodes(2))
    for i in range(3, 43):
        agent.fake.apply(ScrapedAgent.node(i))
    large = series(agent.wait_nodes(42))
    assert large == small, (
        f"new series with 40 more nodes: {sorted(large - small)}; gone: {sorted(small - large)}"
    )
