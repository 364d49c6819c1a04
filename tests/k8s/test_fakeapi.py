"""The fake API server speaks the kube-apiserver protocol: checked on the wire (urllib) and
through nodecryptor.cluster (the official client), including its fault injection and the
standalone process the lab runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request

import pytest

import nodecryptor
from nodecryptor.cluster.reads import snapshot_once
from nodecryptor_testkit.fakeapi import COLLECTION, FakeApiServer, make_ciliumnode
from nodecryptor_testkit.fakeapi.objects import EXEMPTION_COLLECTION

from k8s_support import require_openssl, TOKEN, node, with_settings
from k8s_support import fake, kubeconfig, settings  # noqa: F401 - pytest fixtures


def call(
    fake,
    path: str,
    method: str = "GET",
    body=None,
    token: str | None = TOKEN,
    ctype: str = "application/json",
    timeout: float = 5,
):
    """(status, parsed JSON body) of one request."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(fake.url + path, data=data, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", ctype)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def watch_lines(fake, query: str, timeout: float = 5) -> list[dict]:
    req = urllib.request.Request(f"{fake.url}{COLLECTION}?watch=true&{query}")
    req.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        assert resp.headers["Transfer-Encoding"] == "chunked"
        return [json.loads(line) for line in resp.read().splitlines() if line.strip()]


def test_requests_without_the_token_get_401_status(fake):
    for path in ("/version", "/apis", COLLECTION, COLLECTION + "/x"):
        status, body = call(fake, path, token=None)
        assert status == 401, path
        assert body["kind"] == "Status" and body["reason"] == "Unauthorized"
    status, _ = call(fake, "/version", token="wrong")
    assert status == 401


def test_discovery_documents(fake):
    assert call(fake, "/version")[1]["major"] == "1"
    assert call(fake, "/api")[1]["versions"] == ["v1"]
    groups = call(fake, "/apis")[1]
    assert groups["kind"] == "APIGroupList"
    assert [g["name"] for g in groups["groups"]] == ["cilium.io"]
    assert call(fake, "/apis/cilium.io")[1]["preferredVersion"]["version"] == "v2"
    resources = call(fake, "/apis/cilium.io/v2")[1]
    (crd,) = resources["resources"]
    assert (crd["name"], crd["kind"], crd["namespaced"]) == ("ciliumnodes", "CiliumNode", False)
    assert {"list", "watch", "patch"} <= set(crd["verbs"])


def test_crud_and_resource_versions(fake):
    status, created = call(fake, COLLECTION, "POST", make_ciliumnode("a", ipv4="10.0.0.1"))
    assert status == 201
    rv1 = int(created["metadata"]["resourceVersion"])
    assert created["metadata"]["uid"] and created["metadata"]["creationTimestamp"]
    assert call(fake, COLLECTION, "POST", make_ciliumnode("a"))[0] == 409

    patch = {"metadata": {"annotations": {"network.cilium.io/wg-pub-key": "k" * 43 + "="}}}
    status, patched = call(
        fake, COLLECTION + "/a", "PATCH", patch, ctype="application/merge-patch+json"
    )
    assert status == 200 and int(patched["metadata"]["resourceVersion"]) > rv1
    assert patched["metadata"]["annotations"]["network.cilium.io/wg-pub-key"] == "k" * 43 + "="
    # Custom resources take no strategic merge patch.
    assert (
        call(
            fake, COLLECTION + "/a", "PATCH", patch, ctype="application/strategic-merge-patch+json"
        )[0]
        == 415
    )
    # null removes a key (RFC 7386).
    removal = {"metadata": {"annotations": {"network.cilium.io/wg-pub-key": None}}}
    _, patched = call(
        fake, COLLECTION + "/a", "PATCH", removal, ctype="application/merge-patch+json"
    )
    assert "network.cilium.io/wg-pub-key" not in patched["metadata"]["annotations"]

    stale = dict(created)  # carries the first resourceVersion
    assert call(fake, COLLECTION + "/a", "PUT", stale)[0] == 409
    fresh = call(fake, COLLECTION + "/a")[1]
    fresh["spec"]["addresses"] = [{"type": "InternalIP", "ip": "10.0.0.2"}]
    status, put = call(fake, COLLECTION + "/a", "PUT", fresh)
    assert status == 200 and put["metadata"]["uid"] == created["metadata"]["uid"]

    assert call(fake, COLLECTION + "/a", "DELETE")[0] == 200
    status, body = call(fake, COLLECTION + "/a")
    assert status == 404 and body["reason"] == "NotFound"
    events = watch_lines(fake, f"resourceVersion={rv1}&timeoutSeconds=1")
    assert [e["type"] for e in events] == ["MODIFIED", "MODIFIED", "MODIFIED", "DELETED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 4


def test_a_write_that_changes_nothing_keeps_the_version(fake):
    obj = fake.apply(make_ciliumnode("a", ipv4="10.0.0.1"))
    again = fake.apply(obj)
    assert again["metadata"]["resourceVersion"] == obj["metadata"]["resourceVersion"]


def test_paginated_list_is_a_consistent_snapshot(fake):
    for i in range(25):
        fake.apply(node(i))
    status, first = call(fake, f"{COLLECTION}?limit=10")
    assert status == 200 and len(first["items"]) == 10
    assert first["metadata"]["remainingItemCount"] == 15
    fake.delete("n00020")  # after the snapshot: the continued list still shows it
    names = [o["metadata"]["name"] for o in first["items"]]
    token = first["metadata"]["continue"]
    while token:
        _, page = call(fake, f"{COLLECTION}?limit=10&continue={token}")
        assert page["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
        names += [o["metadata"]["name"] for o in page["items"]]
        token = page["metadata"].get("continue")
    assert names == [f"n{i:05d}" for i in range(25)]


def test_stale_continue_token_is_410_expired(fake):
    for i in range(5):
        fake.apply(node(i))
    _, first = call(fake, f"{COLLECTION}?limit=2")
    fake.compact()
    status, body = call(fake, f"{COLLECTION}?limit=2&continue={first['metadata']['continue']}")
    assert (status, body["reason"], body["code"]) == (410, "Expired", 410)


def test_watch_from_a_compacted_version_gets_an_error_event(fake):
    fake.apply(node(1))
    fake.apply(node(2))
    fake.compact()
    (event,) = watch_lines(fake, "resourceVersion=1&timeoutSeconds=5")
    assert event["type"] == "ERROR"
    assert (event["object"]["kind"], event["object"]["code"]) == ("Status", 410)
    # From the current version the watch is fine (and ends at timeoutSeconds).
    assert watch_lines(fake, f"resourceVersion={fake.resource_version}&timeoutSeconds=1") == []


def test_history_is_bounded():
    with FakeApiServer(token=TOKEN, history_limit=3) as small:
        for i in range(6):
            small.apply(node(i))
        assert [e["type"] for e in watch_lines(small, "resourceVersion=3&timeoutSeconds=1")] == [
            "ADDED"
        ] * 3
        assert watch_lines(small, "resourceVersion=2&timeoutSeconds=1")[0]["type"] == "ERROR"


def test_watch_without_version_starts_with_the_current_state_and_bookmarks(fake):
    fake.apply(node(1))
    fake.bookmark_interval = 0.2
    events = watch_lines(fake, "allowWatchBookmarks=true&timeoutSeconds=1")
    assert events[0]["type"] == "ADDED"
    assert "BOOKMARK" in {e["type"] for e in events}
    bookmark = next(e for e in events if e["type"] == "BOOKMARK")
    assert bookmark["object"]["metadata"]["resourceVersion"] == str(fake.resource_version)


def test_injected_failures_then_success(fake):
    fake.fail_next(2, 503)
    assert call(fake, "/version")[0] == 503
    status, body = call(fake, COLLECTION)
    assert (status, body["reason"]) == (503, "ServiceUnavailable")
    assert call(fake, COLLECTION)[0] == 200


def test_stalled_request_never_answers(fake):
    fake.stall_next(1, kind="list")
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        call(fake, COLLECTION, timeout=0.3)
    fake.release_stalls()
    assert call(fake, COLLECTION)[0] == 200


def test_refused_connections_then_back_on_the_same_port(fake):
    port = fake.port
    fake.refuse_connections()
    with pytest.raises(urllib.error.URLError) as err:
        call(fake, "/version", timeout=1)
    assert isinstance(err.value.reason, ConnectionRefusedError)
    fake.accept_connections()
    assert fake.port == port and call(fake, "/version")[0] == 200


def test_control_endpoint(fake):
    fake.apply(node(1))
    status, body = call(fake, "/_fake/compact", "POST", {})
    assert status == 200 and body["ok"]
    assert watch_lines(fake, "resourceVersion=0&timeoutSeconds=1")[0]["type"] == "ADDED"
    assert call(fake, "/_fake/nonsense", "POST", {})[0] == 404


def test_control_actions_take_their_arguments(fake):
    """Each remote action reads its own arguments from the JSON body and answers with the
    fields it promises."""
    fake.apply(node(1))
    assert call(fake, "/_fake/fail-next", "POST", {"count": 1, "code": 503})[0] == 200
    assert call(fake, COLLECTION)[0] == 503
    assert call(fake, COLLECTION)[0] == 200
    before = fake.resource_version
    status, body = call(fake, "/_fake/advance", "POST", {"count": 7})
    assert status == 200 and body["resourceVersion"] == str(before + 7)
    assert call(fake, "/_fake/exemptions-installed", "POST", {"installed": False})[0] == 200
    assert call(fake, EXEMPTION_COLLECTION)[0] == 404
    status, body = call(fake, "/_fake/status-patches", "POST", {})
    assert (status, body) == (
        200,
        {"ok": True, "action": "status-patches", "patches": 0, "events": 0},
    )
    assert call(fake, "/_fake/apply", "POST", {"object": "not an object"})[0] == 400
    assert call(fake, "/_fake/stall-next", "POST", {"kind": "sideways"})[0] == 400


def test_tls_kubeconfig_with_the_official_client(tmp_path, settings):
    require_openssl()
    with FakeApiServer(token=TOKEN, tls=True, objects=[node(1), node(2)]) as tls_fake:
        assert tls_fake.url.startswith("https://")
        kc = tls_fake.write_kubeconfig(str(tmp_path / "tls-kubeconfig"))
        nodes, rejections = snapshot_once(with_settings(settings, kubeconfig=kc))
        assert sorted(nodes) == ["n00001", "n00002"] and rejections == []


def test_standalone_process_serves_and_exits_on_sigterm(tmp_path):
    kc = tmp_path / "kc"
    objects = os.path.join(os.path.dirname(nodecryptor.__file__), "examples", "cluster.json")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nodecryptor_testkit.fakeapi",
            "--bind",
            "127.0.0.1:0",
            "--objects",
            objects,
            "--token",
            "t0k",
            "--write-kubeconfig",
            str(kc),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        ready = proc.stdout.readline()
        assert ready.startswith("ready url=http://127.0.0.1:"), ready
        from nodecryptor.core.settings import Settings

        nodes, _ = snapshot_once(Settings(kubeconfig=str(kc)))
        assert sorted(nodes) == ["cp1", "w1", "w2", "w3"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_watch_from_a_future_version_is_504_too_large(fake):
    fake.apply(node(1))
    status, body = call(fake, f"{COLLECTION}?watch=true&resourceVersion=999")
    assert (status, body["reason"]) == (504, "Timeout")
    assert body["details"]["causes"][0]["reason"] == "ResourceVersionTooLarge"


def test_initial_resource_version():
    with FakeApiServer(token=TOKEN, initial_rv=5000, objects=[node(1)]) as f:
        assert f.get("n00001")["metadata"]["resourceVersion"] == "5001"
        assert watch_lines(f, "resourceVersion=4999&timeoutSeconds=1")[0]["type"] == "ERROR"


def test_fake_serves_encryptionexemptions_and_can_pretend_the_crd_is_missing(fake):
    from nodecryptor_testkit.fakeapi import make_exemption

    path = "/apis/nodecryptor.io/v1alpha1/encryptionexemptions"
    status, created = call(fake, path, "POST", make_exemption("a", {}, [{"port": 1}]))
    assert status == 201 and created["kind"] == "EncryptionExemption"
    rv = created["metadata"]["resourceVersion"]
    status, listed = call(fake, path)
    assert status == 200 and [o["metadata"]["name"] for o in listed["items"]] == ["a"]
    changed = dict(created, spec={"nodeSelector": {}, "ports": [{"port": 2}]})
    status, replaced = call(fake, f"{path}/a", "PUT", changed)
    assert status == 200 and replaced["metadata"]["resourceVersion"] != rv
    req = urllib.request.Request(
        f"{fake.url}{path}?watch=true&resourceVersion={rv}&timeoutSeconds=1"
    )
    req.add_header("Authorization", f"Bearer {TOKEN}")
    with urllib.request.urlopen(req, timeout=5) as resp:
        events = [json.loads(line) for line in resp.read().splitlines() if line.strip()]
    assert [e["type"] for e in events] == ["MODIFIED"]
    assert call(fake, f"{path}/a", "DELETE")[0] == 200
    assert call(fake, f"{path}/a")[0] == 404
    # Not installed: the whole resource is 404, without an object name in the Status.
    fake.exemptions_installed = False
    status, body = call(fake, path)
    assert status == 404 and "name" not in (body.get("details") or {})
    # CiliumNodes are unaffected.
    assert call(fake, COLLECTION)[0] == 200
