"""Thread-safe store of the cluster as the policy sees it: NodeInfo by node name.

The Kubernetes sync writes it: CiliumNodes (parsed into NodeInfo), the v1 Nodes (labels,
status.addresses, spec.podCIDRs), which the store merges into the NodeInfo of the same name
(``node_labels``, ``node_addresses``, ``node_pod_cidrs``; a Node without a CiliumNode is a
NodeInfo of its own, ``has_ciliumnode`` False), and the cluster's pod pools. The reconcile loop
reads snapshots. ``changed`` wakes the loop.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterable, Mapping

from nodecryptor.core.model import KubeNode, NodeInfo, PodPools
from nodecryptor.policy.pools import combine

Labels = tuple[tuple[str, str], ...]

LIST_CILIUMNODES = "ciliumnodes"
LIST_NODES = "nodes"


class Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parsed: dict[str, NodeInfo] = {}
        """NodeInfo as parsed from the CiliumNodes."""
        self._kube: dict[str, KubeNode] = {}
        """What was read of the v1 Nodes, by name."""
        self._config_cidrs: tuple | None = None
        self._ip_pools: dict[str, tuple] = {}
        self._pools = PodPools(problem="Cilium's configuration not read yet")
        self._nodes: dict[str, NodeInfo] = {}
        """``_parsed`` with the Node labels merged in: what snapshots return."""
        self._exemptions: dict[str, object] = {}
        """Parsed EncryptionExemption policies by name (exemptions.ExemptionPolicy)."""
        self._role_keys: frozenset[str] | None = None
        """Label keys of the Nodes the policy reads (role labels, plus the keys the
        exemption policies' selectors name); None keeps every label. Other Node label changes
        then change no NodeInfo and wake nothing."""
        self._awaiting = {LIST_CILIUMNODES}
        self.changed = threading.Event()
        self.synced = threading.Event()
        """Set after the first complete list of every source the store waits for (CiliumNodes,
        and Nodes after ``expect_node_labels``); the loop applies nothing before it."""
        self.version = 0
        self.last_sync: float = 0.0

    # CiliumNodes

    def replace_all(self, nodes: Iterable[NodeInfo]) -> None:
        """Install the result of a complete list (objects absent from it are gone)."""
        fresh = {n.name: n for n in nodes}
        with self._lock:
            self._parsed = fresh
            self._rebuild()
            self.last_sync = time.time()
            self._listed(LIST_CILIUMNODES)
        self.changed.set()

    def upsert(self, node: NodeInfo) -> None:
        with self._lock:
            self._parsed[node.name] = node
            self._put(node.name)

    def delete(self, name: str) -> None:
        with self._lock:
            self._parsed.pop(name, None)
            self._put(name)

    # v1 Nodes

    def expect_node_labels(self) -> None:
        """Wait for the first list of Nodes too before ``synced``: node addresses and roles
        come from them, so the first pass must not run without."""
        with self._lock:
            if not self.synced.is_set():
                self._awaiting.add(LIST_NODES)

    def set_role_label_keys(self, keys: Iterable[str]) -> None:
        """Keep only these keys (and those the exemption policies' selectors name) of the
        Node labels in the snapshots."""
        with self._lock:
            self._role_keys = frozenset(keys)
            self._rebuild()
        self.changed.set()

    def replace_nodes(self, nodes: Iterable[KubeNode]) -> None:
        """Install what a complete list of Nodes said."""
        with self._lock:
            self._kube = {n.name: n for n in nodes}
            self._rebuild()
            self._listed(LIST_NODES)
        self.changed.set()

    def set_node(self, node: KubeNode) -> None:
        with self._lock:
            if self._kube.get(node.name) != node:
                self._kube[node.name] = node
                self._put(node.name)

    def delete_node(self, name: str) -> None:
        with self._lock:
            if self._kube.pop(name, None) is not None:
                self._put(name)

    # The cluster's pod pools (Cilium's configuration); they never hold up ``synced``.

    def set_cilium_config(self, cidrs: tuple | None) -> None:
        """The cluster-pool CIDRs of the cilium-config ConfigMap; None: it does not exist."""
        with self._lock:
            self._config_cidrs = cidrs
            self._pools_changed()

    def replace_ip_pools(self, pools: Mapping[str, tuple]) -> None:
        """The CIDRs of every CiliumPodIPPool, by name."""
        with self._lock:
            self._ip_pools = dict(pools)
            self._pools_changed()

    def set_ip_pool(self, name: str, cidrs: tuple) -> None:
        with self._lock:
            self._ip_pools[name] = cidrs
            self._pools_changed()

    def delete_ip_pool(self, name: str) -> None:
        with self._lock:
            self._ip_pools.pop(name, None)
            self._pools_changed()

    def _pools_changed(self) -> None:
        pools = combine(self._config_cidrs, self._ip_pools)
        if pools != self._pools:
            self._pools = pools
            self.version += 1
            self.changed.set()

    def pools(self) -> PodPools:
        with self._lock:
            return self._pools

    # EncryptionExemption policies (exemptions.py); they never hold up ``synced``: a
    # missing CRD leaves only the built-in policy.

    def replace_exemptions(self, policies: Iterable) -> None:
        with self._lock:
            fresh = {p.name: p for p in policies}
            if fresh == self._exemptions:
                return
            self._exemptions = fresh
            self._exemptions_changed()

    def upsert_exemption(self, policy) -> None:
        with self._lock:
            if self._exemptions.get(policy.name) == policy:
                return
            self._exemptions[policy.name] = policy
            self._exemptions_changed()

    def delete_exemption(self, name: str) -> None:
        with self._lock:
            if self._exemptions.pop(name, None) is None:
                return
            self._exemptions_changed()

    def exemptions(self) -> tuple:
        with self._lock:
            return tuple(self._exemptions[n] for n in sorted(self._exemptions))

    # Reads

    def snapshot(self) -> dict[str, NodeInfo]:
        with self._lock:
            return dict(self._nodes)

    def node_labels_count(self) -> int:
        with self._lock:
            return len(self._kube)

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)

    # Internals (lock held)

    def _exemptions_changed(self) -> None:
        self.version += 1
        self._rebuild()  # the selectors may name other label keys
        self.changed.set()

    def _wanted_keys(self) -> frozenset[str] | None:
        if self._role_keys is None:
            return None
        keys = set(self._role_keys)
        for policy in self._exemptions.values():
            keys |= policy.label_keys()
        return frozenset(keys)

    def _merged(self, name: str, keys: frozenset[str] | None = None) -> NodeInfo | None:
        node = self._parsed.get(name)
        kube = self._kube.get(name)
        if kube is None:
            return node
        if node is None:
            node = NodeInfo(name=name, has_ciliumnode=False)
        keys = self._wanted_keys() if keys is None else keys
        labels = kube.labels
        if keys is not None:
            labels = tuple((k, v) for k, v in labels if k in keys)
        return dataclasses.replace(
            node, node_labels=labels, node_addresses=kube.addresses, node_pod_cidrs=kube.pod_cidrs
        )

    def _put(self, name: str) -> None:
        merged = self._merged(name)
        if self._nodes.get(name) == merged:
            return
        if merged is None:
            del self._nodes[name]
        else:
            self._nodes[name] = merged
        self.version += 1
        self.changed.set()

    def _rebuild(self) -> None:
        keys = self._wanted_keys()
        fresh = {name: self._merged(name, keys) for name in {*self._parsed, *self._kube}}
        if fresh != self._nodes:
            self._nodes = fresh
            self.version += 1

    def _listed(self, source: str) -> None:
        self._awaiting.discard(source)
        if not self._awaiting:
            self.synced.set()
