"""A small fake kube-apiserver that serves CiliumNodes and v1 Nodes over the real HTTP protocol.

Tests run it in a thread; the network-namespace lab runs it as a process
(``python -m nodecryptor_testkit.fakeapi --bind 127.0.0.1:6443 --objects cluster.json
--token T --write-kubeconfig kc``). It speaks what the official Python client uses:

- discovery: ``/version``, ``/api``, ``/apis``, ``/apis/cilium.io``, ``/apis/cilium.io/v2``;
- bearer-token authentication (401 with a Status object without it);
- ``ciliumnodes.cilium.io/v2``, cluster-scoped: GET one, LIST with ``limit``/``continue``
  (a consistent snapshot per list; 410 Expired for a continue token older than the retained
  history), WATCH as a chunked stream of JSON lines (ADDED, MODIFIED, DELETED, BOOKMARK, and
  ERROR carrying a Status with code 410 when the requested resourceVersion was compacted away),
  POST, PUT, PATCH (merge-patch) and DELETE;
- ``nodes`` (v1, cluster-scoped): GET one, LIST with ``limit``/``continue`` and WATCH, each as
  metadata only (``PartialObjectMetadata``/``PartialObjectMetadataList``) when the Accept header
  asks for it as the real server negotiates it (406 for a form it cannot produce); created
  with ``FakeApiServer.apply`` of an object whose kind is Node (also from ``--objects``);
- ``encryptionexemptions.nodecryptor.io/v1alpha1``, cluster-scoped: as CiliumNodes (list,
  watch, create, update, patch, delete; ``FakeApiServer.apply`` of an EncryptionExemption);
  ``exemptions_installed = False`` (control action ``exemptions-installed``) answers 404 as
  a cluster without the CRD does;
- ``configmaps`` (v1) of one namespace (``configmap_namespace``, kube-system): GET one, LIST
  and WATCH honouring ``fieldSelector=metadata.name=<name>``; ``ciliumpodippools.cilium.io/
  v2alpha1``: as EncryptionExemptions (``pod_ip_pools_installed = False`` answers 404);
  both written with ``FakeApiServer.apply``;
- ``nodes/<name>/status``: PATCH as strategic merge (``status.conditions`` merged by ``type``)
  or JSON merge patch (the list replaced), 400 for a malformed body, 404 for an unknown node,
  415 for another content type (nodestatus.py); ``fail_status_next`` injects 409 conflicts or
  server errors; accepted patches are kept in ``status_patches``;
- core/v1 Events: POST ``/api/v1/namespaces/<ns>/events`` (kept in ``events``);
- one global, monotonically increasing resourceVersion (shared by both resources, as etcd's
  revision is) and a bounded event history per resource.

Fault injection for tests (Python methods, also reachable as ``POST /_fake/<action>`` with the
token, from the table ``faults.CONTROL_ACTIONS``): compact the history, make the next watch
or continue token fail with 410, drop open
watch connections, freeze them (open but silent), freeze the whole server (connections
accepted, nothing answered), stall requests (accept and never answer),
fail the next N requests with a status code, refuse connections by closing the listening
socket, and advance the resourceVersion as writes to other resources would. The count-based
faults (stall, fail, expire) are aimed at CiliumNode requests only; freezing or dropping
watches and refusing connections hit Node requests too.

Label selectors are ignored, and field selectors but ``metadata.name`` on ConfigMaps:
nodecryptor uses no other.
"""

from .cluster import ApiError, FakeCluster
from .objects import (
    API_VERSION,
    COLLECTION,
    CONTROL_PLANE_LABEL,
    GROUP,
    KIND,
    MASTER_LABEL,
    NODE_COLLECTION,
    PLURAL,
    VERSION,
    WG_PUBKEY_ANNOTATION,
    load_objects,
    make_cilium_config,
    make_ciliumnode,
    make_exemption,
    make_node,
    make_pod_ip_pool,
    merge_patch,
    partial_object_metadata,
    status_object,
)
from .server import FakeApiServer

__all__ = [
    "API_VERSION",
    "COLLECTION",
    "CONTROL_PLANE_LABEL",
    "GROUP",
    "KIND",
    "MASTER_LABEL",
    "PLURAL",
    "VERSION",
    "WG_PUBKEY_ANNOTATION",
    "ApiError",
    "FakeApiServer",
    "FakeCluster",
    "NODE_COLLECTION",
    "load_objects",
    "make_cilium_config",
    "make_ciliumnode",
    "make_exemption",
    "make_node",
    "make_pod_ip_pool",
    "merge_patch",
    "partial_object_metadata",
    "status_object",
]
