"""The HTTP side of the fake API server: request handler (discovery, auth, CRUD, list, watch)
and FakeApiServer, the object tests and the lab use, with its fault injection."""

from __future__ import annotations

import base64
import collections
import copy
import http.server
import json
import logging
import os
import socket
import ssl
import subprocess
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field

from .cluster import (CONFIGMAP_RESOURCE, EXEMPTION_RESOURCE, NODE_RESOURCE,
                      POD_IP_POOL_RESOURCE, ApiError, FakeCluster)
from .nodestatus import patch_status
from .objects import (API_VERSION, COLLECTION, EXEMPTION_COLLECTION, GROUP, KIND, META_API_VERSION, NODE_COLLECTION,
                      PLURAL, POD_IP_POOL_COLLECTION, VERSION, partial_object_metadata,
                      status_object)

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
    raise ApiError(406, "NotAcceptable", f"only the following media types are accepted: "
                                         f"application/json, application/json;as={want};"
                                         f"g=meta.k8s.io;v=v1")


def as_metadata_list(page: dict) -> dict:
    return {"apiVersion": META_API_VERSION, "kind": LIST_VIEW, "metadata": page["metadata"],
            "items": [partial_object_metadata(o) for o in page["items"]]}

log = logging.getLogger("nodecryptor.fakeapi")


@dataclass
class _Faults:
    """Pending injected faults; FakeApiServer's methods set them, request handlers take them."""

    fail_remaining: int = 0
    fail_code: int = 500
    stall_remaining: int = 0
    stall_kind: str = "any"  # "any" | "watch" | "list" | "write"
    expire_next_watches: int = 0
    drop_generation: int = 0
    freeze_watches: bool = False
    frozen: bool = False
    """The whole server hangs: every request is accepted and never answered, open watches go
    silent (a stopped process, or a black hole behind a load balancer)."""
    stall_release: threading.Event = field(default_factory=threading.Event)


def _discovery(path: str, host: str) -> dict | None:
    if path == "/version":
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-nodecryptor-fake",
                "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs":
                [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
    if path == "/api/v1":
        return {"kind": "APIResourceList", "groupVersion": "v1",
                "resources": [{"name": "nodes", "singularName": "node", "namespaced": False,
                               "kind": "Node", "shortNames": ["no"],
                               "verbs": ["create", "delete", "get", "list", "patch", "update",
                                         "watch"]}]}
    group = {"name": GROUP, "versions": [{"groupVersion": API_VERSION, "version": VERSION}],
             "preferredVersion": {"groupVersion": API_VERSION, "version": VERSION}}
    if path == "/apis":
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [group]}
    if path == f"/apis/{GROUP}":
        return {"kind": "APIGroup", "apiVersion": "v1", **group}
    if path == f"/apis/{GROUP}/{VERSION}":
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": API_VERSION,
                "resources": [{"name": PLURAL, "singularName": "ciliumnode", "namespaced": False,
                               "kind": KIND, "shortNames": ["cn", "ciliumn"],
                               "verbs": ["delete", "deletecollection", "get", "list", "patch",
                                         "create", "update", "watch"]}]}
    return None


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "_HttpServer"

    def log_message(self, format, *args):  # noqa: A002 - signature fixed by the base class
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
                    answer = fake.control(path[len("/_fake/"):], self._read_body())
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
            if (method == "POST" and path.startswith("/api/v1/namespaces/")
                    and path.endswith("/events") and path.count("/") == 5):
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
                    raise ApiError(404, "NotFound",
                                   "the server could not find the requested resource")
                self._route(method, path, query, method == "GET" and watch_asked
                            and path == POD_IP_POOL_COLLECTION, fake.pod_ip_pools,
                            POD_IP_POOL_COLLECTION)
                return
            if path == EXEMPTION_COLLECTION or path.startswith(EXEMPTION_COLLECTION + "/"):
                # EncryptionExemptions: like CiliumNodes, but count-based faults stay aimed
                # at the CiliumNode requests; 404 while the CRD is "not installed".
                if not fake.exemptions_installed:
                    raise ApiError(404, "NotFound",
                                   "the server could not find the requested resource")
                self._route(method, path, query, method == "GET" and watch_asked
                            and path == EXEMPTION_COLLECTION, fake.exemptions,
                            EXEMPTION_COLLECTION)
                return
            if fake.take_stall("watch" if is_watch else "list" if method == "GET" else "write"):
                # Accept the request and never answer, like a hung server or a black hole.
                while not (fake.stopping.is_set() or fake.faults.stall_release.is_set()):
                    fake.stopping.wait(0.05)
                self.close_connection = True
                return
            code = fake.take_failure()
            if code:
                raise ApiError(code, "InternalError" if code == 500 else "ServiceUnavailable",
                               f"injected failure {code}")
            self._route(method, path, query, is_watch)
        except ApiError as err:
            self._send_error(err)
        except (BrokenPipeError, ConnectionResetError, ssl.SSLError, OSError) as e:
            log.debug("client went away: %s", e)
            self.close_connection = True

    def _route(self, method: str, path: str, query: dict, is_watch: bool,
               cluster: FakeCluster | None = None, collection: str = COLLECTION) -> None:
        cluster = cluster if cluster is not None else self.server.fake.cluster
        if method == "GET" and collection == COLLECTION:
            doc = _discovery(path, self.server.fake.host_port)
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
        if path.startswith(collection + "/") and "/" not in path[len(collection) + 1:]:
            name = urllib.parse.unquote(path[len(collection) + 1:])
            if method == "GET":
                self._send_json(200, cluster.get(name))
            elif method == "PUT":
                self._send_json(200, cluster.replace(name, self._read_body()))
            elif method == "PATCH":
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if ctype != "application/merge-patch+json":
                    # Custom resources support neither strategic merge nor (here) JSON patch.
                    raise ApiError(415, "UnsupportedMediaType",
                                   f"the body of the request was in an unknown format - "
                                   f"accepted media types include: application/merge-patch+json "
                                   f"(got {ctype!r})")
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
            self._patch_node_status(urllib.parse.unquote(
                path[len(NODE_COLLECTION) + 1:-len("/status")]))
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
            self._send_json(200, as_metadata_list(page)
                            if metadata_view(accept, LIST_VIEW) else page)
        else:
            name = urllib.parse.unquote(path[len(NODE_COLLECTION) + 1:])
            obj = nodes.get(name)
            self._send_json(200, partial_object_metadata(obj)
                            if metadata_view(accept, OBJECT_VIEW) else obj)

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
        wanted = selector[len("metadata.name="):] if selector.startswith("metadata.name=") \
            else None
        if selector and wanted is None:
            raise ApiError(400, "BadRequest", f"field selector {selector!r} is not supported")

        def match(obj: dict) -> bool:
            meta = obj.get("metadata") or {}
            return (namespace == fake.configmap_namespace
                    and (wanted is None or meta.get("name") == wanted))

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
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on nodes "{name}": '
                               f'the object has been modified; please apply your changes to the '
                               f'latest version and try again', name)
            if code:
                raise ApiError(code, "InternalError" if code == 500 else "ServiceUnavailable",
                               f"injected failure {code}")
            old = fake.nodes.objects.get(name)
            if old is None:
                raise ApiError(404, "NotFound", f'nodes "{name}" not found', name)
            new = patch_status(old, ctype, body)
            fake.status_patches.append((name, ctype, copy.deepcopy(body)))
            self._send_json(200, fake.nodes.replace(name, new, check_rv=False))

    def _create_event(self, namespace: str) -> None:
        body = self._read_body()
        if not isinstance(body, dict) or not isinstance(body.get("involvedObject"), dict) \
                or not body.get("reason"):
            raise ApiError(422, "Invalid", "Event: involvedObject and reason are required")
        fake = self.server.fake
        event = copy.deepcopy(body)
        meta = event.setdefault("metadata", {})
        meta["namespace"] = namespace
        meta.setdefault("name", f"{meta.get('generateName') or 'event.'}{len(fake.events)}")
        fake.events.append(event)
        self._send_json(201, event)

    def _watch(self, query: dict, cluster: FakeCluster | None = None,
               metadata_only: bool = False, match=None) -> None:
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
            err = ApiError(504, "Timeout", f"Too large resource version: {rv_text}, "
                                           f"current: {cluster.rv}")
            err.status["details"] = {"causes": [{"reason": "ResourceVersionTooLarge",
                                                 "message": "Too large resource version"}],
                                     "retryAfterSeconds": 1}
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

    def _stream_events(self, cluster: FakeCluster, rv_text: str, bookmarks: bool,
                       deadline: float, metadata_only: bool = False, match=None) -> None:
        fake = self.server.fake

        def encode(events: list[dict]) -> bytes:
            if match is not None:  # a field selector: other objects' events are not sent
                events = [e for e in events if e["type"] in ("ERROR", "BOOKMARK")
                          or match(e["object"])]
            if metadata_only:
                events = [{"type": e["type"], "object": partial_object_metadata(e["object"])}
                          if e["type"] != "ERROR" else e for e in events]
            return b"".join(json.dumps(e).encode() + b"\n" for e in events)

        generation = fake.faults.drop_generation
        bookmark_generation = fake.bookmark_generation
        with cluster.cond:
            # The count-based expiry fault is aimed at CiliumNode watches only.
            expire = fake.take_expire() if cluster is fake.cluster else False
            if not expire and rv_text not in ("", "0"):
                expire = int(rv_text) < cluster.oldest_watchable_rv
            if expire:
                status = status_object(410, "Expired", f"too old resource version: {rv_text or 0} "
                                                       f"({cluster.oldest_watchable_rv})")
                pending: list[dict] = [{"type": "ERROR", "object": status}]
            elif rv_text in ("", "0"):
                # No version: the current state as ADDED events, then changes.
                pending = [{"type": "ADDED", "object": copy.deepcopy(cluster.objects[n])}
                           for n in sorted(cluster.objects)]
            else:
                pending = [{"type": t, "object": o} for rv, t, o in cluster.history
                           if rv > int(rv_text)]
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
                if bookmarks and (now >= next_bookmark
                                  or fake.bookmark_generation != bookmark_generation):
                    bookmark_generation = fake.bookmark_generation
                    with cluster.cond:
                        self._chunk(encode([cluster.bookmark()]))
                    next_bookmark = now + fake.bookmark_interval
            with cluster.cond:
                frozen = fake.faults.freeze_watches or fake.faults.frozen
                if frozen or cluster.rv == seen:
                    cluster.cond.wait(0.05)
                if not frozen and cluster.rv != seen:
                    pending = [{"type": t, "object": o} for rv, t, o in cluster.history
                               if rv > seen]
                    seen = cluster.rv


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, fake: "FakeApiServer", family: int):
        self.address_family = family
        self.fake = fake
        super().__init__(addr, _Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.fake.ssl_context is not None:
            sock = self.fake.ssl_context.wrap_socket(sock, server_side=True,
                                                     do_handshake_on_connect=False)
        self.fake.track(sock)
        return sock, addr

    def shutdown_request(self, request):
        self.fake.untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class FakeApiServer:
    """The fake API server. Use as a context manager, or start()/stop().

    ``port=0`` picks a free port; after start(), ``url`` and ``port`` are set.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "nodecryptor-test",
                 objects: list[dict] | tuple = (), history_limit: int = 1000,
                 bookmark_interval: float = 60.0, tls: bool = False, initial_rv: int = 0):
        self.host = host
        self.port = port
        self.token = token
        self.bookmark_interval = bookmark_interval
        """Seconds between BOOKMARK events on a watch that asked for them (real: ~60 s)."""
        self.cluster = FakeCluster(history_limit, initial_rv)
        self.nodes = FakeCluster(history_limit, initial_rv, NODE_RESOURCE,
                                 shared_with=self.cluster)
        """v1 Nodes, sharing the CiliumNodes' resourceVersion counter as etcd does."""
        self.exemptions = FakeCluster(history_limit, initial_rv, EXEMPTION_RESOURCE,
                                      shared_with=self.cluster)
        """EncryptionExemptions (nodecryptor.io/v1alpha1)."""
        self.exemptions_installed = True
        """False: every EncryptionExemption request answers 404, as without the CRD."""
        self.configmaps = FakeCluster(history_limit, initial_rv, CONFIGMAP_RESOURCE,
                                      shared_with=self.cluster)
        """ConfigMaps of ``configmap_namespace`` (Cilium's ``cilium-config``)."""
        self.configmap_namespace = "kube-system"
        self.pod_ip_pools = FakeCluster(history_limit, initial_rv, POD_IP_POOL_RESOURCE,
                                        shared_with=self.cluster)
        """CiliumPodIPPools (cilium.io/v2alpha1)."""
        self.pod_ip_pools_installed = True
        """False: every CiliumPodIPPool request answers 404, as without the CRD."""
        self.node_requests: collections.deque[tuple[str, str, str]] = collections.deque(
            maxlen=10000)
        """(method, path with query, Accept header) of recent Node requests."""
        self.faults = _Faults()
        self.status_faults: collections.deque[int] = collections.deque()
        """Status codes the next PATCHes of nodes/<name>/status answer with (409, 500...)."""
        self.status_patches: list[tuple[str, str, object]] = []
        """(node, content type, body) of every accepted nodes/<name>/status PATCH."""
        self.events: list[dict] = []
        """core/v1 Events created (any namespace)."""
        self.stopping = threading.Event()
        self._lock = threading.Lock()
        self._sockets: set = set()
        self._open_watches = 0
        self.bookmark_generation = 0
        """Bumped by send_bookmark(); each open watch sends a BOOKMARK when it changes."""
        self._httpd: _HttpServer | None = None
        self._thread: threading.Thread | None = None
        self._tls_dir: tempfile.TemporaryDirectory | None = None
        self.ssl_context: ssl.SSLContext | None = None
        self.ca_pem: bytes | None = None
        if tls:
            self._make_tls()
        for obj in objects:
            self.apply(obj)

    # Lifecycle

    @property
    def scheme(self) -> str:
        return "https" if self.ssl_context is not None else "http"

    @property
    def host_port(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host_port}"

    def start(self) -> "FakeApiServer":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        self._httpd = _HttpServer((self.host, self.port), self, family)
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=f"fakeapi-{self.port}", daemon=True)
        self._thread.start()
        log.info("fake API server listening", extra={"fields": {"url": self.url}})
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._close_listener()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)
        if self._tls_dir is not None:
            self._tls_dir.cleanup()
            self._tls_dir = None

    def _close_listener(self) -> None:
        httpd, thread = self._httpd, self._thread
        self._httpd = self._thread = None
        if httpd is not None:
            httpd.shutdown()
            httpd.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> "FakeApiServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def track(self, sock) -> None:
        with self._lock:
            self._sockets.add(sock)

    def untrack(self, sock) -> None:
        with self._lock:
            self._sockets.discard(sock)

    # TLS and kubeconfig

    def _make_tls(self) -> None:
        self._tls_dir = tempfile.TemporaryDirectory(prefix="nc-fakeapi-")
        cert = os.path.join(self._tls_dir.name, "tls.crt")
        key = os.path.join(self._tls_dir.name, "tls.key")
        ip_san = f"IP:{self.host}," if self.host else ""
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
                        "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", key, "-out", cert,
                        "-days", "2", "-subj", "/CN=nodecryptor-fakeapi",
                        "-addext", f"subjectAltName={ip_san}IP:127.0.0.1,DNS:localhost",
                        "-addext", "basicConstraints=critical,CA:TRUE"],
                       check=True, capture_output=True)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.ssl_context = ctx
        with open(cert, "rb") as f:
            self.ca_pem = f.read()

    def kubeconfig(self, token: str | None = None) -> dict:
        cluster: dict = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {"apiVersion": "v1", "kind": "Config", "current-context": "fake",
                "clusters": [{"name": "fake", "cluster": cluster}],
                "users": [{"name": "fake", "user": {"token": self.token if token is None
                                                    else token}}],
                "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
                "preferences": {}}

    def write_kubeconfig(self, path: str, token: str | None = None) -> str:
        """Write a kubeconfig (JSON is valid YAML) pointing at this server."""
        tmp = f"{path}.tmp"
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "w") as f:
            json.dump(self.kubeconfig(token), f, indent=2)
        os.replace(tmp, path)
        return path

    # Objects

    def apply(self, obj: dict) -> dict:
        """Create or replace a CiliumNode, or a v1 Node (``kind: Node``)."""
        if isinstance(obj, dict) and obj.get("kind") == "Node":
            return self.nodes.apply(obj)
        if isinstance(obj, dict) and obj.get("kind") == "EncryptionExemption":
            return self.exemptions.apply(obj)
        if isinstance(obj, dict) and obj.get("kind") == "ConfigMap":
            return self.configmaps.apply(obj)
        if isinstance(obj, dict) and obj.get("kind") == "CiliumPodIPPool":
            return self.pod_ip_pools.apply(obj)
        return self.cluster.apply(obj)

    def delete_configmap(self, name: str) -> dict:
        return self.configmaps.delete(name)

    def delete_pod_ip_pool(self, name: str) -> dict:
        return self.pod_ip_pools.delete(name)

    def delete_exemption(self, name: str) -> dict:
        return self.exemptions.delete(name)

    def delete_node(self, name: str) -> dict:
        return self.nodes.delete(name)

    def delete(self, name: str) -> dict:
        return self.cluster.delete(name)

    def get(self, name: str) -> dict:
        return self.cluster.get(name)

    @property
    def resource_version(self) -> int:
        return self.cluster.rv

    # Faults

    def compact(self) -> None:
        self.cluster.compact()
        self.nodes.compact()
        self.exemptions.compact()
        self.configmaps.compact()
        self.pod_ip_pools.compact()

    def advance(self, count: int = 1) -> None:
        self.cluster.advance(count)

    def expire_next_continue(self, count: int = 1) -> None:
        """The next ``count`` list requests with a continue token get 410 Expired."""
        with self.cluster.cond:
            self.cluster.expire_next_continues += count

    def expire_next_watch(self, count: int = 1) -> None:
        """The next ``count`` watches answer with an ERROR event carrying 410 Expired."""
        with self.cluster.cond:
            self.faults.expire_next_watches += count

    def take_expire(self) -> bool:
        if self.faults.expire_next_watches > 0:
            self.faults.expire_next_watches -= 1
            return True
        return False

    def drop_watches(self) -> None:
        """Cut every open watch connection abruptly (no terminating chunk)."""
        with self.cluster.cond:
            self.faults.drop_generation += 1

    def send_bookmark(self) -> None:
        """Make every open watch that allows bookmarks send one now."""
        with self.cluster.cond:
            self.bookmark_generation += 1
            self.cluster.cond.notify_all()

    def freeze_watches(self, frozen: bool = True) -> None:
        """Open and new watches stop sending anything (events, bookmarks, their end) while
        frozen: the connection stays open but dead, as behind a black-holing middlebox."""
        self.faults.freeze_watches = frozen

    def freeze(self, frozen: bool = True) -> None:
        """Hang the whole server: connections are still accepted, but no request is answered
        and open watches send nothing, until ``freeze(False)``. Requests that arrived while
        frozen are then dropped unanswered. ``POST /_fake/freeze`` still answers."""
        self.faults.frozen = frozen

    def stall_next(self, count: int = 1, kind: str = "any") -> None:
        """The next ``count`` requests of ``kind`` ("any", "watch", "list", "write") are
        accepted and never answered, until release_stalls() or stop()."""
        if kind not in ("any", "watch", "list", "write"):
            raise ValueError(f"stall kind {kind!r}: expected any, watch, list or write")
        with self.cluster.cond:
            self.faults.stall_release.clear()
            self.faults.stall_remaining = count
            self.faults.stall_kind = kind

    def release_stalls(self) -> None:
        self.faults.stall_release.set()

    def take_stall(self, kind: str) -> bool:
        with self.cluster.cond:
            f = self.faults
            if f.stall_remaining > 0 and f.stall_kind in ("any", kind):
                f.stall_remaining -= 1
                return True
            return False

    def fail_next(self, count: int, code: int = 500) -> None:
        """The next ``count`` requests fail with ``code`` (and a Status body)."""
        with self.cluster.cond:
            self.faults.fail_remaining = count
            self.faults.fail_code = code

    def take_failure(self) -> int:
        with self.cluster.cond:
            if self.faults.fail_remaining > 0:
                self.faults.fail_remaining -= 1
                return self.faults.fail_code
            return 0

    def refuse_connections(self) -> None:
        """Close the listening socket (connections are refused) and cut open connections."""
        self.drop_watches()
        self._close_listener()
        with self._lock:
            sockets = list(self._sockets)
        for sock in sockets:
            _shutdown(sock)

    def accept_connections(self) -> None:
        """Listen again on the same port after refuse_connections()."""
        if self._httpd is None:
            self.start()

    def watch_opened(self) -> None:
        with self._lock:
            self._open_watches += 1

    def watch_closed(self) -> None:
        with self._lock:
            self._open_watches -= 1

    @property
    def open_watches(self) -> int:
        with self._lock:
            return self._open_watches

    def fail_status_next(self, count: int, code: int = 409) -> None:
        """Answer the next ``count`` PATCHes of nodes/<name>/status with ``code``."""
        with self.nodes.cond:
            self.status_faults.extend([code] * count)

    def take_status_fault(self) -> int:
        return self.status_faults.popleft() if self.status_faults else 0

    def control(self, action: str, body: object) -> dict:
        """``POST /_fake/<action>`` for a fake running in another process."""
        args = body if isinstance(body, dict) else {}
        if action == "compact":
            self.compact()
        elif action == "expire-next-watch":
            self.expire_next_watch(int(args.get("count", 1)))
        elif action == "expire-next-continue":
            self.expire_next_continue(int(args.get("count", 1)))
        elif action == "advance":
            self.advance(int(args.get("count", 1)))
        elif action == "drop-watches":
            self.drop_watches()
        elif action == "bookmark":
            self.send_bookmark()
        elif action == "freeze":
            self.freeze(bool(args.get("frozen", True)))
        elif action == "freeze-watches":
            self.freeze_watches(bool(args.get("frozen", True)))
        elif action == "stall-next":
            self.stall_next(int(args.get("count", 1)), str(args.get("kind", "any")))
        elif action == "release-stalls":
            self.release_stalls()
        elif action == "fail-next":
            self.fail_next(int(args.get("count", 1)), int(args.get("code", 500)))
        elif action == "apply":
            # Create or replace any object (v1 Nodes included, which the HTTP API here only
            # serves read-only), e.g. to relabel a Node from another process.
            obj = args.get("object")
            if not isinstance(obj, dict):
                raise ValueError("apply needs {\"object\": {...}}")
            self.apply(obj)
        elif action == "delete-node":
            # A v1 Node removed (kubectl delete node), which the HTTP API here does not take.
            self.delete_node(str(args.get("name", "")))
        elif action == "exemptions-installed":
            self.exemptions_installed = bool(args.get("installed", True))
        elif action == "fail-status-next":
            self.fail_status_next(int(args.get("count", 1)), int(args.get("code", 409)))
        elif action == "status-patches":
            return {"ok": True, "action": action, "patches": len(self.status_patches),
                    "events": len(self.events)}
        elif action == "refuse":
            seconds = float(args.get("seconds", 5))
            # Reopen from a timer: once the listener is closed this endpoint is unreachable.
            threading.Thread(target=self._refuse_for, args=(seconds,), daemon=True).start()
        else:
            raise ApiError(404, "NotFound", f"unknown fake control action {action!r}")
        return {"ok": True, "action": action, "resourceVersion": str(self.cluster.rv)}

    def _refuse_for(self, seconds: float) -> None:
        time.sleep(0.1)  # let the control request's answer leave first
        self.refuse_connections()
        if not self.stopping.wait(seconds):
            self.accept_connections()


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its handler
