"""The fake API server's lifecycle: FakeApiServer, the object tests and the lab use - listening
(TLS optional) and stopping, the connections it tracks, the kubeconfig that points at it and the
objects it serves; its fault injection comes from faults.py."""

from __future__ import annotations

import base64
import collections
import http.server
import json
import logging
import os
import socket
import ssl
import subprocess
import tempfile
import threading

from .cluster import (
    CONFIGMAP_RESOURCE,
    EXEMPTION_RESOURCE,
    NODE_RESOURCE,
    POD_IP_POOL_RESOURCE,
    FakeCluster,
)
from .faults import FaultInjection, Faults
from .handler import Handler

log = logging.getLogger("nodecryptor.fakeapi")


class _HttpServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128

    def __init__(self, addr, fake: "FakeApiServer", family: int):
        self.address_family = family
        self.fake = fake
        super().__init__(addr, Handler)

    def get_request(self):
        sock, addr = super().get_request()
        if self.fake.ssl_context is not None:
            sock = self.fake.ssl_context.wrap_socket(
                sock, server_side=True, do_handshake_on_connect=False
            )
        self.fake.track(sock)
        return sock, addr

    def shutdown_request(self, request):
        self.fake.untrack(request)
        super().shutdown_request(request)

    def handle_error(self, request, client_address):
        log.debug("connection from %s ended with an error", client_address, exc_info=True)


class FakeApiServer(FaultInjection):
    """The fake API server. Use as a context manager, or start()/stop().

    ``port=0`` picks a free port; after start(), ``url`` and ``port`` are set.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str = "nodecryptor-test",
        objects: list[dict] | tuple = (),
        history_limit: int = 1000,
        bookmark_interval: float = 60.0,
        tls: bool = False,
        initial_rv: int = 0,
    ):
        self.host = host
        self.port = port
        self.token = token
        self.bookmark_interval = bookmark_interval
        """Seconds between BOOKMARK events on a watch that asked for them (real: ~60 s)."""
        self.cluster = FakeCluster(history_limit, initial_rv)
        self.nodes = FakeCluster(history_limit, initial_rv, NODE_RESOURCE, shared_with=self.cluster)
        """v1 Nodes, sharing the CiliumNodes' resourceVersion counter as etcd does."""
        self.exemptions = FakeCluster(
            history_limit, initial_rv, EXEMPTION_RESOURCE, shared_with=self.cluster
        )
        """EncryptionExemptions (nodecryptor.io/v1alpha1)."""
        self.exemptions_installed = True
        """False: every EncryptionExemption request answers 404, as without the CRD."""
        self.configmaps = FakeCluster(
            history_limit, initial_rv, CONFIGMAP_RESOURCE, shared_with=self.cluster
        )
        """ConfigMaps of ``configmap_namespace`` (Cilium's ``cilium-config``)."""
        self.configmap_namespace = "kube-system"
        self.pod_ip_pools = FakeCluster(
            history_limit, initial_rv, POD_IP_POOL_RESOURCE, shared_with=self.cluster
        )
        """CiliumPodIPPools (cilium.io/v2alpha1)."""
        self.pod_ip_pools_installed = True
        """False: every CiliumPodIPPool request answers 404, as without the CRD."""
        self.node_requests: collections.deque[tuple[str, str, str]] = collections.deque(
            maxlen=10000
        )
        """(method, path with query, Accept header) of recent Node requests."""
        self.faults = Faults()
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
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fakeapi-{self.port}",
            daemon=True,
        )
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
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:prime256v1",
                "-nodes",
                "-keyout",
                key,
                "-out",
                cert,
                "-days",
                "2",
                "-subj",
                "/CN=nodecryptor-fakeapi",
                "-addext",
                f"subjectAltName={ip_san}IP:127.0.0.1,DNS:localhost",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
            ],
            check=True,
            capture_output=True,
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert, key)
        self.ssl_context = ctx
        with open(cert, "rb") as f:
            self.ca_pem = f.read()

    def kubeconfig(self, token: str | None = None) -> dict:
        cluster: dict = {"server": self.url}
        if self.ca_pem is not None:
            cluster["certificate-authority-data"] = base64.b64encode(self.ca_pem).decode()
        return {
            "apiVersion": "v1",
            "kind": "Config",
            "current-context": "fake",
            "clusters": [{"name": "fake", "cluster": cluster}],
            "users": [{"name": "fake", "user": {"token": self.token if token is None else token}}],
            "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
            "preferences": {},
        }

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

    # Connections

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


def _shutdown(sock) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by its handler
