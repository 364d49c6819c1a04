"""The NodeEncryptionReady writer against the fake API server, and the fake's nodes/status
PATCH: strategic merge by condition type, JSON merge replacing the list, refusals (400, 404,
415), injected 409 conflicts and an outage."""

from __future__ import annotations

import dataclasses
import http.client
import json
import random
import threading

import kubernetes.client
import pytest

from nodecryptor.cluster.client import load_client
from nodecryptor.cluster.condition import NodeConditionWriter
from nodecryptor.cluster.k8s_errors import KubernetesError
from nodecryptor.cluster.reads import read_node_conditions
from nodecryptor.core.backoff import Backoff
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy.peerhealth import CONDITION_TYPE, Condition
from nodecryptor_testkit.fakeapi import make_node
from nodecryptor_testkit.wait import wait_for

from k8s_support import TOKEN
from k8s_support import fake, kubeconfig, settings  # noqa: F401 - pytest fixtures

READY = Condition("True", "EncryptionReady", "all good")
DOWN = Condition("False", "WireGuardDown", "cilium_wg0 is down")


def patch(fake, name, body, ctype="application/strategic-merge-patch+json"):
    conn = http.client.HTTPConnection(fake.host, fake.port, timeout=5)
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(
        "PATCH",
        f"/api/v1/nodes/{name}/status",
        body=data,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": ctype},
    )
    resp = conn.getresponse()
    out = json.loads(resp.read())
    conn.close()
    return resp.status, out


def conditions(fake, name="w1"):
    return {c["type"]: c for c in fake.nodes.get(name)["status"]["conditions"]}


# ---- the fake --------------------------------------------------------------------------------


def test_strategic_merge_keeps_other_conditions(fake):
    fake.apply(make_node("w1"))
    body = {"status": {"conditions": [{"type": "X", "status": "True", "reason": "A"}]}}
    assert patch(fake, "w1", body)[0] == 200
    body["status"]["conditions"][0]["reason"] = "B"
    code, node = patch(fake, "w1", body)
    assert code == 200
    got = conditions(fake)
    assert got["Ready"]["reason"] == "KubeletReady" and got["X"]["reason"] == "B"
    assert [c["type"] for c in node["status"]["conditions"]] == ["Ready", "X"]


def test_json_merge_replaces_the_list_as_the_real_server_does(fake):
    fake.apply(make_node("w1"))
    body = {"status": {"conditions": [{"type": "X", "status": "True"}]}}
    assert patch(fake, "w1", body, "application/merge-patch+json")[0] == 200
    assert list(conditions(fake)) == ["X"]


def test_status_subresource_ignores_metadata_and_spec(fake):
    fake.apply(make_node("w1"))
    body = {
        "metadata": {"labels": {"node-role.kubernetes.io/control-plane": ""}},
        "spec": {"unschedulable": True},
        "status": {"conditions": []},
    }
    assert patch(fake, "w1", body)[0] == 200
    node = fake.nodes.get("w1")
    assert "node-role.kubernetes.io/control-plane" not in node["metadata"]["labels"]
    assert "unschedulable" not in node["spec"]


@pytest.mark.parametrize(
    "body,ctype,code",
    [
        (b"{not json", "application/strategic-merge-patch+json", 400),
        ([1, 2], "application/strategic-merge-patch+json", 400),
        (
            {"status": {"conditions": [{"status": "True"}]}},
            "application/strategic-merge-patch+json",
            400,
        ),
        ({"status": {"conditions": "x"}}, "application/merge-patch+json", 400),
        ({"status": {}}, "text/plain", 415),
    ],
)
def test_fake_refuses_malformed_patches(fake, body, ctype, code):
    fake.apply(make_node("w1"))
    before = fake.nodes.get("w1")
    assert patch(fake, "w1", body, ctype)[0] == code
    assert fake.nodes.get("w1") == before


def test_fake_unknown_node_is_404(fake):
    code, status = patch(fake, "nope", {"status": {}})
    assert code == 404 and status["reason"] == "NotFound"


# ---- the writer ------------------------------------------------------------------------------


class Clock:
    def __init__(self):
        self.t = 1000.0

    def __call__(self):
        return self.t


def writer(settings, **kw):
    kw.setdefault("rng", random.Random(1))
    kw.setdefault("clock", Clock())
    return NodeConditionWriter(
        dataclasses.replace(settings, node_name="w1"), CONDITION_TYPE, Metrics(), **kw
    )


@pytest.fixture
def core(settings):
    client = load_client(settings)
    yield kubernetes.client.CoreV1Api(client)
    client.close()


def test_writes_at_start_on_change_and_on_heartbeat_only(fake, settings, core):
    fake.apply(make_node("w1"))
    clock = Clock()
    w = writer(settings, clock=clock, heartbeat_seconds=1800, jitter=0.1, min_interval=10)
    w.submit(READY)
    w.step(core)
    assert (
        len(fake.status_patches) == 1
        and conditions(fake)[CONDITION_TYPE]["reason"] == "EncryptionReady"
    )
    # A new message alone: no write, however often.
    for i in range(20):
        clock.t += 30
        w.submit(Condition("True", "EncryptionReady", f"peers: {i}"))
        w.step(core)
    assert len(fake.status_patches) == 1
    # A change of reason: written (after the minimum interval, which has passed).
    w.submit(DOWN)
    w.step(core)
    assert len(fake.status_patches) == 2
    cond = conditions(fake)[CONDITION_TYPE]
    assert (cond["status"], cond["reason"]) == ("False", "WireGuardDown")
    # The heartbeat: within 1800 s +- 10 %.
    clock.t += 1619
    w.step(core)
    assert len(fake.status_patches) == 2
    clock.t += 362
    w.step(core)
    assert len(fake.status_patches) == 3


def test_min_interval_coalesces_flapping(fake, settings, core):
    fake.apply(make_node("w1"))
    clock = Clock()
    w = writer(settings, clock=clock, min_interval=10)
    w.submit(READY)
    w.step(core)
    for cond in (DOWN, READY, DOWN):
        clock.t += 1
        w.submit(cond)
        w.step(core)
    assert len(fake.status_patches) == 1  # within 10 s of the first write
    clock.t += 10
    w.step(core)
    assert len(fake.status_patches) == 2 and conditions(fake)[CONDITION_TYPE]["status"] == "False"


def test_transition_time_moves_with_status_only(fake, settings, core):
    fake.apply(make_node("w1"))
    clock, wall = Clock(), Clock()
    w = writer(settings, clock=clock, wall=wall, min_interval=0)
    w.submit(READY)
    w.step(core)
    first = conditions(fake)[CONDITION_TYPE]["lastTransitionTime"]
    wall.t += 100
    w.submit(Condition("True", "PeersUnreachable", "w3"))
    w.step(core)
    assert conditions(fake)[CONDITION_TYPE]["lastTransitionTime"] == first
    wall.t += 100
    w.submit(DOWN)
    w.step(core)
    assert conditions(fake)[CONDITION_TYPE]["lastTransitionTime"] != first


def test_restart_keeps_the_transition_time_and_sends_no_event(fake, settings, core):
    fake.apply(make_node("w1"))
    wall = Clock()
    w = writer(settings, wall=wall)
    w.submit(READY)
    w.step(core)
    first = conditions(fake)[CONDITION_TYPE]["lastTransitionTime"]
    wall.t += 500
    again = writer(settings, wall=wall)
    again.submit(READY)
    again.step(core)
    assert len(fake.status_patches) == 2  # written at start
    cond = conditions(fake)[CONDITION_TYPE]
    assert cond["lastTransitionTime"] == first and cond["lastHeartbeatTime"] != first
    assert fake.events == []


def test_events_on_transitions_rate_limited(fake, settings, core):
    fake.apply(make_node("w1"))
    clock = Clock()
    w = writer(settings, clock=clock, min_interval=0, event_interval=60)
    w.submit(READY)
    w.step(core)
    assert fake.events == []  # the first write is no transition
    for cond in (DOWN, READY):
        clock.t += 1
        w.submit(cond)
        w.step(core)
    assert [e["reason"] for e in fake.events] == ["WireGuardDown"]  # the second is suppressed
    ev = fake.events[0]
    assert ev["involvedObject"]["kind"] == "Node" and ev["involvedObject"]["name"] == "w1"
    assert ev["involvedObject"]["uid"] == fake.nodes.get("w1")["metadata"]["uid"]
    assert ev["type"] == "Warning" and ev["metadata"]["namespace"] == "default"
    clock.t += 61
    w.submit(DOWN)
    w.step(core)
    assert [e["reason"] for e in fake.events] == ["WireGuardDown", "WireGuardDown"]


def test_conflicts_are_retried(fake, settings, core):
    fake.apply(make_node("w1"))
    fake.fail_status_next(2, 409)
    w = writer(settings)
    w.submit(READY)
    for _ in range(2):
        with pytest.raises(KubernetesError, match="409"):
            w.step(core)
    w.step(core)
    assert conditions(fake)[CONDITION_TYPE]["reason"] == "EncryptionReady"


def test_thread_retries_with_backoff_through_conflicts_and_an_outage(fake, settings):
    fake.apply(make_node("w1"))
    fake.fail_status_next(2, 409)
    w = NodeConditionWriter(
        dataclasses.replace(settings, node_name="w1"),
        CONDITION_TYPE,
        Metrics(),
        min_interval=0,
        backoff=Backoff(initial=0.05, maximum=0.2, jitter=0.2),
    )
    stop = threading.Event()
    t = threading.Thread(target=w.run, args=(stop,), daemon=True)
    t.start()
    try:
        w.submit(READY)
        wait_for(lambda: w.writes == 1, what="the first write after two conflicts")
        assert (
            w.metrics.registry.get_sample_value(
                "nodecryptor_node_condition_writes_total", {"result": "error"}
            )
            == 2
        )
        fake.refuse_connections()
        submitted = threading.Event()

        def submit():
            w.submit(DOWN)  # never blocks, whatever the API does
            submitted.set()

        threading.Thread(target=submit, daemon=True).start()
        assert submitted.wait(1)
        wait_for(lambda: w.failures >= 2, what="failed attempts during the outage")
        fake.accept_connections()
        wait_for(lambda: w.writes == 2, timeout=10, what="the write after the outage")
        assert conditions(fake)[CONDITION_TYPE]["reason"] == "WireGuardDown"
    finally:
        stop.set()
        w.submit(READY)  # wake it
        t.join(5)
    assert not t.is_alive()


def test_read_node_conditions(fake, settings, core):
    fake.apply(make_node("w1"))
    fake.apply(make_node("w2"))
    w = writer(settings)
    w.submit(DOWN)
    w.step(core)
    got = read_node_conditions(settings, CONDITION_TYPE)
    assert [n["node"] for n in got] == ["w1", "w2"]
    assert got[0]["condition"]["reason"] == "WireGuardDown" and got[1]["condition"] is None
