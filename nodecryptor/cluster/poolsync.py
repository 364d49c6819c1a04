"""The syncs of the cluster's pod pools: Cilium's ``cilium-config`` ConfigMap (one object, by
a field selector on its name) and the CiliumPodIPPools (``cilium.io/v2alpha1``), each on
CiliumNodeSync's list/watch loop. Only administrators write either; the pools bound which pod
CIDR claims may become destinations (``policy.topology``). A missing ConfigMap or CRD is
reported (log, ``nodecryptor_pod_pools_known``, ``status``) and retried; neither ever holds
the store unsynced: without pools, ``--cluster-pod-cidrs`` or the breadth limit applies."""

from __future__ import annotations

import logging

import kubernetes.client

from nodecryptor.cluster.apis import ConfigMapApi, ResourceApi, ResourceMissing
from nodecryptor.cluster.store import Store
from nodecryptor.cluster.sync import CiliumNodeSync
from nodecryptor.core.log import kv
from nodecryptor.core.settings import Settings
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy import pools

log = logging.getLogger("nodecryptor.k8s")


class _PoolSyncBase(CiliumNodeSync):
    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None, **kwargs):
        # The base class's metrics describe the CiliumNode sync.
        super().__init__(settings, store, None, **kwargs)
        self.pool_metrics = metrics

    def _log_rejections(self, rejections, version: str) -> None:
        for rej in rejections:
            log.warning(
                f"rejecting an entry of {rej.kind} {rej.obj}",
                extra=kv(field=rej.field, value=rej.value, why=rej.why, resource_version=version),
            )

    def _restart(self, cause: str) -> None:
        pass

    def _report_pools(self) -> None:
        known = self.store.pools()
        if self.pool_metrics is not None:
            self.pool_metrics.pod_pools_known.set(1 if known.cidrs else 0)


class CiliumConfigSync(_PoolSyncBase):
    """Keeps the store's cluster-pool CIDRs equal to the cilium-config ConfigMap's."""

    kind = "ConfigMap"
    noun = "ConfigMaps"

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return ConfigMapApi(api_client, self.settings.cilium_namespace, pools.CONFIGMAP_NAME)

    def _parse(self, obj: object):
        return pools.parse_cilium_config(obj)

    def _install(self, items: dict) -> None:
        found = items.get(pools.CONFIGMAP_NAME)
        if found is None:
            log.warning(
                "Cilium's ConfigMap not found; pod CIDR claims are checked against "
                "--cluster-pod-cidrs or the breadth limit only",
                extra=kv(namespace=self.settings.cilium_namespace, name=pools.CONFIGMAP_NAME),
            )
        self.store.set_cilium_config(found.cidrs if found is not None else None)
        self._report_pools()

    def _upsert(self, item) -> None:
        self.store.set_cilium_config(item.cidrs)
        self._report_pools()

    def _remove(self, name: str) -> None:
        self.store.set_cilium_config(None)
        self._report_pools()


class PodIPPoolSync(_PoolSyncBase):
    """Keeps the store's CiliumPodIPPool CIDRs equal to the cluster's (multi-pool IPAM). A
    missing CRD (no multi-pool) is normal: retried with backoff, no pools from it."""

    kind = "CiliumPodIPPool"
    noun = "CiliumPodIPPools"

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return ResourceApi(api_client, pools.POOL_GROUP, pools.POOL_VERSION, pools.POOL_PLURAL)

    def _parse(self, obj: object):
        return pools.parse_pod_ip_pool(obj)

    def _install(self, items: dict) -> None:
        self.store.replace_ip_pools({name: p.cidrs for name, p in items.items()})
        self._report_pools()

    def _upsert(self, item) -> None:
        self.store.set_ip_pool(item.name, item.cidrs)
        self._report_pools()

    def _remove(self, name: str) -> None:
        self.store.delete_ip_pool(name)
        self._report_pools()

    def _restart(self, cause: str) -> None:
        if cause == ResourceMissing.cause and self.store.pools().source != "cilium":
            log.debug("no CiliumPodIPPool resource (multi-pool IPAM not in use)")
