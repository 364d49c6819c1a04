"""A small fake kube-apiserver that serves CiliumNodes over the real HTTP protocol.

Tests run it in a thread; the network-namespace lab runs it as a process
(``python -m nodecryptor.testing.fakeapi --bind 127.0.0.1:6443 --objects cluster.json
--token T --write-kubeconfig kc``). It speaks what the official Python client uses:

- discovery: ``/version``, ``/api``, ``/apis``, ``/apis/cilium.io``, ``/apis/cilium.io/v2``;
- bearer-token authentication (401 with a Status object without it);
- ``ciliumnodes.cilium.io/v2``, cluster-scoped: GET one, LIST with ``limit``/``continue``
  (a consistent snapshot per list; 410 Expired for a continue token older than the retained
  history), WATCH as a chunked stream of JSON lines (ADDED, MODIFIED, DELETED, BOOKMARK, and
  ERROR carrying a Status with code 410 when the requested resourceVersion was compacted away),
  POST, PUT, PATCH (merge-patch) and DELETE;
- one global, monotonically increasing resourceVersion and a bounded event history.

Fault injection for tests (Python methods, also reachable as ``POST /_fake/<action>`` with the
token): compact the history, make the next watch or continue token fail with 410, drop open
watch connections, freeze them (open but silent), stall requests (accept and never answer),
fail the next N requests with a status code, refuse connections by closing the listening
socket, and advance the resourceVersion as writes to other resources would.

Label and field selectors are ignored: nodecryptor does not use them.
"""

from __future__ import annotations

import argparse
import base64
import copy
import datetime
import http.server
import ipaddress
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections import deque
from dataclasses import dataclass, field

log = logging.getLogger("nodecryptor.fakeapi")

GROUP = "cilium.io"
VERSION = "v2"
PLURAL = "ciliumnodes"
KIND = "CiliumNode"
API_VERSION = f"{GROUP}/{VERSION}"
COLLECTION = f"/apis/{GROUP}/{VERSION}/{PLURAL}"
WG_PUBKEY_ANNOTATION = "network.cilium.io/wg-pub-key"
CONTROL_PLANE_LABEL = "node-role.kubernetes.io/control-plane"
MASTER_LABEL = "node-role.kubernetes.io/master"
MAX_SNAPSHOTS = 64
"""Paginated lists in progress that the server remembers."""
# Fixed namespace for uuid5 so that generated objects (and the bundled example) are stable.
_UID_NAMESPACE = uuid.UUID("6c1f4b1e-2a53-4d0c-9a43-6e6f64656372")


# --------------------------------------------------------------------------------------------
# Objects as Cilium writes them


def make_ciliumnode(name: str, ipv4: str | None = None, ipv6: str | None = None,
                    pod_cidrs: list[str] | tuple[str, ...] = (), control_plane: bool = False,
                    label_style: str = "kubeadm", wg_pub_key: str | None = None) -> dict:
    """A CiliumNode shaped like the ones the Cilium agent writes for a Node.

    ``label_style`` picks how the Node marks a control-plane node, which Cilium copies:
    "kubeadm" (``node-role.kubernetes.io/control-plane: ""``), "k3s" (control-plane and master
    both ``"true"``) or "master" (old kubeadm, ``node-role.kubernetes.io/master: ""``).
    resourceVersion and creationTimestamp are filled in by the server when the object is
    stored; uid, bootid and the owner's uid are derived from the name so output is stable.
    """
    if label_style not in ("kubeadm", "k3s", "master"):
        raise ValueError(f"label_style {label_style!r}: expected kubeadm, k3s or master")
    labels = {
        "beta.kubernetes.io/arch": "amd64",
        "beta.kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    if control_plane:
        if label_style == "kubeadm":
            labels[CONTROL_PLANE_LABEL] = ""
            labels["node.kubernetes.io/exclude-from-external-load-balancers"] = ""
        elif label_style == "k3s":
            labels[CONTROL_PLANE_LABEL] = "true"
            labels[MASTER_LABEL] = "true"
        else:
            labels[MASTER_LABEL] = ""
    annotations = {}
    if wg_pub_key is not None:
        annotations[WG_PUBKEY_ANNOTATION] = wg_pub_key
    addresses = []
    for ip in (ipv4, ipv6):
        if ip:
            addresses.append({"type": "InternalIP", "ip": ip})
    health: dict = {}
    for cidr in pod_cidrs:
        net = ipaddress.ip_network(cidr, strict=False)
        # Cilium takes cilium_host's address (CiliumInternalIP) and the health endpoint's
        # address from the node's pod CIDR; which host numbers is the allocator's choice.
        if net.num_addresses > 4:
            addresses.append({"type": "CiliumInternalIP", "ip": str(net.network_address + 1)})
            health[f"ipv{net.version}"] = str(net.network_address + 2)
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Node", "name": name,
                                 "uid": str(uuid.uuid5(_UID_NAMESPACE, "node/" + name))}],
            "uid": str(uuid.uuid5(_UID_NAMESPACE, "ciliumnode/" + name)),
        },
        "spec": {
            "addresses": addresses,
            "alibaba-cloud": {},
            "azure": {},
            "bootid": str(uuid.uuid5(_UID_NAMESPACE, "boot/" + name)),
            "encryption": {},
            "eni": {},
            "health": health,
            "ingress": {},
            "ipam": {"podCIDRs": list(pod_cidrs), "pools": {}},
        },
        "status": {"alibaba-cloud": {}, "azure": {}, "eni": {}, "ipam": {"operator-status": {}}},
    }


def status_object(code: int, reason: str, message: str, name: str | None = None) -> dict:
    """A metav1.Status, the body of every error the API server returns."""
    out = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": message, "reason": reason, "code": code}
    if name is not None:
        out["details"] = {"name": name, "group": GROUP, "kind": PLURAL}
    return out


def merge_patch(target: object, patch: object) -> object:
    """JSON merge patch (RFC 7386): null deletes, objects merge, everything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


# --------------------------------------------------------------------------------------------
# Cluster state


class ApiError(Exception):
    """An error the server answers with a Status object."""

    def __init__(self, code: int, reason: str, message: str, name: str | None = None):
        super().__init__(message)
        self.status = status_object(code, reason, message, name)
        self.code = code


@dataclass
class _Snapshot:
    """The frozen result of a paginated list; continue tokens point into it."""

    rv: int
    items: list[dict]


@dataclass
class _Faults:
    fail_remaining: int = 0
    fail_code: int = 500
    stall_remaining: int = 0
    stall_kind: str = "any"  # "any" | "watch" | "list"
    expire_next_watches: int = 0
    drop_generation: int = 0
    freeze_watches: bool = False
    stall_release: threading.Event = field(default_factory=threading.Event)


class FakeCluster:
    """CiliumNodes, resourceVersions and the event history, independent of HTTP."""

    def __init__(self, history_limit: int = 1000):
        self.cond = threading.Condition()
        self.rv = 0
        self.objects: dict[str, dict] = {}
        self.history: deque[tuple[int, str, dict]] = deque(maxlen=history_limit)
        self.oldest_watchable_rv = 0
        """A watch may start from any rv >= this; older ones were compacted (410)."""
        self.snapshots: dict[str, _Snapshot] = {}
        self.expire_next_continues = 0
        """Fault: this many continue tokens are answered with 410 Expired."""
        self.requests: deque[tuple[str, str]] = deque(maxlen=10000)
        """(method, path with query) of recent API requests, for tests to inspect."""

    # Writes. Each one bumps the global resourceVersion and records an event.

    def _record(self, kind: str, obj: dict) -> None:
        if len(self.history) == self.history.maxlen:
            # The oldest retained event falls out: watching from before it is impossible.
            self.oldest_watchable_rv = self.history[0][0]
        # Stored objects are never mutated after this point (writes replace them), so the
        # history can share them with ``objects``.
        self.history.append((self.rv, kind, obj))
        self.cond.notify_all()

    def _stamp(self, obj: dict, old: dict | None) -> dict:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.rv)
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
            now = datetime.datetime.now(datetime.timezone.utc)
            meta.setdefault("creationTimestamp", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta.setdefault("generation", 1)
        return obj

    @staticmethod
    def _name_of(obj: object) -> str:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(422, "Invalid", "CiliumNode.cilium.io is invalid: metadata.name: "
                                           "Required value: name is required")
        return name

    def create(self, obj: dict) -> dict:
        with self.cond:
            name = self._name_of(obj)
            if name in self.objects:
                raise ApiError(409, "AlreadyExists",
                               f'ciliumnodes.cilium.io "{name}" already exists', name)
            obj = copy.deepcopy(obj)
            obj.setdefault("apiVersion", API_VERSION)
            obj.setdefault("kind", KIND)
            obj["metadata"].pop("resourceVersion", None)
            self.objects[name] = self._stamp(obj, None)
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def replace(self, name: str, obj: dict, check_rv: bool = True) -> dict:
        """PUT semantics: the whole object; a stale resourceVersion is a 409 conflict."""
        with self.cond:
            if self._name_of(obj) != name:
                raise ApiError(400, "BadRequest", "the name of the object does not match the "
                                                  "name on the URL", name)
            old = self.objects.get(name)
            if old is None:
                raise ApiError(404, "NotFound", f'ciliumnodes.cilium.io "{name}" not found', name)
            given = obj.get("metadata", {}).get("resourceVersion")
            if check_rv and given and given != old["metadata"]["resourceVersion"]:
                raise ApiError(409, "Conflict", f'Operation cannot be fulfilled on '
                               f'ciliumnodes.cilium.io "{name}": the object has been modified; '
                               f'please apply your changes to the latest version and try again',
                               name)
            return self._write(name, copy.deepcopy(obj), old)

    def _write(self, name: str, obj: dict, old: dict) -> dict:
        obj["apiVersion"], obj["kind"] = API_VERSION, KIND
        unchanged = {k: v for k, v in obj.items() if k != "metadata"} == \
            {k: v for k, v in old.items() if k != "metadata"}
        meta_new = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
        meta_old = {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
        if unchanged and meta_new == meta_old:
            # Like the real server, a write that changes nothing does not bump the version.
            return copy.deepcopy(old)
        self.objects[name] = self._stamp(obj, old)
        self._record("MODIFIED", obj)
        return copy.deepcopy(obj)

    def patch(self, name: str, patch: dict) -> dict:
        with self.cond:
            old = self.objects.get(name)
            if old is None:
                raise ApiError(404, "NotFound", f'ciliumnodes.cilium.io "{name}" not found', name)
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object", name)
            # merge_patch shares untouched subtrees with ``old``; stored objects must stay
            # immutable, so the result is copied before it is stamped.
            merged = copy.deepcopy(merge_patch(old, patch))
            if merged.get("metadata", {}).get("name") != name:
                raise ApiError(422, "Invalid", "metadata.name cannot be changed by a patch", name)
            return self._write(name, merged, old)

    def delete(self, name: str) -> dict:
        with self.cond:
            old = self.objects.pop(name, None)
            if old is None:
                raise ApiError(404, "NotFound", f'ciliumnodes.cilium.io "{name}" not found', name)
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", gone)
            return gone

    def apply(self, obj: dict) -> dict:
        """Create or replace, for tests and the lab (no conflict check)."""
        name = self._name_of(obj)
        with self.cond:
            if name in self.objects:
                return self.replace(name, obj, check_rv=False)
            return self.create(obj)

    def advance(self, count: int = 1) -> None:
        """Writes to other resources: the global resourceVersion moves on (as it does in
        etcd for every write in the cluster) without any CiliumNode event."""
        with self.cond:
            self.rv += count
            self.cond.notify_all()

    def compact(self) -> None:
        """Drop the whole history and every list snapshot: watches from any earlier
        resourceVersion and all outstanding continue tokens now get 410."""
        with self.cond:
            self.history.clear()
            self.oldest_watchable_rv = self.rv
            self.snapshots.clear()

    # Reads.

    def get(self, name: str) -> dict:
        with self.cond:
            obj = self.objects.get(name)
            if obj is None:
                raise ApiError(404, "NotFound", f'ciliumnodes.cilium.io "{name}" not found', name)
            return copy.deepcopy(obj)

    def list_page(self, limit: int, token: str) -> dict:
        with self.cond:
            if token:
                snap_id, start = self._decode_token(token)
                snap = self.snapshots.get(snap_id)
                if self.expire_next_continues > 0:
                    self.expire_next_continues -= 1
                    snap = None
                if snap is None or snap.rv < self.oldest_watchable_rv:
                    raise ApiError(410, "Expired", "The provided continue parameter is too old "
                                                   "to display a consistent list result. You "
                                                   "can start a new list without the continue "
                                                   "parameter.")
            else:
                snap_id, start = uuid.uuid4().hex, 0
                snap = _Snapshot(self.rv, [self.objects[n] for n in sorted(self.objects)])
            end = len(snap.items) if limit <= 0 else min(len(snap.items), start + limit)
            # Objects are replaced, never mutated in place, so sharing them is safe; the
            # encoder serialises them outside the lock.
            items = snap.items[start:end]
            meta: dict = {"resourceVersion": str(snap.rv)}
            if end < len(snap.items):
                self.snapshots[snap_id] = snap
                while len(self.snapshots) > MAX_SNAPSHOTS:
                    # Abandoned lists: forget the oldest (its token then gets 410).
                    del self.snapshots[next(iter(self.snapshots))]
                meta["continue"] = self._encode_token(snap_id, end)
                meta["remainingItemCount"] = len(snap.items) - end
            else:
                self.snapshots.pop(snap_id, None)
            return {"apiVersion": API_VERSION, "kind": f"{KIND}List", "metadata": meta,
                    "items": items}

    @staticmethod
    def _encode_token(snap_id: str, start: int) -> str:
        raw = json.dumps({"s": snap_id, "i": start}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_token(token: str) -> tuple[str, int]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = json.loads(raw)
            return str(data["s"]), int(data["i"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "BadRequest", f"invalid continue token {token!r}") from None

    def bookmark(self) -> dict:
        return {"type": "BOOKMARK", "object": {"apiVersion": API_VERSION, "kind": KIND,
                                               "metadata": {"resourceVersion": str(self.rv)}}}


# --------------------------------------------------------------------------------------------
# HTTP


def _discovery(path: str, host: str) -> dict | None:
    if path == "/version":
        return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-nodecryptor-fake",
                "gitCommit": "0" * 40, "gitTreeState": "clean", "buildDate": "2026-01-01T00:00:00Z",
                "goVersion": "go1.24", "compiler": "gc", "platform": "linux/amd64"}
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs":
                [{"clientCIDR": "0.0.0.0/0", "serverAddress": host}]}
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
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            return json.loads(raw or b"null")
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
        try:
            scheme, _, presented = (self.headers.get("Authorization") or "").partition(" ")
            # The scheme is case-insensitive (the in-cluster loader sends "bearer").
            if scheme.lower() != "bearer" or presented.strip() != fake.token:
                raise ApiError(401, "Unauthorized", "Unauthorized")
            if path.startswith("/_fake/") and method == "POST":
                self._send_json(200, fake.control(path[len("/_fake/"):], self._read_body()))
                return
            is_watch = (method == "GET" and path == COLLECTION
                        and query.get("watch", "").lower() in ("1", "true"))
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

    def _route(self, method: str, path: str, query: dict, is_watch: bool) -> None:
        cluster = self.server.fake.cluster
        if method == "GET":
            doc = _discovery(path, self.server.fake.host_port)
            if doc is not None:
                self._send_json(200, doc)
                return
        if path == COLLECTION:
            if is_watch:
                self._watch(query)
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
        if path.startswith(COLLECTION + "/") and "/" not in path[len(COLLECTION) + 1:]:
            name = urllib.parse.unquote(path[len(COLLECTION) + 1:])
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

    def _watch(self, query: dict) -> None:
        fake = self.server.fake
        cluster = fake.cluster
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("1", "true")
        timeout = query.get("timeoutSeconds", "")
        deadline = time.monotonic() + (int(timeout) if timeout.isdigit() else 1800)
        rv_text = query.get("resourceVersion", "")
        if rv_text and not rv_text.isdigit():
            raise ApiError(400, "BadRequest", f"resourceVersion {rv_text!r} is not valid")
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        fake.watch_opened()
        try:
            self._stream_events(cluster, rv_text, bookmarks, deadline)
        finally:
            fake.watch_closed()

    def _stream_events(self, cluster: FakeCluster, rv_text: str, bookmarks: bool,
                       deadline: float) -> None:
        fake = self.server.fake
        generation = fake.faults.drop_generation
        bookmark_generation = fake.bookmark_generation
        with cluster.cond:
            expire = fake.take_expire()
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
            self._chunk(json.dumps(pending[0]).encode() + b"\n")
            self._chunk(b"")
            return
        next_bookmark = time.monotonic() + fake.bookmark_interval
        while True:
            if fake.faults.drop_generation != generation or fake.stopping.is_set():
                # Cut the connection without the final chunk, as a dying proxy would.
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            if not fake.faults.freeze_watches:
                if pending:
                    self._chunk(b"".join(json.dumps(e).encode() + b"\n" for e in pending))
                    pending = []
                now = time.monotonic()
                if now >= deadline:
                    self._chunk(b"")
                    return
                if bookmarks and (now >= next_bookmark
                                  or fake.bookmark_generation != bookmark_generation):
                    bookmark_generation = fake.bookmark_generation
                    with cluster.cond:
                        self._chunk(json.dumps(cluster.bookmark()).encode() + b"\n")
                    next_bookmark = now + fake.bookmark_interval
            with cluster.cond:
                if cluster.rv == seen:
                    cluster.cond.wait(0.05)
                if not fake.faults.freeze_watches:
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


# --------------------------------------------------------------------------------------------
# The server object tests and the lab use


class FakeApiServer:
    """The fake API server. Use as a context manager, or start()/stop().

    ``port=0`` picks a free port; after start(), ``url`` and ``port`` are set.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, token: str = "nodecryptor-test",
                 objects: list[dict] | tuple = (), history_limit: int = 1000,
                 bookmark_interval: float = 60.0, tls: bool = False):
        self.host = host
        self.port = port
        self.token = token
        self.bookmark_interval = bookmark_interval
        """Seconds between BOOKMARK events on a watch that asked for them (real: ~60 s)."""
        self.cluster = FakeCluster(history_limit)
        self.faults = _Faults()
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
            self.cluster.apply(obj)

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
        return self.cluster.apply(obj)

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
        elif action == "freeze-watches":
            self.freeze_watches(bool(args.get("frozen", True)))
        elif action == "stall-next":
            self.stall_next(int(args.get("count", 1)), str(args.get("kind", "any")))
        elif action == "release-stalls":
            self.release_stalls()
        elif action == "fail-next":
            self.fail_next(int(args.get("count", 1)), int(args.get("code", 500)))
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


# --------------------------------------------------------------------------------------------
# Standalone process


def load_objects(path: str) -> list[dict]:
    """A JSON list of objects, or a CiliumNodeList (``{"items": [...]}``)."""
    with open(path) as f:
        data = json.load(f)
    items = data.get("items") if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise ValueError(f"{path}: expected a JSON list of CiliumNodes or an object with items")
    return items


def _parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--bind {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodecryptor.testing.fakeapi",
        description="Serve CiliumNodes like a kube-apiserver, for tests and the lab.",
        epilog="example:\n  python -m nodecryptor.testing.fakeapi --bind 127.0.0.1:6443 "
               "--objects nodecryptor/examples/cluster.json --token t --write-kubeconfig kc",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bind", type=_parse_bind, default=("127.0.0.1", 0), metavar="HOST:PORT")
    parser.add_argument("--objects", metavar="FILE.json", help="CiliumNodes to serve")
    parser.add_argument("--token", default="nodecryptor-test", help="accepted bearer token")
    parser.add_argument("--write-kubeconfig", metavar="PATH", help="write a kubeconfig here")
    parser.add_argument("--tls", action="store_true", help="serve HTTPS with a self-signed "
                                                           "certificate (CA in the kubeconfig)")
    parser.add_argument("--bookmark-interval", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument("--history", type=int, default=1000, metavar="EVENTS",
                        help="events retained for watches (default: %(default)s)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        objects = load_objects(args.objects) if args.objects else []
    except (OSError, ValueError) as e:
        print(f"fakeapi: --objects: {e}", file=sys.stderr)
        return 2
    host, port = args.bind
    server = FakeApiServer(host, port, token=args.token, objects=objects, tls=args.tls,
                           bookmark_interval=args.bookmark_interval,
                           history_limit=args.history)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    server.start()
    if args.write_kubeconfig:
        server.write_kubeconfig(args.write_kubeconfig)
    print(f"ready url={server.url} objects={len(objects)}"
          + (f" kubeconfig={args.write_kubeconfig}" if args.write_kubeconfig else ""), flush=True)
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
