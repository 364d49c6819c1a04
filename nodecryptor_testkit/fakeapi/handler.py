"""The fake API server's request handler: authentication, routing, CRUD, paginated lists, watches
streamed as chunked JSON lines, the Node status subresource and Events; it takes the injected
faults that FakeApiServer holds."""

from __future__ import annotations

import copy
import http.server
import json
import logging
import socket
import ssl
import time
import urllib.parse
from typing import TYPE_CHECKING

from .cluster import ApiError, FakeCluster
from .discovery import LIST_VIEW, OBJECT_VIEW, as_metadata_list, discovery, metadata_view
from .nodestatus import patch_status
from .objects import (
    COLLECTION,
    EXEMPTION_COLLECTION,
    NODE_COLLECTION,
    POD_IP_POOL_COLLECTION,
    partial_object_metadata,
    status_object,
)

if TYPE_CHECKING:
    from .server import _HttpServer

log = logging.getLogger("nodecryptor.fakeapi")


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HttpServer"

    def log_message(self, format, *args):  # the base class names it ``format``
        log.debug("%s %s", self.address_string(), format % args)

    # Plumbing

    def _send_json(self, code: int, body: object, headers: dict | None = None) -> None:
        data = json.dumps(body, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, err: ApiError) -> None:
        self._send_json(err.code, err.status)

    def _read_body(self) -> object:
        try:
            return json.loads(self._body or b"null")
        except ValueError:
            raise ApiError(400, "BadRequest", "request body is not valid JSON") from None

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
        self.wfile.flush()

    # Dispatch

    def do_GET(self):
        self._dispatch("GET")

    def do_POST(self):
        self._dispatch("POST")

    def do_PUT(self):
        self._dispatch("PUT")

    def do_PATCH(self):
        self._dispatch("PATCH")

    def do_DELETE(self):
        self._dispatch("DELETE")

    def _dispatch(self, method: str) -> None:
        fake = self.server.fake
        url = urllib.parse.urlsplit(self.path)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        fake.cluster.requests.append((method, self.path))
        # Read the body before anything can fail, so an error answer never leaves unread
        # bytes that the next request on this keep-alive connection would trip over.
        length = self.headers.get("Content-Length", "0")
        self._body = self.rfile.read(int(length)) if length.isdigit() and int(length) else b""
        try:
            scheme, _, presented = (self.headers.get("Authorization") or "").partition(" ")
            # The scheme is case-insensitive (the in-cluster loader sends "bearer").
            if scheme.lower() != "bearer" or presented.strip() != fake.token:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if path.startswith("/_fake/") and method == "POST":
                try:
                    answer = fake.control(path[len("/_fake/") :], self._read_body())
                except (ValueError, TypeError) as e:
                    raise ApiError(400, "BadRequest", f"fake control: {e}") from None
                self._send_json(200, answer)
                return
            watch_asked = query.get("watch", "").lower() in ("1", "true")
            is_watch = method == "GET" and path == COLLECTION and watch_asked
            if fake.faults.frozen:
                # Frozen: hold the request unanswered until thawed, then drop it unanswered.
                while fake.faults.frozen and not fake.stopping.is_set():
                    fake.stopping.wait(0.05)
                self.close_connection = True
                return
            if (
                method == "POST"
                and path.startswith("/api/v1/namespaces/")
                and path.endswith("/events")
                and path.count("/") == 5
            ):
                self._create_event(path.split("/")[4])
                return
            if path == NODE_COLLECTION or path.startswith(NODE_COLLECTION + "/"):
                # v1 Nodes take no count-based fault (stall, fail, expire): those stay aimed
                # at the CiliumNode requests the tests count. Freezing and dropping watches
                # and refusing connections hit every request.
                self._route_nodes(method, path, query, method == "GET" and watch_asked)
                return
            if path.startswith("/api/v1/namespaces/") and path.split("/")[5:6] == ["configmaps"]:
                self._route_configmaps(method, path, query, method == "GET" and watch_asked)
                return
            if path == POD_IP_POOL_COLLECTION or path.startswith(POD_IP_POOL_COLLECTION + "/"):
                if not fake.pod_ip_pools_installed:
                    raise ApiError(
                        404, "NotFound", "the server could not find the requested resource"
                    )
                self._route(
                    method,
                    path,
                    query,
                    method == "GET" and watch_asked and path == POD_IP_POOL_COLLECTION,
                    fake.pod_ip_pools,
                    POD_IP_POOL_COLLECTION,
                )
                return
            if path == EXEMPTION_COLLECTION or path.startswith(EXEMPTION_COLLECTION + "/"):
                # EncryptionExemptions: like CiliumNodes, but count-based faults stay aimed
                # at the CiliumNode requests; 404 while the CRD is "not installed".
                if not fake.exemptions_installed:
                    raise ApiError(
                        404, "NotFound", "the server could not find the requested resource"
                    )
                self._route(
                    method,
                    path,
                    query,
                    method == "GET" and watch_asked and path == EXEMPTION_COLLECTION,
                    fake.exemptions,
                    EXEMPTION_COLLECTION,
                )
                return
            if fake.take_stall("watch" if is_watch else "list" if method == "GET" else "write"):
                # Accept the request and never answer, like a hung server or a black hole.
                while not (fake.stopping.is_set() or fake.faults.stall_release.is_set()):
                    fake.stopping.wait(0.05)
                self.close_connection = True
                return
            code = fake.take_failure()
            if code:
                raise ApiError(
                    code,
                    "InternalError" if code == 500 else "ServiceUnavailable",
                    f"injected failure {code}",
                )
            self._route(method, path, query, is_watch)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError) as e:
            log.debug("client went away: %s", e)
            self.close_connection = True

    def _route(
        self,
        method: str,
        path: str,
        query: dict,
        is_watch: bool,
        cluster: FakeCluster | None = None,
        collection: str = COLLECTION,
    ) -> None:
        cluster = cluster if cluster is not None else self.server.fake.cluster
        if method == "GET" and collection == COLLECTION:
            doc = discovery(path, self.server.fake.host_port)
            if doc is not None:
                self._send_json(200, doc)
                return
        if path == collection:
            if is_watch:
                self._watch(query, cluster)
            elif method == "GET":
                limit = query.get("limit", "0")
                if not limit.isdigit():
                    raise ApiError(400, "BadRequest", f"limit {limit!r} is not a number")
                self._send_json(200, cluster.list_page(int(limit), query.get("continue", "")))
            elif method == "POST":
                self._send_json(201, cluster.create(self._read_body()))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
            return
        if path.startswith(collection + "/") and "/" not in path[len(collection) + 1 :]:
            name = urllib.parse.unquote(path[len(collection) + 1 :])
            if method == "GET":
                self._send_json(200, cluster.get(name))
            elif method == "PUT":
                self._send_json(200, cluster.replace(name, self._read_body()))
            elif method == "PATCH":
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if ctype != "application/merge-patch+json":
                    # Custom resources support neither strategic merge nor (here) JSON patch.
                    raise ApiError(
                        415,
                        "UnsupportedMediaType",
                        f"the body of the request was in an unknown format - "
                        f"accepted media types include: application/merge-patch+json "
                        f"(got {ctype!r})",
                    )
                self._send_json(200, cluster.patch(name, self._read_body()))
            elif method == "DELETE":
                self._send_json(200, cluster.delete(name))
            else:
                raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path}")
            return
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def _route_nodes(self, method: str, path: str, query: dict, is_watch: bool) -> None:
        """v1 Nodes: list (paginated), watch and get, each also as metadata only when the
        Accept header asks for it; writes come from the test or lab through FakeApiServer."""
        nodes = self.server.fake.nodes
        accept = self.headers.get("Accept") or ""
        self.server.fake.node_requests.append((method, self.path, accept))
        if method == "PATCH" and path.endswith("/status"):
            self._patch_node_status(
                urllib.parse.unquote(path[len(NODE_COLLECTION) + 1 : -len("/status")])
            )
            return
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path} here")
        if path == NODE_COLLECTION and is_watch:
            self._watch(query, nodes, metadata_view(accept, OBJECT_VIEW) is not None)
        elif path == NODE_COLLECTION:
            limit = query.get("limit", "0")
            if not limit.isdigit():
                raise ApiError(400, "BadRequest", f"limit {limit!r} is not a number")
            page = nodes.list_page(int(limit), query.get("continue", ""))
            self._send_json(
                200, as_metadata_list(page) if metadata_view(accept, LIST_VIEW) else page
            )
        else:
            name = urllib.parse.unquote(path[len(NODE_COLLECTION) + 1 :])
            obj = nodes.get(name)
            self._send_json(
                200, partial_object_metadata(obj) if metadata_view(accept, OBJECT_VIEW) else obj
            )

    def _route_configmaps(self, method: str, path: str, query: dict, is_watch: bool) -> None:
        """ConfigMaps of one namespace (``FakeApiServer.configmap_namespace``; any other is
        empty): list and watch honour ``fieldSelector=metadata.name=<name>``, GET of one."""
        fake = self.server.fake
        parts = path.split("/")
        namespace, rest = parts[4], parts[6:]
        if method != "GET":
            raise ApiError(405, "MethodNotAllowed", f"{method} is not supported on {path} here")
        if rest:
            if namespace != fake.configmap_namespace:
                raise ApiError(404, "NotFound", f'configmaps "{rest[0]}" not found', rest[0])
            self._send_json(200, fake.configmaps.get(urllib.parse.unquote(rest[0])))
            return
        selector = query.get("fieldSelector", "")
        wanted = (
            selector[len("metadata.name=") :] if selector.startswith("metadata.name=") else None
        )
        if selector and wanted is None:
            raise ApiError(400, "BadRequest", f"field selector {selector!r} is not supported")

        def match(obj: dict) -> bool:
            meta = obj.get("metadata") or {}
            return namespace == fake.configmap_namespace and (
                wanted is None or meta.get("name") == wanted
            )

        if is_watch:
            self._watch(query, fake.configmaps, match=match)
            return
        page = fake.configmaps.list_page(0, "")
        page["items"] = [o for o in page["items"] if match(o)]
        self._send_json(200, page)

    def _patch_node_status(self, name: str) -> None:
        fake = self.server.fake
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
        body = self._read_body()
        with fake.nodes.cond:
            code = fake.take_status_fault()
            if code == 409:
                raise ApiError(
                    409,
                    "Conflict",
                    f'Operation cannot be fulfilled on nodes "{name}": '
                    f"the object has been modified; please apply your changes to the "
                    f"latest version and try again",
                    name,
                )
            if code:
                raise ApiError(
                    code,
                    "InternalError" if code == 500 else "ServiceUnavailable",
                    f"injected failure {code}",
                )
            old = fake.nodes.objects.get(name)
            if old is None:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found', name)
            new = patch_status(old, ctype, body)
            fake.status_patches.append((name, ctype, copy.deepcopy(body)))
            self._send_json(200, fake.nodes.replace(name, new, check_rv=False))

    def _create_event(self, namespace: str) -> None:
        body = self._read_body()
        if (
            not isinstance(body, dict)
            or not isinstance(body.get("involvedObject"), dict)
            or not body.get("reason")
        ):
            raise ApiError(422, "Invalid", "Event: involvedObject and reason are required")
        fake = self.server.fake
        event = copy.deepcopy(body)
        meta = event.setdefault("metadata", {})
        meta["namespace"] = namespace
        meta.setdefault("name", f"{meta.get('generateName') or 'event.'}{len(fake.events)}")
        fake.events.append(event)
        self._send_json(201, event)

    def _watch(
        self,
        query: dict,
        cluster: FakeCluster | None = None,
        metadata_only: bool = False,
        match=None,
    ) -> None:
        fake = self.server.fake
        cluster = cluster if cluster is not None else fake.cluster
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        timeout = query.get("timeoutSeconds", "")
        deadline = time.monotonic() + (int(timeout) if timeout.isdigit() else 1800)
        rv_text = query.get("resourceVersion", "")
        if rv_text and not rv_text.isdigit():
            raise ApiError(400, "BadRequest", f"resourceVersion {rv_text!r} is not valid")
        if rv_text and int(rv_text) > cluster.rv:
            # A version from the future: the client talked to another (or an older
            # incarnation of this) server. The real watch cache answers 504 with the cause
            # ResourceVersionTooLarge, and clients list again.
            err = ApiError(
                504, "Timeout", f"Too large resource version: {rv_text}, current: {cluster.rv}"
            )
            err.status["details"] = {
                "causes": [
                    {"reason": "ResourceVersionTooLarge", "message": "Too large resource version"}
                ],
                "retryAfterSeconds": 1,
            }
            raise err
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        fake.watch_opened()
        try:
            self._stream_events(cluster, rv_text, bookmarks, deadline, metadata_only, match)
        finally:
            fake.watch_closed()

    def _stream_events(
        self,
        cluster: FakeCluster,
        rv_text: str,
        bookmarks: bool,
        deadline: float,
        metadata_only: bool = False,
        match=None,
    ) -> None:
        fake = self.server.fake

        def encode(events: list[dict]) -> bytes:
            if match is not None:  # a field selector: other objects' events are not sent
                events = [
                    e for e in events if e["type"] in ("ERROR", "BOOKMARK") or match(e["object"])
                ]
            if metadata_only:
                events = [
                    {"type": e["type"], "object": partial_object_metadata(e["object"])}
                    if e["type"] != "ERROR"
                    else e
                    for e in events
                ]
            return b"".join(json.dumps(e).encode() + b"\n" for e in events)

        generation = fake.faults.drop_generation
        bookmark_generation = fake.bookmark_generation
        with cluster.cond:
            # The count-based expiry fault is aimed at CiliumNode watches only.
            expire = fake.take_expire() if cluster is fake.cluster else False
            if not expire and rv_text not in ("", "0"):
                expire = int(rv_text) < cluster.oldest_watchable_rv
            if expire:
                status = status_object(
                    410,
                    "Expired",
                    f"too old resource version: {rv_text or 0} ({cluster.oldest_watchable_rv})",
                )
                pending: list[dict] = [{"type": "ERROR", "object": status}]
            elif rv_text in ("", "0"):
                # No version: the current state as ADDED events, then changes.
                pending = [
                    {"type": "ADDED", "object": copy.deepcopy(cluster.objects[n])}
                    for n in sorted(cluster.objects)
                ]
            else:
                pending = [
                    {"type": t, "object": o} for rv, t, o in cluster.history if rv > int(rv_text)
                ]
            seen = cluster.rv
        if expire:
            self._chunk(encode(pending[:1]))
            self._chunk(b"")
            return
        next_bookmark = time.monotonic() + fake.bookmark_interval
        while True:
            if fake.faults.drop_generation != generation or fake.stopping.is_set():
                # Cut the connection without the final chunk, as a dying proxy would.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if not (fake.faults.freeze_watches or fake.faults.frozen):
                if pending:
                    self._chunk(encode(pending))
                    pending = []
                now = time.monotonic()
                if now >= deadline:
                    self._chunk(b"")
                    return
                if bookmarks and (
                    now >= next_bookmark or fake.bookmark_generation != bookmark_generation
                ):
                    bookmark_generation = fake.bookmark_generation
                    with cluster.cond:
                        self._chunk(encode([cluster.bookmark()]))
                    next_bookmark = now + fake.bookmark_interval
            with cluster.cond:
                frozen = fake.faults.freeze_watches or fake.faults.frozen
                if frozen or cluster.rv == seen:
                    cluster.cond.wait(0.05)
                if not frozen and cluster.rv != seen:
                    pending = [
                        {"type": t, "object": o} for rv, t, o in cluster.history if rv > seen
                    ]
                    seen = cluster.rv
