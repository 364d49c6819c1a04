"""EncryptionExemption policies from the API: ExemptionSync keeps the store's
policies current with CiliumNodeSync's loop, a missing CRD is reported and retried (the
built-in policy still applies), Node labels a policy selects reach the store, and a label
change moves a node in or out of a policy."""

from __future__ import annotations

import threading

import pytest

from nodecryptor.cluster.reads import exemptions_once, snapshot_once
from nodecryptor.cluster.resources import ExemptionSync, NodeRoleSync
from nodecryptor.cluster.sync import CiliumNodeSync
from nodecryptor.core.backoff import Backoff
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy.plan import compute_plan
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store
from nodecryptor_testkit.fakeapi import make_exemption, make_node
from nodecryptor_testkit.wait import wait_for

from k8s_support import kube_node, node
from k8s_support import fake, kubeconfig, settings  # noqa: F401 - pytest fixtures

STORAGE = {"matchLabels": {"storage": "yes"}}


class Syncs:
    def __init__(self, settings: Settings):
        self.store = Store()
        self.metrics = Metrics()
        fast = dict(backoff=Backoff(initial=0.05, maximum=0.2, jitter=0.2), read_timeout_margin=0.5)
        self.cilium = CiliumNodeSync(settings, self.store, self.metrics, **fast)
        self.roles = NodeRoleSync(settings, self.store, self.metrics, **fast)
        self.policies = ExemptionSync(settings, self.store, self.metrics, **fast)
        self.settings = settings
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=s.run, args=(self.stop,), daemon=True)
            for s in (self.cilium, self.roles, self.policies)
        ]

    def start(self) -> "Syncs":
        for t in self.threads:
            t.start()
        return self

    def plan(self, local: str):
        return compute_plan(
            self.store.snapshot(), local, self.settings, policies=self.store.exemptions()
        )

    def exempt(self, local: str) -> dict[str, list[str]]:
        return {
            d.node: [f"{r.policy}:{r.first}" for r in d.exempt_ports]
            for d in self.plan(local).destinations
            if d.kind == "node-ip"
        }

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def syncs(settings):
    made = []

    def make(s: Settings = settings) -> Syncs:
        made.append(Syncs(s))
        return made[-1]

    yield make
    for s in made:
        s.halt()


def labelled(name: str, **labels) -> dict:
    obj = kube_node(int(name[1:]))
    obj["metadata"]["labels"].update(labels)
    return obj


def test_policies_and_selected_labels_follow_the_api(fake, syncs):
    for i in (1, 2, 3):
        fake.apply(node(i))
    fake.apply(labelled("n00001"))
    fake.apply(labelled("n00002", storage="yes"))
    fake.apply(labelled("n00003"))
    fake.apply(make_exemption("storage", STORAGE, [{"port": 3260}]))
    s = syncs().start()
    assert s.store.synced.wait(10)
    wait_for(lambda: s.exempt("n00001").get("n00002") == ["storage:3260"], what="policy")
    assert s.exempt("n00001")["n00003"] == []
    # The label moves to n00003: the exemption follows it.
    fake.apply(labelled("n00002"))
    fake.apply(labelled("n00003", storage="yes"))
    wait_for(lambda: s.exempt("n00001")["n00003"] == ["storage:3260"], what="label move")
    assert s.exempt("n00001")["n00002"] == []
    # A policy that turns malformed stops applying (rejected whole), and is reported.
    bad = make_exemption("storage", STORAGE, [{"port": 3260, "endPort": 1}])
    fake.apply(bad)
    wait_for(lambda: s.store.exemptions() == (), what="malformed policy dropped")
    assert s.metrics.rejected_claims.labels(reason="malformed")._value.get() >= 1
    # Deleting a policy removes it.
    fake.apply(make_exemption("other", {}, [{"port": 7946}]))
    wait_for(lambda: [p.name for p in s.store.exemptions()] == ["other"], what="new policy")
    fake.delete_exemption("other")
    wait_for(lambda: s.store.exemptions() == (), what="deleted policy")


def test_unselected_label_changes_do_not_wake_the_loop(fake, syncs):
    fake.apply(node(1))
    fake.apply(labelled("n00001"))
    fake.apply(make_exemption("storage", STORAGE))
    s = syncs().start()
    assert s.store.synced.wait(10)
    wait_for(lambda: len(s.store.exemptions()) == 1, what="policy")
    version = s.store.version
    fake.apply(labelled("n00001", unrelated="x"))
    wait_for(lambda: s.roles.resource_version == str(fake.resource_version), what="event")
    assert s.store.version == version
    fake.apply(labelled("n00001", storage="yes"))
    wait_for(lambda: s.store.version > version, what="selected label change")
    assert dict(s.store.snapshot()["n00001"].node_labels) == {"storage": "yes"}


def test_missing_crd_is_reported_retried_and_the_builtin_policy_applies(fake, syncs):
    fake.exemptions_installed = False
    fake.apply(node(1))
    fake.apply(node(2, control_plane=True))
    fake.apply(kube_node(1))
    fake.apply(kube_node(2, control_plane=True))
    s = syncs().start()
    assert s.store.synced.wait(10)  # the missing CRD does not hold the store up
    wait_for(lambda: s.policies.crd_missing, what="missing CRD noticed")
    assert s.metrics.exemption_crd_missing._value.get() == 1
    wait_for(lambda: s.policies.failures >= 2, what="retries")
    assert s.exempt("n00001")["n00002"] == [
        "control-plane-bootstrap:2379",
        "control-plane-bootstrap:6443",
    ]
    # The CRD gets installed with a policy: it applies, the report clears.
    fake.apply(
        make_exemption(
            "rke2-supervisor",
            {"matchLabels": {"node-role.kubernetes.io/control-plane": ""}},
            [{"port": 9345}],
        )
    )
    fake.exemptions_installed = True
    wait_for(lambda: not s.policies.crd_missing, what="CRD installed")
    wait_for(lambda: "rke2-supervisor:9345" in s.exempt("n00001")["n00002"], what="policy")
    assert s.metrics.exemption_crd_missing._value.get() == 0
    assert s.policies.alive()[0]


def test_exemption_watch_survives_410_and_bookmarks(fake, syncs):
    fake.apply(node(1))
    fake.apply(make_node("n00001"))
    s = syncs().start()
    assert s.store.synced.wait(10)
    wait_for(lambda: s.policies.lists == 1, what="first list")
    fake.compact()
    fake.drop_watches()
    fake.apply(make_exemption("after-410", {}, [{"port": 1}]))
    wait_for(lambda: [p.name for p in s.store.exemptions()] == ["after-410"], what="relist")


def test_readiness_notes_a_missing_crd_without_failing():
    from types import SimpleNamespace

    from nodecryptor.agent.wiring import Agent

    policies = SimpleNamespace(crd_missing=True)
    check = Agent._with_exemption_note(lambda: (True, "synced"), policies)
    ok, why = check()
    assert ok and "CRD not installed" in why
    policies.crd_missing = False
    assert check() == (True, "synced")


def test_plan_snapshot_keeps_the_labels_the_agent_keeps(fake, settings, syncs):
    """``snapshot_once`` (nodecryptor plan) merges a Node's labels through the agent's Store:
    the role labels and the keys the policies select on, nothing else."""
    fake.apply(node(1))
    fake.apply(labelled("n00001", storage="yes", unrelated="x"))
    fake.apply(make_exemption("storage", STORAGE, [{"port": 3260}]))
    s = syncs().start()
    assert s.store.synced.wait(10)
    wait_for(lambda: len(s.store.exemptions()) == 1, what="policy")
    agent = s.store.snapshot()["n00001"].node_labels
    policies, _, _ = exemptions_once(settings)
    nodes, _ = snapshot_once(settings, policies)
    assert nodes["n00001"].node_labels == agent == (("storage", "yes"),)
    # Without policies only the role labels stay (this Node carries none).
    nodes, _ = snapshot_once(settings)
    assert nodes["n00001"].node_labels == ()
