"""One-shot reads for the operator commands (``plan``, ``status``): every CiliumNode with its
v1 Node's labels, addresses and pod CIDRs, the cluster's pod pools, every EncryptionExemption,
every Node's NodeEncryptionReady condition; each opens a client, lists to the end and closes
it."""

from __future__ import annotations

import json
from collections.abc import Iterable

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from nodecryptor.cluster.apis import ConfigMapApi, NodeApi, ResourceApi, ResourceMissing
from nodecryptor.cluster.client import TRANSPORT_ERRORS, api_host, load_client, translate_error
from nodecryptor.cluster.pages import list_complete
from nodecryptor.cluster.store import Store
from nodecryptor.core.model import NodeInfo, PodPools
from nodecryptor.core.settings import Settings
from nodecryptor.policy import exemptions, pools
from nodecryptor.policy.ciliumnode import Rejection, parse_node_roles


def snapshot_once(
    settings: Settings, policies: Iterable = ()
) -> tuple[dict[str, NodeInfo], list[Rejection]]:
    """List every CiliumNode and every v1 Node once, merged by a Store as the agent's merges
    them: a Node's labels reduced to the role labels and the keys the exemption ``policies``
    select on, its addresses and pod CIDRs; a Node without a CiliumNode is a node of its own.
    Raises a KubernetesError naming the server and the cause when the API is unreachable,
    refuses access, or has no CiliumNode resource."""
    store = Store()
    store.set_role_label_keys(settings.control_plane_labels)
    store.replace_exemptions(policies)
    api_client = load_client(settings)
    try:
        result = list_complete(kubernetes.client.CustomObjectsApi(api_client), settings)
        store.replace_all(result.nodes.values())
        kube = list_complete(
            NodeApi(api_client), settings, lambda obj: parse_node_roles(obj, None), "Nodes"
        )
        store.replace_nodes(kube.nodes.values())
        rejections = [r for _, rs in [*result.rejections, *kube.rejections] for r in rs]
        return store.snapshot(), rejections
    finally:
        api_client.close()


def pools_once(settings: Settings) -> tuple[PodPools, list[Rejection]]:
    """Read the cluster's pod pools once: the cilium-config ConfigMap and the
    CiliumPodIPPools (a missing CRD means none). Raises KubernetesError."""
    api_client = load_client(settings)
    try:
        config = list_complete(
            ConfigMapApi(api_client, settings.cilium_namespace, pools.CONFIGMAP_NAME),
            settings,
            pools.parse_cilium_config,
            "ConfigMaps",
        )
        try:
            ip_pools = list_complete(
                ResourceApi(api_client, pools.POOL_GROUP, pools.POOL_VERSION, pools.POOL_PLURAL),
                settings,
                pools.parse_pod_ip_pool,
                "CiliumPodIPPools",
            )
            found, pool_rejections = ip_pools.nodes, ip_pools.rejections
        except ResourceMissing:
            found, pool_rejections = {}, []
    finally:
        api_client.close()
    cm = config.nodes.get(pools.CONFIGMAP_NAME)
    combined = pools.combine(
        cm.cidrs if cm is not None else None, {n: p.cidrs for n, p in found.items()}
    )
    return combined, [r for _, rs in [*config.rejections, *pool_rejections] for r in rs]


def exemptions_once(settings: Settings) -> tuple[tuple, list[Rejection], str | None]:
    """List the EncryptionExemptions once: (policies, rejections, note). ``note`` says why
    none could be listed (the CRD is not installed), which only leaves the built-in policy."""
    api_client = load_client(settings)
    try:
        result = list_complete(
            ResourceApi(api_client, exemptions.GROUP, exemptions.VERSION, exemptions.PLURAL),
            settings,
            exemptions.parse_exemption,
            "EncryptionExemptions",
        )
    except ResourceMissing as e:
        return (), [], str(e)
    finally:
        api_client.close()
    return (
        tuple(result.nodes[n] for n in sorted(result.nodes)),
        [r for _, rs in result.rejections for r in rs],
        None,
    )


def read_node_conditions(settings: Settings, condition_type: str) -> list[dict]:
    """Every Node's name and its ``condition_type`` condition (None when absent), for
    ``nodecryptor status --cluster``. Raises KubernetesError."""
    api_client = load_client(settings)
    core = kubernetes.client.CoreV1Api(api_client)
    out: list[dict] = []
    token = None
    try:
        while True:
            try:
                resp = core.list_node(
                    limit=settings.list_page_size,
                    _continue=token,
                    _preload_content=False,
                    _request_timeout=(settings.request_timeout_seconds,) * 2,
                )
                try:
                    page = json.loads(resp.data)
                finally:
                    resp.release_conn()
            except ApiException as e:
                raise translate_error(e, api_host(api_client), "listing Nodes") from e
            except TRANSPORT_ERRORS as e:
                raise translate_error(e, api_host(api_client), "listing Nodes") from e
            for node in page.get("items") or []:
                name = (node.get("metadata") or {}).get("name")
                found = None
                for c in (node.get("status") or {}).get("conditions") or []:
                    if isinstance(c, dict) and c.get("type") == condition_type:
                        found = {
                            k: c.get(k)
                            for k in (
                                "status",
                                "reason",
                                "message",
                                "lastHeartbeatTime",
                                "lastTransitionTime",
                            )
                        }
                out.append({"node": name, "condition": found})
            token = (page.get("metadata") or {}).get("continue") or None
            if token is None:
                return sorted(out, key=lambda n: str(n["node"]))
    finally:
        api_client.close()
