"""HTTP endpoints: /healthz (liveness: the reconcile loop's heartbeat is fresh) and /readyz
(first full sync applied and datapath attached). Neither calls the API server, so an API outage
never restarts or unreadies a node that keeps enforcing its last known state."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]


def parse_bind(bind: str) -> tuple[str, int]:
    host, _, port = bind.rpartition(":")
    return host.strip("[]") or "", int(port)


class HealthServer:
    def __init__(self, bind: str, alive: Check, ready: Check, on_ready: Callable[[bool], None] | None = None):
        checks = {"/healthz": alive, "/readyz": ready}

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's naming)
                check = checks.get(self.path.split("?")[0])
                if check is None:
                    self.send_error(404)
                    return
                ok, reason = check()
                if on_ready and self.path.startswith("/readyz"):
                    on_ready(ok)
                body = json.dumps({"ok": ok, "reason": reason}).encode()
                self.send_response(200 if ok else 503)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, fmt, *args):
                log.debug("health request: " + fmt % args)

        host, port = parse_bind(bind)
        self.server = ThreadingHTTPServer((host, port), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, name="health",
                                       daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def start(self) -> "HealthServer":
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
