"""Control-plane roles from the v1 Nodes (a relabelled CiliumNode cannot make a worker a
control-plane node): the fake API server serves Nodes as the real one does (metadata only when
asked), and NodeRoleSync keeps the store's role labels current with the same list/watch loop as
the CiliumNode sync."""

from __future__ import annotations

import http.client
import json
import threading

import pytest

from nodecryptor.cluster.reads import snapshot_once
from nodecryptor.cluster.resources import NodeRoleSync
from nodecryptor.cluster.sync import CiliumNodeSync
from nodecryptor.core.backoff import Backoff
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy.plan import node_is_control_plane
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store
from nodecryptor_testkit.fakeapi import NODE_COLLECTION, make_node
from nodecryptor_testkit.wait import wait_for

from k8s_support import TOKEN, node, with_settings
from k8s_support import fake, kubeconfig, settings  # noqa: F401 - pytest fixtures

CP = "node-role.kubernetes.io/control-plane"
LIST_ACCEPT = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
WATCH_ACCEPT = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"


def get(fake, path: str, accept: str = "application/json") -> tuple[int, object]:
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}", "Accept": accept})
    resp = conn.getresponse()
    body = resp.read()
    conn.close()
    if "watch=" in path:
        return resp.status, [json.loads(line) for line in body.splitlines() if line.strip()]
    return resp.status, json.loads(body)


# The fake API server


def test_fake_serves_nodes_in_full_or_as_metadata(fake):
    fake.apply(make_node("cp1", control_plane=True, ipv4="192.0.2.1"))
    fake.apply(make_node("w1"))
    status, full = get(fake, NODE_COLLECTION)
    assert status == 200 and full["kind"] == "NodeList"
    assert full["items"][0]["status"]["addresses"][0]["address"] == "192.0.2.1"
    status, meta = get(fake, NODE_COLLECTION, LIST_ACCEPT)
    assert status == 200 and (meta["apiVersion"], meta["kind"]) == (
        "meta.k8s.io/v1",
        "PartialObjectMetadataList",
    )
    assert [set(i) for i in meta["items"]] == [{"apiVersion", "kind", "metadata"}] * 2
    assert meta["items"][0]["metadata"]["labels"][CP] == ""
    assert meta["metadata"]["resourceVersion"] == str(fake.resource_version)
    # A fallback clause after an unknown one is honoured; nothing acceptable is 406.
    assert (
        get(
            fake, NODE_COLLECTION, "application/vnd.kubernetes.protobuf;as=X;g=y;v=z," + LIST_ACCEPT
        )[1]["kind"]
        == "PartialObjectMetadataList"
    )
    assert get(fake, NODE_COLLECTION, WATCH_ACCEPT)[0] == 406  # a list is not one object
    status, one = get(fake, f"{NODE_COLLECTION}/w1", WATCH_ACCEPT)
    assert status == 200 and one["kind"] == "PartialObjectMetadata"
    # CiliumNodes and Nodes share one resourceVersion counter but not their objects.
    assert fake.cluster.objects == {}


def test_fake_node_watch_as_metadata(fake):
    fake.apply(make_node("w1"))
    rv = fake.resource_version
    fake.apply(make_node("w1", control_plane=True))
    fake.apply(node(1))  # a CiliumNode: not in the Node watch
    fake.delete_node("w1")
    status, events = get(
        fake, f"{NODE_COLLECTION}?watch=true&resourceVersion={rv}&timeoutSeconds=1", WATCH_ACCEPT
    )
    assert status == 200
    assert [(e["type"], e["object"]["kind"]) for e in events] == [
        ("MODIFIED", "PartialObjectMetadata"),
        ("DELETED", "PartialObjectMetadata"),
    ]
    assert "spec" not in events[0]["object"] and events[0]["object"]["metadata"]["labels"][CP] == ""
    # The List form is not what a watch sends.
    assert get(fake, f"{NODE_COLLECTION}?watch=true&timeoutSeconds=1", LIST_ACCEPT)[0] == 406


# NodeRoleSync


class Syncs:
    """CiliumNodeSync and NodeRoleSync into one store, as the agent runs them."""

    def __init__(self, settings: Settings):
        self.store = Store()
        self.metrics = Metrics()
        fast = dict(backoff=Backoff(initial=0.05, maximum=0.4, jitter=0.2), read_timeout_margin=0.5)
        self.roles = NodeRoleSync(settings, self.store, self.metrics, **fast)
        self.cilium = CiliumNodeSync(settings, self.store, self.metrics, **fast)
        self.settings = settings
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=s.run, args=(self.stop,), daemon=True)
            for s in (self.cilium, self.roles)
        ]

    def start(self, threads=None) -> "Syncs":
        for t in threads or self.threads:
            t.start()
        return self

    def control_plane(self) -> set[str]:
        return {
            n
            for n, info in self.store.snapshot().items()
            if node_is_control_plane(info, self.settings)
        }

    def halt(self) -> None:
        self.stop.set()
        for t in self.threads:
            if t.is_alive():
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


def test_roles_come_from_node_labels_and_follow_them(fake, syncs):
    fake.apply(node(1, control_plane=True))  # CiliumNode labelled control-plane...
    fake.apply(make_node("n00001"))  # ...but its Node is a worker
    fake.apply(node(2))
    fake.apply(make_node("n00002", control_plane=True, label_style="k3s"))
    s = syncs().start()
    assert s.store.synced.wait(10)
    assert s.control_plane() == {"n00002"}
    fake.apply(make_node("n00001", control_plane=True))
    wait_for(lambda: s.control_plane() == {"n00001", "n00002"}, what="label added")
    fake.delete_node("n00002")
    wait_for(lambda: s.control_plane() == {"n00001"}, what="Node deleted: a worker again")
    # Whole Nodes are read (their addresses and pod CIDRs are the trusted ones).
    assert fake.node_requests
    for _, path, accept in fake.node_requests:
        assert accept == "application/json", (path, accept)


def test_store_is_synced_only_after_both_lists(fake, syncs):
    fake.apply(node(1))
    fake.apply(make_node("n00001", control_plane=True))
    s = syncs()
    s.start([s.threads[0]])  # only the CiliumNode sync runs
    wait_for(lambda: s.cilium.lists == 1, what="CiliumNode list")
    assert not s.store.synced.is_set()  # a first pass now would see no control-plane node
    s.start([s.threads[1]])
    assert s.store.synced.wait(10)
    assert s.control_plane() == {"n00001"}


def test_other_label_changes_do_not_wake_the_loop(fake, syncs):
    fake.apply(node(1))
    fake.apply(make_node("n00001"))
    s = syncs().start()
    assert s.store.synced.wait(10)
    version = s.store.version
    busy = make_node("n00001")
    busy["metadata"]["labels"]["topology.kubernetes.io/zone"] = "b"
    fake.apply(busy)
    wait_for(lambda: s.roles.resource_version == str(fake.resource_version), what="event")
    assert s.store.version == version


def test_paginated_list_and_410_relist(fake, settings, syncs):
    for i in range(120):
        fake.apply(make_node(f"n{i:05d}", control_plane=i % 40 == 0))
        fake.apply(node(i))
    s = syncs(with_settings(settings, list_page_size=50)).start()
    assert s.store.synced.wait(10)
    assert s.control_plane() == {"n00000", "n00040", "n00080"}
    pages = [p for m, p, _ in fake.node_requests if "watch=" not in p]
    assert len(pages) == 3 and sum("continue=" in p for p in pages) == 2
    # History compacted while the watch was down: the Node watch gets 410 and lists again.
    wait_for(lambda: fake.open_watches == 2, what="both watches")
    fake.drop_watches()
    fake.apply(make_node("n00001", control_plane=True))
    fake.compact()
    wait_for(
        lambda: s.control_plane() == {"n00000", "n00001", "n00040", "n00080"},
        what="re-list after 410",
    )
    assert s.roles.lists >= 2
    assert (
        s.metrics.registry.get_sample_value(
            "nodecryptor_node_watch_restarts_total", {"cause": "expired"}
        )
        >= 1
    )


def test_forbidden_nodes_keep_the_store_unsynced_and_are_retried(fake, settings, syncs):
    # E.g. an upgrade that did not apply the new RBAC yet: nothing is applied rather than
    # every control-plane node silently becoming a worker.
    fake.apply(node(1))
    fake.apply(make_node("n00001", control_plane=True))
    original = fake.nodes.list_page
    refused = [0]
    granted = threading.Event()  # the RBAC is applied: set by the test, not by a timer

    def forbidden(limit, token):
        if not granted.is_set():
            refused[0] += 1
            from nodecryptor_testkit.fakeapi import ApiError

            raise ApiError(
                403,
                "Forbidden",
                'nodes is forbidden: User "system:serviceaccount:'
                'kube-system:nodecryptor" cannot list resource',
            )
        return original(limit, token)

    fake.nodes.list_page = forbidden
    s = syncs().start()
    wait_for(
        lambda: refused[0] >= 2 and s.cilium.lists >= 1,
        what="Node list retries and the CiliumNode list",
    )
    assert not s.store.synced.is_set()
    granted.set()
    assert s.store.synced.wait(10) and s.control_plane() == {"n00001"}
    # Every refusal was counted once.
    assert (
        s.metrics.registry.get_sample_value(
            "nodecryptor_node_watch_restarts_total", {"cause": "forbidden"}
        )
        == refused[0]
    )


def test_plan_snapshot_merges_node_roles(fake, settings):
    fake.apply(node(1, control_plane=True))
    fake.apply(node(2))
    fake.apply(make_node("n00002", control_plane=True))
    nodes, _ = snapshot_once(settings)
    assert {n for n, i in nodes.items() if node_is_control_plane(i, settings)} == {"n00002"}
    legacy = with_settings(settings, role_source="ciliumnode")
    nodes, _ = snapshot_once(legacy)
    assert {n for n, i in nodes.items() if node_is_control_plane(i, legacy)} == {"n00001"}
