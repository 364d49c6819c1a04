"""Paginated lists: following limit/continue to the end of a collection, turning each item
into a value through a parser and collecting what the parser rejected."""

from __future__ import annotations

from dataclasses import dataclass

from kubernetes.client.exceptions import ApiException

from nodecryptor.cluster.apis import GROUP, PLURAL, VERSION
from nodecryptor.cluster.client import TRANSPORT_ERRORS, api_host, translate_error
from nodecryptor.cluster.k8s_errors import ApiGone, ApiUnavailable
from nodecryptor.core.model import NodeInfo
from nodecryptor.core.settings import Settings
from nodecryptor.policy.ciliumnode import Rejection, parse_ciliumnode


@dataclass
class ListResult:
    nodes: dict[str, NodeInfo]
    rejections: list[tuple[dict, list[Rejection]]]
    """(object metadata, rejections) per object that had invalid entries."""
    resource_version: str
    pages: int


def list_all(api, page_size: int, timeout: float, parse=parse_ciliumnode,
             noun: str = "CiliumNodes", on_page=None) -> ListResult:
    """Follow limit/continue to the end, turning each item into a value with a ``name`` by
    ``parse`` and calling ``on_page`` after every page (progress for the liveness check).
    Raises KubernetesError (ApiGone for a stale continue token: the caller starts over)."""
    nodes: dict[str, NodeInfo] = {}
    rejected: list[tuple[dict, list[Rejection]]] = []
    token: str | None = None
    pages = 0
    while True:
        try:
            page = api.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=page_size,
                                                  _continue=token,
                                                  _request_timeout=(timeout, timeout))
        except ApiException as e:
            raise translate_error(e, api_host(api), f"listing {noun}") from e
        except TRANSPORT_ERRORS as e:
            raise translate_error(e, api_host(api), f"listing {noun}") from e
        pages += 1
        if on_page is not None:
            on_page()
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            raise ApiUnavailable(f"listing {noun}: {api_host(api)} sent no item list")
        for obj in page["items"]:
            info, rejections = parse(obj)
            if info is not None:
                nodes[info.name] = info
            if rejections:
                rejected.append((meta_of(obj), rejections))
        meta = page.get("metadata") or {}
        token = meta.get("continue") or None
        if token is None:
            return ListResult(nodes, rejected, str(meta.get("resourceVersion") or ""), pages)


def list_retrying(api, settings: Settings, noun: str = "CiliumNodes",
                  parse=parse_ciliumnode) -> ListResult:
    for attempt in range(3):
        try:
            return list_all(api, settings.list_page_size, settings.request_timeout_seconds,
                            parse, noun)
        except ApiGone:
            # The snapshot behind a continue token was compacted: start the list over.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


def version_of(meta: dict, default: str | None) -> str | None:
    value = meta.get("resourceVersion")
    return str(value) if value else default


def meta_of(obj: object) -> dict:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}
