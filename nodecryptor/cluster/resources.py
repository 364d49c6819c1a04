"""The synced resources besides CiliumNodes, each a set of hooks on CiliumNodeSync's loop:
``NodeRoleSync`` (the v1 Nodes: the labels for the control-plane role and the exemption
policies' selectors, the addresses and the pod CIDRs) and ``ExemptionSync``
(``encryptionexemptions.nodecryptor.io/v1alpha1``; a missing CRD is reported and retried, the
built-in policy still applies). Every object goes through its parser (``parse_node_roles``,
``exemptions.parse_exemption``); only the parsed value reaches the store."""

from __future__ import annotations

import json
import logging

import kubernetes.client

from nodecryptor.cluster.apis import NodeApi, ResourceApi, ResourceMissing
from nodecryptor.cluster.pages import meta_of
from nodecryptor.cluster.store import Store
from nodecryptor.cluster.sync import CiliumNodeSync
from nodecryptor.core.log import kv
from nodecryptor.core.settings import Settings
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy import exemptions
from nodecryptor.policy.ciliumnode import Rejection, parse_node_roles

log = logging.getLogger("nodecryptor.k8s")


class NodeRoleSync(CiliumNodeSync):
    """Keeps the store's v1 Nodes equal to the cluster's: their labels, ``status.addresses``
    and ``spec.podCIDRs`` (``parse_node_roles``), the trusted source of node addresses, pod
    CIDRs and roles.

    A node's addresses are written by its own kubelet, which the NodeRestriction admission
    plugin keeps to its own Node; the labels ``node-role.kubernetes.io/*`` are protected from
    kubelets by the same plugin, unlike a CiliumNode's labels, which every Cilium agent may
    write. Every label is read; the store keeps only the selector labels and the keys
    exemption policies name (``Store.set_role_label_keys``), so label changes that matter to
    nobody wake nothing. Until its Node is known, a node has no trusted address and is a
    worker. Reuses CiliumNodeSync's list/watch loop."""

    kind = "Node"
    noun = "Nodes"

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None, **kwargs):
        # The base class's metrics describe the CiliumNode sync; this one counts its restarts
        # in a counter of its own.
        super().__init__(settings, store, None, **kwargs)
        self.role_metrics = metrics
        store.expect_node_labels()
        # Every label is read; the store keeps the role labels and the keys the exemption
        # policies' selectors name.
        store.set_role_label_keys(settings.control_plane_labels)

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return NodeApi(api_client)

    def _parse(self, obj: object):
        return parse_node_roles(obj, None)

    def _install(self, items: dict) -> None:
        self.store.replace_nodes(items.values())

    def _upsert(self, item) -> None:
        self.store.set_node(item)

    def _remove(self, name: str) -> None:
        self.store.delete_node(name)

    def _restart(self, cause: str) -> None:
        if self.role_metrics is not None:
            self.role_metrics.node_watch_restarts.labels(cause=cause).inc()


class ExemptionSync(CiliumNodeSync):
    """Keeps the store's EncryptionExemption policies equal to the cluster's, with
    CiliumNodeSync's loop (pagination, bookmarks, re-list on 410, stall detection, backoff).
    A missing CRD is logged, shown by nodecryptor_exemption_crd_missing and retried with
    backoff; the store's policies stay as they were (none at start: the built-in policy
    alone applies). The store is never held unsynced by this sync."""

    kind = "EncryptionExemption"
    noun = "EncryptionExemptions"

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None, **kwargs):
        super().__init__(settings, store, None, **kwargs)
        self.exemption_metrics = metrics
        self.crd_missing = False

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return ResourceApi(api_client, exemptions.GROUP, exemptions.VERSION, exemptions.PLURAL)

    def _parse(self, obj: object):
        return exemptions.parse_exemption(obj)

    def _install(self, items: dict) -> None:
        self._set_missing(False)
        self.store.replace_exemptions(items.values())

    def _upsert(self, item) -> None:
        self.store.upsert_exemption(item)

    def _remove(self, name: str) -> None:
        self.store.delete_exemption(name)

    def _handle_event(self, line: str, rv, what: str):
        # A policy that turns malformed is rejected whole: it must stop applying, as a
        # re-list would drop it.
        try:
            event = json.loads(line)
            obj = event.get("object") if isinstance(event, dict) else None
            if event.get("type") in ("ADDED", "MODIFIED"):
                policy, _ = exemptions.parse_exemption(obj)
                name = meta_of(obj).get("name")
                if policy is None and isinstance(name, str):
                    self.store.delete_exemption(name)
        except (ValueError, AttributeError):
            pass  # the base class reports it
        return super()._handle_event(line, rv, what)

    def _log_rejections(self, rejections: list[Rejection], version: str) -> None:
        # A malformed policy is rejected whole; counted with the claim rejections.
        for rej in rejections:
            log.warning(
                "rejecting EncryptionExemption",
                extra=kv(
                    policy=rej.obj,
                    field=rej.field,
                    value=rej.value,
                    why=rej.why,
                    resource_version=version,
                ),
            )
        if self.exemption_metrics is not None:
            self.exemption_metrics.record_claim_rejections(rejections)

    def _restart(self, cause: str) -> None:
        if cause == ResourceMissing.cause:
            if not self.crd_missing:
                log.warning(
                    "the EncryptionExemption CRD is not installed; only the built-in "
                    "policy applies; retrying"
                )
            self._set_missing(True)
        if self.exemption_metrics is not None:
            self.exemption_metrics.exemption_watch_restarts.labels(cause=cause).inc()

    def _set_missing(self, missing: bool) -> None:
        if self.crd_missing and not missing:
            log.info("the EncryptionExemption CRD is installed; policies apply")
        self.crd_missing = missing
        if self.exemption_metrics is not None:
            self.exemption_metrics.exemption_crd_missing.set(1 if missing else 0)
