"""CiliumNodeSync against the fake API server over real HTTP with the official client:
list, watch, bookmarks, 410 handling, broken and stalled connections, errors and outages."""

from __future__ import annotations

import ipaddress
import time

import pytest

from nodecryptor.cluster import client as k8s_client
from nodecryptor.cluster.k8s_errors import ApiForbidden, ApiGone, ApiUnavailable, KubeConfigError
from nodecryptor.cluster.pages import LIST_ATTEMPTS
from nodecryptor.cluster.reads import snapshot_once
from nodecryptor.core.backoff import Backoff
from nodecryptor.policy.ciliumnode import WG_PUBKEY_ANNOTATION, parse_ciliumnode
from nodecryptor_testkit.fakeapi import make_ciliumnode
from nodecryptor_testkit.lab.kubeapi import KubeApi
from nodecryptor_testkit.wait import wait_for

from k8s_support import TOKEN, require_openssl, node, restarts, with_settings
from k8s_support import fake, kubeconfig, run_sync, settings  # noqa: F401 - pytest fixtures


def names(store) -> list[str]:
    return sorted(store.snapshot())


def requests_seen(fake) -> list[str]:
    """The fake's request log as "list" and "watch" words, in order (other requests left
    out), so a test asserts on what reached the server, not on the client's counters."""
    return [
        "watch" if "watch=" in path else "list"
        for method, path in fake.cluster.requests
        if method == "GET" and "/ciliumnodes" in path
    ]


def test_paginated_list_of_1200_objects(fake, settings, run_sync):
    for i in range(1200):
        fake.apply(node(i))
    r = run_sync(with_settings(settings, list_page_size=100))
    assert len(r.store) == 1200
    pages = [p for m, p in fake.cluster.requests if m == "GET" and "watch" not in p]
    assert len(pages) == 12 and all("limit=100" in p for p in pages)
    assert sum("continue=" in p for p in pages) == 11
    info = r.store.snapshot()["n01199"]
    assert info.pod_cidrs == (ipaddress.ip_network("10.4.175.0/24"),)
    assert r.metrics.registry.get_sample_value("nodecryptor_last_sync_timestamp_seconds") > 0


def test_watch_add_modify_delete(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(settings)
    assert names(r.store) == ["n00001"]
    fake.apply(node(2))
    wait_for(lambda: names(r.store) == ["n00001", "n00002"], what="ADDED")
    moved = node(2)
    moved["spec"]["addresses"] = [{"type": "InternalIP", "ip": "192.0.2.7"}]
    fake.apply(moved)
    wait_for(
        lambda: (
            r.store.snapshot()["n00002"].addresses
            == (("InternalIP", ipaddress.ip_address("192.0.2.7")),)
        ),
        what="MODIFIED",
    )
    fake.delete("n00001")
    wait_for(lambda: names(r.store) == ["n00002"], what="DELETED")
    assert r.sync.lists == 1  # all of it through the watch
    assert r.sync.resource_version == str(fake.resource_version)


def test_bookmarks_advance_the_resource_version(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(settings)
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    fake.advance(50)  # writes elsewhere in the cluster: no CiliumNode event
    fake.send_bookmark()
    wait_for(lambda: r.sync.resource_version == str(fake.resource_version), what="bookmark")
    # Thanks to the bookmark, a history compacted up to now does not force a new list.
    fake.compact()
    fake.drop_watches()
    fake.apply(node(2))
    wait_for(lambda: "n00002" in r.store.snapshot(), what="event after reconnect")
    assert r.sync.lists == 1
    assert restarts(r.metrics, "expired") == 0


def test_410_on_watch_relists_and_converges(fake, settings, run_sync):
    fake.apply(node(1))
    fake.apply(node(2))
    r = run_sync(settings)
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    fake.refuse_connections()  # changes made while we cannot watch...
    fake.delete("n00001")
    fake.apply(node(3))
    fake.compact()  # ...and fell out of the history
    fake.accept_connections()
    wait_for(lambda: names(r.store) == ["n00002", "n00003"], what="convergence")
    assert restarts(r.metrics, "expired") == 1
    assert r.sync.lists == 2
    # On the wire: list, watch, the watch answered 410, a second list, then a new watch.
    seen = requests_seen(fake)
    assert seen.count("list") == 2, seen
    second = seen.index("list", 1)
    assert "watch" in seen[1:second], seen


def test_injected_410_error_event(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(settings)
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    before = requests_seen(fake)
    assert before == ["list", "watch"], before
    fake.expire_next_watch()
    fake.drop_watches()
    wait_for(lambda: r.sync.lists == 2, what="re-list after 410")
    fake.apply(node(2))
    wait_for(lambda: "n00002" in r.store.snapshot(), what="watch after re-list")
    # The server saw the re-watch answered with 410, then a list, then a watch again.
    after = requests_seen(fake)[len(before) :]
    assert after[:3] == ["watch", "list", "watch"], after


def test_stale_continue_token_restarts_the_list(fake, settings, run_sync):
    for i in range(30):
        fake.apply(node(i))
    fake.expire_next_continue(1)
    r = run_sync(with_settings(settings, list_page_size=10))
    assert len(r.store) == 30
    assert restarts(r.metrics, "list-expired") == 1
    first_pages = [p for m, p in fake.cluster.requests if "watch" not in p]
    assert len(first_pages) == 2 + 3  # page 1, expired page 2, then three pages afresh
    # snapshot_once (nodecryptor plan) starts over too.
    fake.expire_next_continue(1)
    nodes, _ = snapshot_once(with_settings(settings, list_page_size=10))
    assert len(nodes) == 30


def test_a_list_starts_over_until_its_attempts_run_out(fake, settings, run_sync):
    """One policy for a list whose continue tokens keep expiring, in the agent and in the
    commands: it starts over at once up to LIST_ATTEMPTS times, then reports the 410."""
    for i in range(30):
        fake.apply(node(i))
    paged = with_settings(settings, list_page_size=10)
    fake.expire_next_continue(LIST_ATTEMPTS - 1)
    r = run_sync(paged)
    assert len(r.store) == 30 and r.sync.lists == 1
    assert restarts(r.metrics, "list-expired") == LIST_ATTEMPTS - 1
    assert restarts(r.metrics, "expired") == 0  # never fell back to the loop's re-list
    fake.expire_next_continue(LIST_ATTEMPTS - 1)
    nodes, _ = snapshot_once(paged)
    assert len(nodes) == 30
    fake.expire_next_continue(LIST_ATTEMPTS)
    with pytest.raises(ApiGone, match="listing CiliumNodes"):
        snapshot_once(paged)


def test_dropped_connection_resumes_without_relisting(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(settings)
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    fake.drop_watches()
    fake.apply(node(2))
    wait_for(lambda: "n00002" in r.store.snapshot(), what="event after reconnect")
    assert restarts(r.metrics, "dropped") == 1
    assert r.sync.lists == 1


def test_frozen_watch_times_out_and_recovers(fake, settings, run_sync):
    # Server-side timeout 1 s; the client reads with 1 + 0.5 s and must notice the silence.
    s = with_settings(settings, watch_timeout_seconds=1)
    fake.apply(node(1))
    r = run_sync(s)
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    fake.freeze_watches()
    fake.apply(node(2))
    started = time.monotonic()
    wait_for(lambda: restarts(r.metrics, "stalled") >= 1, timeout=5, what="read timeout")
    assert time.monotonic() - started < 4
    assert "n00002" not in r.store.snapshot()
    fake.freeze_watches(False)
    wait_for(lambda: "n00002" in r.store.snapshot(), what="recovery")


def test_stalled_watch_request_times_out_and_recovers(fake, settings, run_sync):
    s = with_settings(settings, watch_timeout_seconds=1)
    fake.apply(node(1))
    fake.stall_next(1, kind="watch")
    r = run_sync(s)
    fake.apply(node(2))
    wait_for(lambda: "n00002" in r.store.snapshot(), timeout=6, what="recovery")
    assert restarts(r.metrics, "stalled") == 1
    fake.release_stalls()


def test_stalled_list_times_out_and_recovers(fake, settings, run_sync):
    fake.apply(node(1))
    fake.stall_next(1, kind="list")
    started = time.monotonic()
    r = run_sync(with_settings(settings, request_timeout_seconds=0.3))
    assert time.monotonic() - started < 4
    assert names(r.store) == ["n00001"] and restarts(r.metrics, "stalled") == 1
    fake.release_stalls()


def test_watch_ends_at_server_timeout_and_reconnects(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(with_settings(settings, watch_timeout_seconds=1))
    wait_for(lambda: restarts(r.metrics, "timeout") >= 1, timeout=4, what="server timeout")
    fake.apply(node(2))
    wait_for(lambda: "n00002" in r.store.snapshot(), what="event on the new watch")
    assert r.sync.lists == 1


def test_wrong_token_is_reported_and_retried(fake, settings, run_sync, tmp_path):
    fake.apply(node(1))
    bad = fake.write_kubeconfig(str(tmp_path / "bad"), token="not-the-token")
    with pytest.raises(ApiForbidden, match="401"):
        snapshot_once(with_settings(settings, kubeconfig=bad))
    r = run_sync(with_settings(settings, kubeconfig=bad), wait_synced=False)
    wait_for(lambda: restarts(r.metrics, "forbidden") >= 2, what="retries")
    assert not r.store.synced.is_set() and len(r.store) == 0


def test_5xx_burst_backs_off_then_converges(fake, settings, run_sync):
    fake.apply(node(1))
    fake.fail_next(5, 503)
    started = time.monotonic()
    r = run_sync(settings, backoff=Backoff(initial=0.05, maximum=1.0, jitter=0.0))
    elapsed = time.monotonic() - started
    assert names(r.store) == ["n00001"]
    assert restarts(r.metrics, "server-error") == 5
    # Five failures waited 0.05 + 0.1 + 0.2 + 0.4 + 0.8 s: the delay doubles each time.
    assert 1.5 <= elapsed < 8, elapsed
    attempts = [p for m, p in fake.cluster.requests if "watch" not in p]
    assert len(attempts) == 6


def test_backoff_is_bounded_and_jittered():
    import random

    b = Backoff(initial=1, maximum=8, jitter=0.5)
    rng = random.Random(7)
    delays = [b.delay(n, rng) for n in range(1, 10)]
    assert all(d <= 8 for d in delays)
    assert all(0.5 * min(8, 2 ** (n - 1)) <= d for n, d in enumerate(delays, 1))
    assert len(set(delays)) == len(delays)


def test_api_down_keeps_the_last_state_then_converges(fake, settings, run_sync):
    for i in range(3):
        fake.apply(node(i))
    r = run_sync(settings)
    before = r.store.snapshot()
    fake.refuse_connections()
    fake.delete("n00000")
    fake.apply(node(7))
    wait_for(lambda: restarts(r.metrics, "unreachable") >= 3, what="failed reconnects")
    assert r.store.snapshot() == before  # an outage is not an empty cluster
    fake.accept_connections()
    wait_for(lambda: names(r.store) == ["n00001", "n00002", "n00007"], what="convergence")


def test_periodic_resync_relists(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(with_settings(settings, resync_seconds=1))
    wait_for(lambda: r.sync.lists >= 3, timeout=5, what="resyncs")
    assert restarts(r.metrics, "resync") >= 2


def test_stop_is_prompt_during_a_long_watch(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(with_settings(settings, watch_timeout_seconds=300))
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    assert r.halt() < 2.0  # not the 300 s read timeout


def test_malformed_objects_are_partly_applied(fake, settings, run_sync):
    good = node(1)
    bad = make_ciliumnode("bad", ipv4="10.9.0.1", pod_cidrs=["10.99.0.0/24"])
    bad["spec"]["addresses"] += [
        {"type": "InternalIP", "ip": "300.1.1.1"},
        {"type": "InternalIP", "ip": 17},
        "not-a-map",
    ]
    bad["spec"]["ipam"]["podCIDRs"] += ["10.98.0.0/33", None]
    bad["metadata"]["labels"]["x"] = 5
    nospec = make_ciliumnode("nospec", ipv4="10.9.0.2")
    del nospec["spec"]
    wrongspec = make_ciliumnode("wrongspec")
    wrongspec["spec"] = ["not", "a", "map"]
    for obj in (good, bad, nospec, wrongspec):
        fake.apply(obj)
    r = run_sync(settings)
    nodes = r.store.snapshot()
    assert sorted(nodes) == ["bad", "n00001", "nospec", "wrongspec"]
    assert nodes["bad"].addresses == (
        ("InternalIP", ipaddress.ip_address("10.9.0.1")),
        ("CiliumInternalIP", ipaddress.ip_address("10.99.0.1")),
    )
    assert nodes["bad"].pod_cidrs == (ipaddress.ip_network("10.99.0.0/24"),)
    assert nodes["nospec"].addresses == () and nodes["wrongspec"].pod_cidrs == ()
    assert nodes["n00001"] == parse_ciliumnode(node(1))[0]

    def rejected(field):
        return (
            r.metrics.registry.get_sample_value(
                "nodecryptor_invalid_entries_total", {"field": field}
            )
            or 0
        )

    assert rejected("spec.addresses") == 3
    assert rejected("spec.ipam.podCIDRs") == 2
    assert rejected("metadata.labels") == 1
    assert rejected("spec") == 1
    # A re-list of the same versions neither logs nor counts again; a new version does.
    fake.expire_next_watch()
    fake.drop_watches()
    wait_for(lambda: r.sync.lists == 2, what="re-list")
    assert rejected("spec.addresses") == 3
    bad["metadata"]["annotations"]["touch"] = "1"
    fake.apply(bad)
    wait_for(lambda: rejected("spec.addresses") == 6, what="new version counted")


def test_in_cluster_configuration(monkeypatch, tmp_path):
    require_openssl()
    from nodecryptor.core.settings import Settings
    from nodecryptor_testkit.fakeapi import FakeApiServer

    with FakeApiServer(token="sa-token", tls=True, objects=[node(1)]) as tls_fake:
        sa = tmp_path / "serviceaccount"
        sa.mkdir()
        (sa / "token").write_text("sa-token")  # the kubelet writes no newline
        (sa / "ca.crt").write_bytes(tls_fake.ca_pem)
        monkeypatch.setattr(k8s_client, "SERVICE_ACCOUNT_DIR", str(sa))
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(tls_fake.port))
        nodes, _ = snapshot_once(Settings(kubeconfig=None))
        assert sorted(nodes) == ["n00001"]

        (sa / "token").unlink()
        with pytest.raises(KubeConfigError, match="in-cluster"):
            snapshot_once(Settings(kubeconfig=None))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
        with pytest.raises(KubeConfigError, match="KUBERNETES_SERVICE_HOST"):
            snapshot_once(Settings(kubeconfig=None))


def test_unreachable_api_is_a_clear_error(settings, fake):
    fake.refuse_connections()
    with pytest.raises(ApiUnavailable, match=f"cannot reach the API server {fake.url}"):
        snapshot_once(settings)


def test_missing_kubeconfig_names_the_flag(settings, tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(KubeConfigError, match=f"--kubeconfig '{missing}'"):
        snapshot_once(with_settings(settings, kubeconfig=missing))


def test_key_published_by_merge_patch_reaches_the_store(fake, settings, run_sync):
    """Cilium publishes a node's new WireGuard key as a merge patch of one annotation (the
    lab's stand-in does the same); the watch must deliver it."""
    fake.apply(node(1))
    r = run_sync(settings)
    key = "Zm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm9vYmFyZm8="
    KubeApi(fake.url, token=TOKEN).annotate("n00001", WG_PUBKEY_ANNOTATION, key)
    assert fake.get("n00001")["metadata"]["annotations"][WG_PUBKEY_ANNOTATION] == key
    wait_for(lambda: r.store.snapshot()["n00001"].wg_public_key == key, what="key in store")


def test_unloadable_configuration_is_retried_not_fatal(fake, settings, run_sync, tmp_path):
    fake.apply(node(1))
    later = tmp_path / "appears-later"
    r = run_sync(with_settings(settings, kubeconfig=str(later)), wait_synced=False)
    wait_for(lambda: restarts(r.metrics, "config") >= 2, what="config retries")
    assert r.thread.is_alive() and not r.store.synced.is_set()
    fake.write_kubeconfig(str(later))
    assert r.store.synced.wait(5)
    assert names(r.store) == ["n00001"]


@pytest.mark.parametrize("initial_rv,cause", [(0, "too-large"), (10**12, "expired")])
def test_replaced_api_server_forces_a_relist(fake, settings, run_sync, initial_rv, cause):
    """A new API server on the same address whose versions are behind ours (504 Too large
    resource version) or ahead with an empty history (410): either way, list again."""
    from nodecryptor_testkit.fakeapi import FakeApiServer

    for i in range(5):
        fake.apply(node(i))
    r = run_sync(settings)
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    fake.stop()
    with FakeApiServer(
        port=fake.port, token=fake.token, initial_rv=initial_rv, objects=[node(1), node(9)]
    ) as replacement:
        wait_for(lambda: names(r.store) == ["n00001", "n00009"], what="convergence")
        assert restarts(r.metrics, cause) == 1 and r.sync.lists == 2
        replacement.apply(node(10))
        wait_for(lambda: "n00010" in r.store.snapshot(), what="watch on the new server")


def test_watch_socket_has_tcp_keepalive(fake, settings, run_sync):
    import socket

    fake.apply(node(1))
    r = run_sync(settings)
    wait_for(lambda: r.sync._response is not None, what="the watch")
    sock = r.sync._response.connection.sock
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
