"""A stalled API server is noticed within the stall threshold (watch_stall_seconds; 55 s by
default, a few seconds here), not after the watch timeout: the watch is re-established from the
last resourceVersion, the store keeps its content meanwhile, and
nodecryptor_k8s_watch_stalls_total counts it. Faults come from the fake API server: a watch
frozen mid-stream, and a whole server that accepts connections but never answers."""

from __future__ import annotations

import urllib.parse

from nodecryptor.core.settings import Settings
from nodecryptor_testkit.wait import wait_for

from k8s_support import node, restarts, with_settings
from k8s_support import fake, kubeconfig, run_sync, settings  # noqa: F401 - pytest fixtures

STALL = 3.0


def stalls(metrics) -> float:
    return metrics.registry.get_sample_value("nodecryptor_k8s_watch_stalls_total") or 0.0


def watch_timeouts(fake) -> list[int]:
    """timeoutSeconds of every watch request the fake received."""
    out = []
    for method, path in fake.cluster.requests:
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(path).query)
        if method == "GET" and query.get("watch", [""])[0].lower() in ("true", "1"):
            out.append(int(query["timeoutSeconds"][0]))
    return out


def test_default_watch_ends_before_the_stall_threshold(fake, settings, run_sync):
    """With the defaults, the server is asked to end each watch a few seconds before the
    stall threshold, so a quiet healthy watch always sends its end (and kube-apiserver its
    pre-deadline bookmark) before silence could be taken for a stall."""
    defaults = Settings()
    assert defaults.watch_stall_seconds < 60
    fake.apply(node(1))
    r = run_sync(
        with_settings(
            settings,
            watch_timeout_seconds=defaults.watch_timeout_seconds,
            watch_stall_seconds=defaults.watch_stall_seconds,
        ),
        read_timeout_margin=5.0,
    )
    wait_for(lambda: watch_timeouts(fake), what="the watch request")
    (timeout,) = watch_timeouts(fake)
    assert 0 < timeout <= defaults.watch_stall_seconds - 5
    assert r.halt() < 5


def test_watch_frozen_mid_stream_is_noticed_and_resumed(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(with_settings(settings, watch_timeout_seconds=300, watch_stall_seconds=STALL))
    wait_for(lambda: fake.open_watches == 1, what="the watch")
    fake.apply(node(2))
    wait_for(lambda: "n00002" in r.store.snapshot(), what="an event before the freeze")
    assert stalls(r.metrics) == 0

    fake.freeze_watches()
    fake.apply(node(3))  # not delivered while frozen
    wait_for(lambda: stalls(r.metrics) >= 1, timeout=4 * STALL, what="the stall noticed")
    assert sorted(r.store.snapshot()) == ["n00001", "n00002"]  # state kept
    assert restarts(r.metrics, "stalled") == stalls(r.metrics)

    fake.freeze_watches(False)
    wait_for(lambda: "n00003" in r.store.snapshot(), timeout=4 * STALL, what="resumed watch")
    assert r.sync.lists == 1  # resumed from the resourceVersion, not listed again


def test_server_that_accepts_but_never_answers(fake, settings, run_sync):
    fake.apply(node(1))
    r = run_sync(with_settings(settings, watch_timeout_seconds=300, watch_stall_seconds=STALL))
    wait_for(lambda: fake.open_watches == 1, what="the watch")

    fake.freeze()  # the open watch goes silent, and every new request hangs unanswered
    fake.apply(node(2))
    wait_for(
        lambda: stalls(r.metrics) >= 2,
        timeout=6 * STALL,
        what="the frozen watch and the unanswered new watch request both noticed",
    )
    assert sorted(r.store.snapshot()) == ["n00001"]  # an outage is not an empty cluster
    assert r.thread.is_alive() and r.sync.alive()[0]

    fake.freeze(False)
    wait_for(lambda: "n00002" in r.store.snapshot(), timeout=6 * STALL, what="recovery")
    assert r.sync.lists == 1


def test_sync_liveness_follows_its_heartbeat(settings):
    from nodecryptor.cluster.sync import CiliumNodeSync
    from nodecryptor.cluster.store import Store

    sync = CiliumNodeSync(with_settings(settings, sync_stale_seconds=100), Store())
    assert sync.alive()[0]
    ok, why = sync.alive(now=sync.heartbeat + 101)
    assert not ok and "no progress for 101s" in why


def test_a_raised_stall_threshold_raises_the_liveness_limit(settings):
    """A healthy loop may sit in a silent watch read for the whole stall threshold after a
    connect: liveness must not fail it for that."""
    from nodecryptor.cluster.sync import CiliumNodeSync
    from nodecryptor.cluster.store import Store

    sync = CiliumNodeSync(
        with_settings(
            settings, watch_stall_seconds=300, request_timeout_seconds=15, sync_stale_seconds=150
        ),
        Store(),
    )
    assert sync.alive(now=sync.heartbeat + 470)[0]  # 1.5 x (300 + 15) = 472.5
    assert not sync.alive(now=sync.heartbeat + 473)[0]
