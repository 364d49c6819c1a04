"""A small HTTP server for the agent's own endpoints (/healthz, /readyz, /metrics) that idle or
slow connections cannot starve.

The endpoints listen on the host network (the DaemonSet uses hostNetwork), so anything that can
reach the node can open connections to them. http.server's ThreadingHTTPServer, which
prometheus_client's own server also uses, starts a thread per connection and waits for a
request without a deadline: 600 idle connections held 606 threads. This server instead

- runs one thread with a selector: memory and threads do not grow with the connections;
- gives every connection ``request_seconds`` from accept to a complete request, and again to
  take its answer, however slowly it trickles bytes (slowloris), then closes it;
- keeps at most ``max_connections`` open: accepting one more closes the oldest, so a newcomer
  (the kubelet's probe, a Prometheus scrape) always gets a slot, and file descriptors stay
  bounded;
- reads at most ``max_request_bytes`` of request head, answers GET and HEAD only, and closes
  every connection after its answer (no keep-alive to hold slots).

Handlers run on the server thread, so they must be cheap: they read state other threads already
computed, never the API server, netlink or a lock a slow operation holds.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from nodecryptor.core.errors import SettingsError

log = logging.getLogger(__name__)

REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def parse_bind(text: str) -> tuple[str, int]:
    """``[HOST]:PORT`` -> (host, port); host "" means every IPv4 address. HOST is an IP
    literal (IPv6 in brackets): the agent resolves no names before it listens. Port 0 (any
    free port) is accepted here for embedding and tests; the CLI refuses it. Raises
    ValueError saying what is wrong."""
    host, sep, port = text.rpartition(":")
    if not sep:
        raise ValueError("expected [HOST]:PORT")
    # ASCII digits only: str.isdigit() also accepts other scripts' digits and superscripts.
    if not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ValueError(f"port {port!r} is not a number from 1 to 65535")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            if ipaddress.ip_address(inner).version != 6:
                raise ValueError
        except ValueError:
            raise ValueError(f"{host!r} is not a bracketed IPv6 address") from None
        return inner, int(port)
    if ":" in host:
        raise ValueError(f"IPv6 address {host!r} must be written in brackets: [{host}]:{port}")
    if host:
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(
                f"host {host!r} is not an IP address (names are not resolved; "
                f"leave it empty for every address)"
            ) from None
    return host, int(port)


def binds_overlap(a: tuple[str, int], b: tuple[str, int]) -> bool:
    """Whether two parsed bind addresses would compete for the same socket."""
    if a[1] != b[1]:
        return False
    wildcard = ("", "0.0.0.0", "::")
    return a[0] == b[0] or a[0] in wildcard or b[0] in wildcard


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    """Path without the query string."""
    headers: dict[str, str]
    """Header names in lower case."""


@dataclass(frozen=True)
class Response:
    status: int
    content_type: str
    body: bytes


Handler = Callable[[Request], Response]


@dataclass
class _Conn:
    sock: socket.socket
    deadline: float
    inbuf: bytearray = field(default_factory=bytearray)
    outbuf: bytes = b""
    writing: bool = False


class EndpointServer:
    """Serve ``routes`` (path -> handler) on ``bind``. The socket is bound and listening when
    the constructor returns, so a bad or busy address is reported before anything else
    starts; ``start()`` begins answering (connections made before queue in the backlog).

    ``flag`` names the option the address came from, for the SettingsError raised when it
    cannot be used."""

    def __init__(
        self,
        bind: str,
        routes: dict[str, Handler],
        *,
        flag: str = "bind address",
        max_connections: int = 64,
        request_seconds: float = 5.0,
        max_request_bytes: int = 8192,
        name: str = "http",
    ):
        try:
            host, port = parse_bind(bind)
        except ValueError as e:
            raise SettingsError(flag, bind, str(e)) from None
        self.routes = dict(routes)
        self.max_connections = max_connections
        self.request_seconds = request_seconds
        self.max_request_bytes = max_request_bytes
        self.name = name
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host or "0.0.0.0", port))
            # A deep backlog: connections wait there, not in SYN retries, while the loop
            # works through a burst.
            self._listener.listen(1024)
        except OSError as e:
            self._listener.close()
            raise SettingsError(flag, bind, f"cannot listen: {e.strerror or e}") from None
        self._listener.setblocking(False)
        self._conns: dict[socket.socket, _Conn] = {}
        """Open connections, oldest first (dicts keep insertion order)."""
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"{name}-server", daemon=True)
        self.evicted = 0
        """Connections closed to make room for a newer one (for tests and logs)."""
        self.timed_out = 0
        """Connections closed because they missed their deadline."""

    @property
    def port(self) -> int:
        return self._listener.getsockname()[1]

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    def start(self) -> "EndpointServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop answering and close every socket. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        try:
            os.write(self._wake_w, b"x")
        except OSError:
            pass
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        for conn in list(self._conns.values()):
            self._close(conn)
        self._listener.close()
        self._sel.close()
        os.close(self._wake_r)
        os.close(self._wake_w)

    # The loop

    def _serve(self) -> None:
        self._sel.register(self._listener, selectors.EVENT_READ, "accept")
        self._sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stopping.is_set():
            try:
                self._turn()
            except Exception:  # a bug must not silently end the endpoints; keep serving
                log.exception(
                    "endpoint server loop failed", extra={"fields": {"server": self.name}}
                )
                time.sleep(0.1)

    def _turn(self) -> None:
        now = time.monotonic()
        timeout = 1.0
        if self._conns:
            timeout = max(0.0, min(timeout, min(c.deadline for c in self._conns.values()) - now))
        accept = False
        for key, events in self._sel.select(timeout):
            if key.data == "accept":
                accept = True
            elif key.data == "wake":
                return
            else:
                conn = key.data
                if conn.sock in self._conns:
                    if events & selectors.EVENT_READ and not conn.writing:
                        self._read(conn)
                    elif events & selectors.EVENT_WRITE and conn.writing:
                        self._write(conn)
        if accept:
            # After the reads: a connection whose request is waiting is answered before a
            # burst of newcomers can push it out.
            self._accept()
        now = time.monotonic()
        for conn in [c for c in self._conns.values() if c.deadline <= now]:
            self.timed_out += 1
            self._close(conn)

    def _accept(self) -> None:
        # At most half the cap per turn: a connection accepted in one turn survives the next
        # turn's accepts, and reads come first in a turn, so a request that has arrived is
        # answered before newcomers can push its connection out, however fast they come.
        for _ in range(max(1, self.max_connections // 2)):
            try:
                sock, _addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and friends: log, and let the backlog wait
                log.warning(
                    "cannot accept a connection",
                    extra={"fields": {"server": self.name, "error": str(e)}},
                )
                return
            while len(self._conns) >= self.max_connections:
                self.evicted += 1
                self._close(next(iter(self._conns.values())))
            sock.setblocking(False)
            conn = _Conn(sock, time.monotonic() + self.request_seconds)
            self._conns[sock] = conn
            self._sel.register(sock, selectors.EVENT_READ, conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        end = conn.inbuf.find(b"\r\n\r\n")
        if end < 0:
            if len(conn.inbuf) > self.max_request_bytes:
                self._respond(conn, None, Response(431, "text/plain", b"request too large\n"))
            return
        request = _parse(bytes(conn.inbuf[:end]))
        if request is None:
            response = Response(400, "text/plain", b"bad request\n")
        elif request.method not in ("GET", "HEAD"):
            response = Response(405, "text/plain", b"only GET and HEAD\n")
        else:
            response = self._dispatch(request)
        self._respond(conn, request, response)

    def _dispatch(self, request: Request) -> Response:
        handler = self.routes.get(request.path)
        if handler is None:
            return Response(404, "text/plain", b"not found\n")
        try:
            return handler(request)
        except Exception as e:  # a failing handler answers 500; the server keeps serving
            log.exception(
                "endpoint handler failed",
                extra={"fields": {"server": self.name, "path": request.path}},
            )
            return Response(500, "text/plain", f"{type(e).__name__}\n".encode())

    def _respond(self, conn: _Conn, request: Request | None, response: Response) -> None:
        body = b"" if request is not None and request.method == "HEAD" else response.body
        head = (
            f"HTTP/1.1 {response.status} {REASONS.get(response.status, 'Unknown')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode("latin-1")
        conn.outbuf = head + body
        conn.inbuf.clear()
        conn.writing = True
        # A fresh deadline to take the answer: a client that never reads it is closed too.
        conn.deadline = time.monotonic() + self.request_seconds
        self._sel.modify(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.outbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        conn.outbuf = conn.outbuf[sent:]
        if not conn.outbuf:
            try:
                conn.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass
            self._close(conn)

    def _close(self, conn: _Conn) -> None:
        if self._conns.pop(conn.sock, None) is None:
            return
        try:
            self._sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()


def _parse(head: bytes) -> Request | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    method, target, _version = parts
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            return None
        headers[name.strip().lower()] = value.strip()
    return Request(method, target.split("?", 1)[0], headers)
