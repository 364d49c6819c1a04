"""The request each synced resource is listed and watched with: CiliumNodes through the
client's custom-object call, and adapters that offer the same call
(``list_cluster_custom_object``) for v1 Nodes, for one ConfigMap and for another custom
resource (EncryptionExemptions, CiliumPodIPPools), so one list/watch loop serves them all."""

from __future__ import annotations

import json

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from nodecryptor.cluster.client import api_host, status_details_name, status_message
from nodecryptor.cluster.k8s_errors import KubernetesError

GROUP = "cilium.io"
VERSION = "v2"
PLURAL = "ciliumnodes"


class NodeApi:
    """List and watch of v1 Nodes, offered under the call CiliumNodeSync's list/watch loop
    makes (``list_cluster_custom_object``), so that loop - pagination, bookmarks, re-list on
    410, timeouts, backoff - serves both resources. ``group``, ``version`` and ``plural`` are
    ignored: this object only ever reads /api/v1/nodes. Whole Nodes, not their metadata:
    status.addresses and spec.podCIDRs are the trusted node addresses and pod CIDRs (only
    those fields and the labels are kept, see ``parse_node_roles``)."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)

    def list_cluster_custom_object(
        self,
        _group,
        _version,
        _plural,
        watch: bool = False,
        _preload_content: bool = True,
        **kwargs,
    ):
        # Always the raw response: the client's model classes would turn 10,000 items into
        # objects only to be read back as dicts.
        resp = self._core.list_node(watch=True if watch else None, _preload_content=False, **kwargs)
        if not _preload_content:
            return resp
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()


class ConfigMapApi:
    """One ConfigMap (by namespace and name, a field selector on the name, so neither the
    list nor the watch carries any other ConfigMap), under the call CiliumNodeSync's loop
    makes."""

    def __init__(self, api_client: kubernetes.client.ApiClient, namespace: str, name: str):
        self.api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)
        self.namespace = namespace
        self.name = name

    def list_cluster_custom_object(
        self,
        _group,
        _version,
        _plural,
        watch: bool = False,
        _preload_content: bool = True,
        **kwargs,
    ):
        resp = self._core.list_namespaced_config_map(
            self.namespace,
            watch=True if watch else None,
            _preload_content=False,
            field_selector=f"metadata.name={self.name}",
            **kwargs,
        )
        if not _preload_content:
            return resp
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()


class ResourceMissing(KubernetesError):
    """404 on a whole resource: its CustomResourceDefinition is not installed."""

    cause = "crd-missing"


class ResourceApi:
    """A custom resource other than CiliumNodes, under the call CiliumNodeSync's loop makes
    (its group, version and plural arguments are replaced by this object's). A 404 on the
    resource (not on one object) becomes ResourceMissing."""

    def __init__(
        self, api_client: kubernetes.client.ApiClient, group: str, version: str, plural: str
    ):
        self.api_client = api_client
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self.resource = (group, version, plural)

    def list_cluster_custom_object(self, _group, _version, _plural, **kwargs):
        try:
            return self._api.list_cluster_custom_object(*self.resource, **kwargs)
        except ApiException as e:
            if e.status == 404 and not status_details_name(e):
                group, version, plural = self.resource
                raise ResourceMissing(
                    f"{api_host(self)} has no {plural}.{group}/{version} "
                    f"resource (the CRD is not installed): "
                    f"{status_message(e)}"
                ) from None
            raise
