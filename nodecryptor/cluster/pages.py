"""Paginated lists: following limit/continue to the end of a collection, turning each item
into a value through a parser and collecting what the parser rejected.

Memory stays bounded whatever other nodes write: a page is read as raw bytes and its items are
decoded one at a time (``decode_list``), so only one decoded object is alive at once, and an
item larger than ``MAX_OBJECT_BYTES`` is rejected whole (reason ``oversized``) before any of
its fields is read. Each parser keeps only the fields the policy uses."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from kubernetes.client.exceptions import ApiException

from nodecryptor.cluster.apis import GROUP, PLURAL, VERSION
from nodecryptor.cluster.client import TRANSPORT_ERRORS, api_host, translate_error
from nodecryptor.cluster.k8s_errors import ApiGone, ApiUnavailable
from nodecryptor.core.model import NodeInfo
from nodecryptor.core.settings import Settings
from nodecryptor.policy.ciliumnode import Rejection, parse_ciliumnode


MAX_OBJECT_BYTES = 512 * 1024
"""Largest object (its JSON text) that is parsed. Cilium's own CiliumNodes are a few KiB (tens
with an ENI-sized ``spec.ipam.pool``), Nodes a few tens of KiB; etcd refuses values over
1.5 MiB. A bigger object is rejected whole: 45 CiliumNodes of 1.4 MB decoded at once took the
agent past its memory limit."""

_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def oversized(obj_name: str, kind: str, size: int) -> Rejection:
    return Rejection(
        obj_name,
        "object",
        f"{size} bytes",
        f"larger than {MAX_OBJECT_BYTES} bytes: rejected whole, not parsed",
        "oversized",
        kind=kind,
    )


def decode_list(text: str, on_item: Callable[[object, int], None]) -> dict:
    """Decode a List response (a JSON object with an ``items`` array) item by item: call
    ``on_item(object, size of its JSON text)`` for each, and return the other top-level
    fields. Raises ValueError on malformed JSON."""

    def skip(i: int) -> int:
        return _SPACE.match(text, i).end()

    def expect(i: int, char: str) -> int:
        i = skip(i)
        if text[i : i + 1] != char:
            raise ValueError(f"expected {char!r} at offset {i}")
        return i + 1

    top: dict = {}
    i = expect(0, "{")
    while True:
        i = skip(i)
        if text[i : i + 1] == "}":
            return top
        key, i = _DECODER.raw_decode(text, i)
        i = skip(expect(i, ":"))
        if key == "items" and text[i : i + 1] == "[":
            top["items"] = True
            i = skip(i + 1)
            while text[i : i + 1] != "]":
                start = i
                obj, i = _DECODER.raw_decode(text, i)
                on_item(obj, i - start)
                del obj  # only one decoded item alive at a time
                i = skip(i)
                if text[i : i + 1] == ",":
                    i = skip(i + 1)
            i += 1
        else:
            top[key], i = _DECODER.raw_decode(text, i)
        i = skip(i)
        if text[i : i + 1] == ",":
            i += 1


@dataclass
class ListResult:
    nodes: dict[str, NodeInfo]
    rejections: list[tuple[dict, list[Rejection]]]
    """(object metadata, rejections) per object that had invalid entries."""
    resource_version: str
    pages: int


def list_all(
    api,
    page_size: int,
    timeout: float,
    parse=parse_ciliumnode,
    noun: str = "CiliumNodes",
    on_page=None,
) -> ListResult:
    """Follow limit/continue to the end, turning each item into a value with a ``name`` by
    ``parse`` and calling ``on_page`` after every page (progress for the liveness check).
    Raises KubernetesError (ApiGone for a stale continue token: the caller starts over)."""
    nodes: dict[str, NodeInfo] = {}
    rejected: list[tuple[dict, list[Rejection]]] = []
    token: str | None = None
    pages = 0
    kind = noun[:-1] if noun.endswith("s") else noun

    def take(obj: object, size: int) -> None:
        if size > MAX_OBJECT_BYTES:
            meta = meta_of(obj)
            rejected.append(
                (
                    {k: meta.get(k) for k in ("name", "resourceVersion")},
                    [oversized(str(meta.get("name") or "?"), kind, size)],
                )
            )
            return
        info, rejections = parse(obj)
        if info is not None:
            nodes[info.name] = info
        if rejections:
            rejected.append((meta_of(obj), rejections))

    while True:
        try:
            resp = api.list_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                limit=page_size,
                _continue=token,
                _preload_content=False,
                _request_timeout=(timeout, timeout),
            )
            try:
                raw = resp.data
            finally:
                resp.release_conn()
        except ApiException as e:
            raise translate_error(e, api_host(api), f"listing {noun}") from e
        except TRANSPORT_ERRORS as e:
            raise translate_error(e, api_host(api), f"listing {noun}") from e
        pages += 1
        if on_page is not None:
            on_page()
        try:
            page = decode_list(raw.decode("utf-8"), take)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiUnavailable(
                f"listing {noun}: {api_host(api)} sent malformed JSON: {e}"
            ) from None
        finally:
            del raw
        if page.get("items") is not True:
            raise ApiUnavailable(f"listing {noun}: {api_host(api)} sent no item list")
        meta = page.get("metadata") or {}
        token = meta.get("continue") or None
        if token is None:
            return ListResult(nodes, rejected, str(meta.get("resourceVersion") or ""), pages)


LIST_ATTEMPTS = 3
"""How many times a list is started while its continue tokens keep expiring (the server
compacted the snapshot behind them before the list reached its end); after that the 410 goes to
the caller: the sync's loop lists again with backoff, a command reports it."""


def list_complete(
    api,
    settings: Settings,
    parse=parse_ciliumnode,
    noun: str = "CiliumNodes",
    on_page=None,
    on_restart=None,
) -> ListResult:
    """A whole list (``list_all``) that starts over at once, calling ``on_restart``, when a
    continue token expires: the one place a list's 410 is handled, for the agent's syncs and
    the commands alike. Raises KubernetesError (ApiGone after ``LIST_ATTEMPTS`` expiries)."""
    for attempt in range(1, LIST_ATTEMPTS + 1):
        try:
            return list_all(
                api, settings.list_page_size, settings.request_timeout_seconds, parse, noun, on_page
            )
        except ApiGone:
            if attempt == LIST_ATTEMPTS:
                raise
            if on_restart is not None:
                on_restart()
    raise AssertionError("unreachable")


def version_of(meta: dict, default: str | None) -> str | None:
    value = meta.get("resourceVersion")
    return str(value) if value else default


def meta_of(obj: object) -> dict:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}
