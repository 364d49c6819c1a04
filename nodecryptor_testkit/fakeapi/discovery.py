"""What the fake API server says about itself, and in which form: the discovery documents the
official client may read, and the content negotiation of the metadata-only views of v1 Nodes
(PartialObjectMetadata)."""

from __future__ import annotations

from .cluster import ApiError
from .objects import (
    API_VERSION,
    GROUP,
    KIND,
    META_API_VERSION,
    PLURAL,
    VERSION,
    partial_object_metadata,
)

LIST_VIEW = "PartialObjectMetadataList"
OBJECT_VIEW = "PartialObjectMetadata"


def metadata_view(accept: str, want: str) -> str | None:
    """Content negotiation of the metadata-only form, as the real server does it: the first
    Accept clause the server can produce wins. A clause ``application/json`` (or none) gives
    the full object (None); ``as=<want>;g=meta.k8s.io;v=v1`` gives the metadata form (``want``
    is PartialObjectMetadataList for a list, PartialObjectMetadata for a watch or a get). A
    header of nothing but other ``as=`` clauses is 406 Not Acceptable."""
    if not accept.strip():
        return None
    for clause in accept.split(","):
        media, *raw = [part.strip() for part in clause.split(";")]
        params = dict(p.split("=", 1) for p in raw if "=" in p)
        if media not in ("application/json", "*/*", "application/*"):
            continue
        if "as" not in params:
            return None
        if (params.get("as"), params.get("g"), params.get("v")) == (want, "meta.k8s.io", "v1"):
            return want
    raise ApiError(
        406,
        "NotAcceptable",
        f"only the following media types are accepted: "
        f"application/json, application/json;as={want};"
        f"g=meta.k8s.io;v=v1",
    )


def as_metadata_list(page: dict) -> dict:
    return {
        "apiVersion": META_API_VERSION,
        "kind": LIST_VIEW,
        "metadata": page["metadata"],
        "items": [partial_object_metadata(o) for o in page["items"]],
    }


def discovery(path: str, host: str) -> dict | None:
    if path == "/version":
        return {
            "major": "1",
            "minor": "33",
            "gitVersion": "v1.33.0-nodecryptor-fake",
            "gitCommit": "0" * 40,
            "gitTreeState": "clean",
            "buildDate": "2026-01-01T00:00:00Z",
            "goVersion": "go1.24",
            "compiler": "gc",
            "platform": "linux/amd64",
        }
    if path == "/api":
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}],
        }
    if path == "/api/v1":
        return {
            "kind": "APIResourceList",
            "groupVersion": "v1",
            "resources": [
                {
                    "name": "nodes",
                    "singularName": "node",
                    "namespaced": False,
                    "kind": "Node",
                    "shortNames": ["no"],
                    "verbs": ["create", "delete", "get", "list", "patch", "update", "watch"],
                }
            ],
        }
    group = {
        "name": GROUP,
        "versions": [{"groupVersion": API_VERSION, "version": VERSION}],
        "preferredVersion": {"groupVersion": API_VERSION, "version": VERSION},
    }
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
    if path == f"/apis/{GROUP}":
        return {"kind": "APIGroup", "apiVersion": "v1", **group}
    if path == f"/apis/{GROUP}/{VERSION}":
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": API_VERSION,
            "resources": [
                {
                    "name": PLURAL,
                    "singularName": "ciliumnode",
                    "namespaced": False,
                    "kind": KIND,
                    "shortNames": ["cn", "ciliumn"],
                    "verbs": [
                        "delete",
                        "deletecollection",
                        "get",
                        "list",
                        "patch",
                        "create",
                        "update",
                        "watch",
                    ],
                }
            ],
        }
    return None
