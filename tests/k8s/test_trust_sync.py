"""The trusted inputs through the real protocol: whole Nodes (addresses, pod CIDRs), Cilium's
cilium-config ConfigMap (one name, by field selector) and CiliumPodIPPools reach the store, and
an object over the size bound arriving by watch is dropped whole and reported."""

from __future__ import annotations

import ipaddress
import threading

from nodecryptor.cluster.pages import MAX_OBJECT_BYTES
from nodecryptor.cluster.poolsync import CiliumConfigSync, PodIPPoolSync
from nodecryptor.cluster.resources import NodeRoleSync
from nodecryptor.cluster.store import Store
from nodecryptor.cluster.sync import CiliumNodeSync
from nodecryptor.core.backoff import Backoff
from nodecryptor.observe.metrics import Metrics
from nodecryptor_testkit.fakeapi import make_cilium_config, make_pod_ip_pool
from nodecryptor_testkit.wait import wait_for

from k8s_support import kube_node, node
from k8s_support import fake, kubeconfig, settings  # noqa: F401 - pytest fixtures

net = ipaddress.ip_network


def run_syncs(settings, store, metrics):
    fast = dict(backoff=Backoff(initial=0.05, maximum=0.2, jitter=0.2), read_timeout_margin=0.5)
    syncs = [
        CiliumNodeSync(settings, store, metrics, **fast),
        NodeRoleSync(settings, store, metrics, **fast),
        CiliumConfigSync(settings, store, metrics, **fast),
        PodIPPoolSync(settings, store, metrics, **fast),
    ]
    stop = threading.Event()
    threads = [threading.Thread(target=s.run, args=(stop,), daemon=True) for s in syncs]
    for t in threads:
        t.start()
    return stop, threads


def test_nodes_pools_and_an_oversized_object(fake, settings):
    fake.apply(node(1))
    fake.apply(kube_node(1, pod_cidrs=["10.0.1.0/24"]))
    fake.apply(kube_node(2))  # a Node whose CiliumNode does not exist (yet)
    fake.apply(make_cilium_config(ipv4="10.0.0.0/16 10.1.0.0/16"))
    other = make_cilium_config(ipv4="172.16.0.0/12")
    other["metadata"]["name"] = "not-cilium"  # never read: the field selector names one
    fake.apply(other)
    store, metrics = Store(), Metrics()
    stop, threads = run_syncs(settings, store, metrics)
    try:
        assert store.synced.wait(10)
        wait_for(
            lambda: store.pools().cidrs == (net("10.0.0.0/16"), net("10.1.0.0/16")),
            what="pools from cilium-config",
        )
        assert metrics.pod_pools_known._value.get() == 1
        snap = store.snapshot()
        assert snap["n00001"].node_pod_cidrs == (net("10.0.1.0/24"),)
        assert snap["n00002"].has_ciliumnode is False
        assert [a for _, a in snap["n00002"].node_addresses][0] == ipaddress.ip_address(
            "172.16.0.2"
        )
        # Multi-pool IPAM: a CiliumPodIPPool adds its CIDRs.
        fake.pod_ip_pools.apply(make_pod_ip_pool("extra", ipv4=["10.9.0.0/16"]))
        wait_for(lambda: net("10.9.0.0/16") in store.pools().cidrs, what="CiliumPodIPPool")
        # The ConfigMap goes: its CIDRs with it.
        fake.configmaps.delete("cilium-config")
        wait_for(lambda: store.pools().cidrs == (net("10.9.0.0/16"),), what="ConfigMap gone")
        # n00001's CiliumNode grows past the bound by a watch event: dropped whole, reported.
        bloated = node(1)
        bloated["spec"]["ipam"]["pool"] = {
            f"10.0.{i // 256}.{i % 256}": {"owner": "x" * 64} for i in range(MAX_OBJECT_BYTES // 80)
        }
        fake.apply(bloated)
        wait_for(
            lambda: store.snapshot()["n00001"].has_ciliumnode is False,
            what="oversized object dropped",
        )
        assert metrics.rejected_claims.labels(reason="oversized")._value.get() == 1
    finally:
        stop.set()
        for t in threads:
            t.join(10)
