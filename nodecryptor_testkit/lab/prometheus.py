"""Debian's Prometheus in the lab: it runs in the first control-plane node's network namespace
with its own data directory under the lab's work directory, listens on that namespace's
loopback, scrapes every agent's /metrics with the shipped alerting rules loaded (the lab
variant from rules.py: `for:` holds and range windows shortened) and is read through its HTTP
API.

The agents listen on their node's loopback (127.0.0.1:9884), which no other namespace can
reach, so scrapes go through a relay: an HTTP server on the control-plane namespace's loopback,
run by this process, that fetches /nodes/<node>/metrics from inside that node's namespace. It
plays an out-of-band management path: breaking a node's WireGuard does not hide that node's
own metrics. (Over a real cluster network, a node that drops its cluster traffic fail-closed
may also become unscrapable: NodecryptorMetricsDown covers that.)"""

from __future__ import annotations

import http.server
import json
import os
import shutil
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

import yaml

from . import rules
from nodecryptor_testkit.wait import WaitTimeout, wait_for

from . import topology as topo
from .topology import LabError

JOB = "nodecryptor-metrics"  # the job name the ServiceMonitor's scrapes get (its Service)
PROMETHEUS_PORT = 9090
RELAY_PORT = 9885


def prometheus_binary() -> str | None:
    return shutil.which("prometheus")


def _get(url: str, timeout: float = 5.0) -> bytes:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(url, timeout=timeout) as resp:
        return resp.read()


class _Relay(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, lab, metrics_bind: str):
        self.lab, self.metrics_bind = lab, metrics_bind
        super().__init__(("127.0.0.1", RELAY_PORT), _RelayHandler)


class _RelayHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        parts = self.path.strip("/").split("/")
        node = parts[1] if len(parts) == 3 and parts[0] == "nodes" else ""
        handle = self.server.lab.nodes.get(node)
        if handle is None or parts[2:] != ["metrics"]:
            self.send_error(404, "expected /nodes/<lab node>/metrics")
            return
        url = f"http://{self.server.metrics_bind}/metrics"
        try:
            body = topo.call_in_netns(handle.netns, _get, url, 3.0)
        except (urllib.error.URLError, OSError) as e:
            self.send_error(502, f"{node}: {e}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):  # scrapes every second: not worth a line each
        pass


class LabPrometheus:
    """``start()`` writes the configuration and rules, starts the relay and Prometheus and
    waits until every node's target is up; ``stop()`` ends both (the lab's reaper removes the
    work directory and any process left)."""

    def __init__(
        self, lab, interval_seconds: int = 1, hold_seconds: int = 3, window_seconds: int = 15
    ):
        from .lab import METRICS_BIND

        self.lab = lab
        self.metrics_bind = METRICS_BIND
        self.interval, self.hold, self.window = interval_seconds, hold_seconds, window_seconds
        self.node = lab.spec.control_plane[0].name
        self.netns = lab.nodes[self.node].netns
        self.dir = os.path.join(lab.workdir, "prometheus")
        self.proc = None
        self.relay: _Relay | None = None
        self.url = f"http://127.0.0.1:{PROMETHEUS_PORT}"

    def config(self) -> dict:
        return {
            "global": {
                "scrape_interval": f"{self.interval}s",
                "evaluation_interval": f"{self.interval}s",
                "scrape_timeout": f"{self.interval}s",
            },
            "rule_files": ["rules.yaml"],
            "scrape_configs": [
                {
                    "job_name": JOB,
                    "static_configs": [
                        {
                            "targets": [f"127.0.0.1:{RELAY_PORT}"],
                            "labels": {"node": name, "__metrics_path__": f"/nodes/{name}/metrics"},
                        }
                        for name in self.lab.nodes
                    ],
                }
            ],
        }

    def start(self) -> "LabPrometheus":
        binary = prometheus_binary()
        if binary is None:
            raise LabError(
                "prometheus not installed (Debian package prometheus; scripts/setup.sh installs it)"
            )
        os.makedirs(os.path.join(self.dir, "data"), exist_ok=True)
        for name, doc in (
            ("prometheus.yml", self.config()),
            ("rules.yaml", rules.lab_rule_file(self.hold, self.window)),
        ):
            with open(os.path.join(self.dir, name), "w") as f:
                yaml.safe_dump(doc, f, sort_keys=False)
        self.relay = topo.call_in_netns(self.netns, _Relay, self.lab, self.metrics_bind)
        threading.Thread(
            target=self.relay.serve_forever, name="lab-scrape-relay", daemon=True
        ).start()
        self.proc = self.lab.spawn(
            [
                binary,
                f"--config.file={self.dir}/prometheus.yml",
                f"--storage.tsdb.path={self.dir}/data",
                f"--web.listen-address=127.0.0.1:{PROMETHEUS_PORT}",
                "--storage.tsdb.retention.time=1h",
            ],
            "prometheus",
            "prometheus",
            netns=self.netns,
        )
        wait_for(self._ready, 60, "Prometheus to answer /-/ready", interval=0.5)
        wait_for(self._targets_up, 60, "every agent's target to be up", interval=0.5)
        return self

    def _ready(self) -> bool:
        if self.proc.poll() is not None:
            raise LabError(
                f"prometheus exited ({self.proc.returncode}):\n" + self.lab.log_tail("prometheus")
            )
        try:
            return topo.call_in_netns(self.netns, _get, f"{self.url}/-/ready", 2.0) != b""
        except (urllib.error.URLError, OSError):
            return False

    def api(self, path: str, **params) -> dict:
        url = f"{self.url}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        doc = json.loads(topo.call_in_netns(self.netns, _get, url))
        if doc.get("status") != "success":
            raise LabError(f"Prometheus API {path}: {doc}")
        return doc["data"]

    def _targets_up(self) -> bool:
        active = self.api("targets")["activeTargets"]
        up = {t["labels"].get("node") for t in active if t["health"] == "up"}
        return up == set(self.lab.nodes)

    def firing(self) -> set[tuple[str, str]]:
        """(alertname, node) of every firing alert."""
        return {
            (a["labels"]["alertname"], a["labels"].get("node", ""))
            for a in self.api("alerts")["alerts"]
            if a["state"] == "firing"
        }

    def scrape(self, node: str) -> str:
        url = f"http://127.0.0.1:{RELAY_PORT}/nodes/{node}/metrics"
        return topo.call_in_netns(self.netns, _get, url).decode()

    def stop(self) -> None:
        if self.proc is not None:
            self.lab.stop(self.proc)
            self.proc = None
        if self.relay is not None:
            self.relay.shutdown()
            self.relay.server_close()
            self.relay = None


class Timeline:
    """Polls the firing alerts and keeps every change: (seconds since start, alert, node,
    "firing" or "resolved")."""

    def __init__(self, prom: LabPrometheus):
        self.prom = prom
        self.started = time.monotonic()
        self.current: set[tuple[str, str]] = set()
        self.events: list[tuple[float, str, str, str]] = []

    def poll(self) -> set[tuple[str, str]]:
        now = self.prom.firing()
        t = time.monotonic() - self.started
        for alert, node in sorted(now - self.current):
            self.events.append((t, alert, node, "firing"))
        for alert, node in sorted(self.current - now):
            self.events.append((t, alert, node, "resolved"))
        self.current = now
        return now

    def wait(self, check, timeout: float, what: str) -> float | None:
        """Seconds until ``check(firing set)`` holds, polling every 0.5 s; None on timeout."""
        start = time.monotonic()
        try:
            wait_for(lambda: check(self.poll()), timeout, what, interval=0.5)
        except WaitTimeout:
            return None
        return time.monotonic() - start

    def lines(self) -> list[str]:
        return [
            f"t+{t:6.1f} s  {state:<8} {alert}{{node={node}}}"
            for t, alert, node, state in self.events
        ]
