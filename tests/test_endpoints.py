"""The health and metrics endpoints cannot be starved: with hundreds of idle and slowloris
connections open against each port, /healthz and /metrics still answer, the server holds a
bounded number of connections and no thread per connection, slow clients are closed at their
deadline, /readyz never calls into the datapath, and an in-process agent against the fake API
server still applies a CiliumNode change.

Latencies under the flood are printed (pytest -s shows them), not asserted: the machine is
shared, and timing assertions would flake."""

from __future__ import annotations

import errno
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import pytest

from nodecryptor.agent.wiring import Agent, thread_check
from nodecryptor.datapath.base import FakeDatapath
from nodecryptor.observe.health import HealthServer
from nodecryptor.observe.httpserver import EndpointServer, Response
from nodecryptor.observe.metrics import Metrics, metrics_server
from nodecryptor.agent.reconcile import Reconciler
from nodecryptor.core.settings import Settings
from nodecryptor.cluster.store import Store
from nodecryptor_testkit.fakeapi import FakeApiServer, make_ciliumnode, make_node
from nodecryptor_testkit.wait import wait_for

CLIENT_TIMEOUT = 30  # generous: an answer must come, how fast is only recorded


def get(port: int, path: str, timeout: float = CLIENT_TIMEOUT) -> tuple[int, bytes, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read(), time.monotonic() - started
    except urllib.error.HTTPError as e:
        return e.code, e.read(), time.monotonic() - started


class Flood:
    """``idle`` connections that send nothing and ``slow`` ones that send one byte of a
    request every ``interval`` seconds (slowloris), against one port."""

    def __init__(self, port: int, idle: int = 500, slow: int = 500, interval: float = 1.0):
        self.port = port
        self.idle = [self._connect() for _ in range(idle)]
        self.slow = [self._connect() for _ in range(slow)]
        self.closed_by_server = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._trickle, args=(interval,), daemon=True)
        self._thread.start()

    def _connect(self) -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        err = sock.connect_ex(("127.0.0.1", self.port))
        assert err in (0, errno.EINPROGRESS), errno.errorcode.get(err)
        return sock

    def _trickle(self, interval: float) -> None:
        request = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 64
        sent = 0
        while not self._stop.wait(interval):
            for sock in list(self.slow):
                try:
                    sock.send(request[sent % len(request) :][:1])
                except OSError:  # closed by the server (deadline or eviction)
                    self.slow.remove(sock)
                    sock.close()
                    self.closed_by_server += 1
            sent += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for sock in self.idle + self.slow:
            sock.close()


@pytest.fixture
def floods():
    made: list[Flood] = []

    def make(port: int, **kw) -> Flood:
        made.append(Flood(port, **kw))
        return made[-1]

    yield make
    for f in made:
        f.close()


def test_flood_neither_starves_nor_grows_the_servers(floods):
    metrics = Metrics()
    metrics.ready.set(1)
    health = HealthServer(
        "127.0.0.1:0",
        lambda: (True, "fresh"),
        lambda: (True, "ready"),
        max_connections=32,
        request_seconds=2.0,
    ).start()
    scrape = metrics_server(
        metrics.registry, "127.0.0.1:0", max_connections=32, request_seconds=2.0
    ).start()
    try:
        threads_before = threading.active_count()
        floods(health.port)
        floods(scrape.port)
        # Both servers have been accepting the flood (beyond their cap, so evicting) before
        # their thread count is read.
        wait_for(
            lambda: health.server.evicted > 0 and scrape.evicted > 0,
            CLIENT_TIMEOUT,
            "the flood to overflow both servers",
        )
        assert threading.active_count() <= threads_before + 2  # the two trickle threads
        for _ in range(5):
            status, body, seconds = get(health.port, "/healthz")
            assert (status, json.loads(body)) == (200, {"ok": True, "reason": "fresh"})
            print(f"/healthz under a flood of 1000 connections: {seconds * 1000:.1f} ms")
            status, body, seconds = get(scrape.port, "/metrics")
            assert status == 200 and b"nodecryptor_ready 1.0" in body
            print(f"/metrics under a flood of 1000 connections: {seconds * 1000:.1f} ms")
        for server in (health.server, scrape):
            assert server.open_connections <= 32
            assert server.evicted > 0
    finally:
        health.stop()
        scrape.stop()


def test_slow_and_idle_clients_are_closed_at_their_deadline():
    server = EndpointServer(
        "127.0.0.1:0", {"/x": lambda r: Response(200, "text/plain", b"x")}, request_seconds=0.5
    ).start()
    try:
        idle = socket.create_connection(("127.0.0.1", server.port))
        slow = socket.create_connection(("127.0.0.1", server.port))
        idle.settimeout(CLIENT_TIMEOUT)
        slow.settimeout(CLIENT_TIMEOUT)
        slow.send(b"GET /x HTT")  # ...and never the rest
        for sock in (idle, slow):
            assert sock.recv(100) == b""  # closed without an answer
            sock.close()
        assert server.timed_out == 2 and server.open_connections == 0
    finally:
        server.stop()


@pytest.mark.parametrize(
    "request_bytes,status",
    [
        (b"GET /x HTTP/1.1\r\nHost: a\r\n\r\n", 200),
        (b"HEAD /x HTTP/1.1\r\n\r\n", 200),
        (b"GET /x?a=1 HTTP/1.0\r\n\r\n", 200),
        (b"GET /nope HTTP/1.1\r\n\r\n", 404),
        (b"POST /x HTTP/1.1\r\nContent-Length: 0\r\n\r\n", 405),
        (b"garbage\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\r\n" + b"X: " + b"a" * 20000 + b"\r\n\r\n", 431),
    ],
)
def test_requests_are_answered_and_closed(request_bytes, status):
    server = EndpointServer(
        "127.0.0.1:0", {"/x": lambda r: Response(200, "text/plain", b"x")}, max_request_bytes=8192
    ).start()
    try:
        with socket.create_connection(("127.0.0.1", server.port), timeout=CLIENT_TIMEOUT) as s:
            s.sendall(request_bytes)
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(f"HTTP/1.1 {status} ".encode()), answer[:80]
        assert b"Connection: close" in answer
        if request_bytes.startswith(b"HEAD"):
            assert answer.endswith(b"\r\n\r\n")
    finally:
        server.stop()


def test_a_failing_handler_answers_500_and_the_server_goes_on():
    def boom(_request):
        raise RuntimeError("bug")

    server = EndpointServer(
        "127.0.0.1:0", {"/boom": boom, "/ok": lambda r: Response(200, "text/plain", b"")}
    )
    server.start()
    try:
        assert get(server.port, "/boom")[0] == 500
        assert get(server.port, "/ok")[0] == 200
    finally:
        server.stop()


class BlockingDatapath(FakeDatapath):
    """apply() blocks until released (a slow netlink dump holding the apply lock);
    observe() counts its calls."""

    def __init__(self):
        super().__init__()
        self.release = threading.Event()
        self.blocking = False
        self.observed = 0

    def apply(self, desired):
        if self.blocking:
            self.release.wait(CLIENT_TIMEOUT)
        super().apply(desired)

    def observe(self):
        self.observed += 1
        return super().observe()


def test_readyz_answers_from_the_loop_state_not_the_datapath(tmp_path):
    from nodecryptor.policy.ciliumnode import parse_ciliumnode
    from nodecryptor.core.model import Device, WgState

    def worker(name: str, i: int):
        return parse_ciliumnode(
            make_ciliumnode(name, ipv4=f"192.0.2.{i}", pod_cidrs=[f"10.{i}.0.0/24"])
        )[0]

    datapath = BlockingDatapath()
    store = Store()
    rec = Reconciler(
        Settings(node_name="w1"),
        store,
        datapath,
        Metrics(),
        read_wg=lambda name: WgState(
            ifname=name,
            ifindex=9,
            present=True,
            up=True,
            mtu=1420,
            listen_port=51871,
            fwmark=0xE00,
            peers=(),
        ),
        resolve_devices=lambda names, addrs, exclude: ((Device("eth0", 2, 1500),), []),
        read_sysctl=lambda name: {"all": 0, name: 0},
    )
    store.replace_all([worker("w1", 1), worker("w2", 2)])
    assert rec.reconcile_once().ok
    observed = datapath.observed
    health = HealthServer("127.0.0.1:0", rec.alive, rec.ready).start()
    try:
        for _ in range(20):
            assert get(health.port, "/readyz")[0] == 200
        assert datapath.observed == observed  # probes never reached the datapath
        # A pass stuck in apply (holding the datapath's lock) does not hold up the probes.
        datapath.blocking = True
        store.upsert(worker("w3", 3))
        stuck = threading.Thread(target=rec.reconcile_once, daemon=True)
        stuck.start()
        assert get(health.port, "/readyz")[0] == 200
        assert get(health.port, "/healthz")[0] == 200
        assert stuck.is_alive()
        datapath.release.set()
        stuck.join(CLIENT_TIMEOUT)
    finally:
        datapath.release.set()
        health.stop()


def test_a_dead_thread_turns_liveness_red():
    done = threading.Thread(target=lambda: None, name="k8s-sync")
    done.start()
    done.join()
    ok, why = thread_check(done, lambda: (True, "fine"))()
    assert not ok and "k8s-sync has exited" in why
    running = threading.Event()
    alive = threading.Thread(target=running.wait, name="k8s-sync")
    alive.start()
    try:
        assert thread_check(alive, lambda: (False, "no progress"))() == (False, "no progress")
        assert thread_check(alive, lambda: (True, "fine"))() == (True, "fine")
    finally:
        running.set()
        alive.join()


def test_in_process_agent_applies_changes_during_a_flood(tmp_path, floods):
    """The agent's own wiring (Agent: store, sync, reconcile loop, link watcher, endpoints)
    with a fake datapath, against the fake API server, flooded on both ports."""
    token = "endpoint-test"
    # Each CiliumNode with its v1 Node, the trusted source of the node addresses. The agent
    # runs in the test host's namespace and takes the local node's prefixes from its kernel:
    # addresses from TEST-NET-2, which test hosts do not use (some use TEST-NET-1).
    objects = [
        make_ciliumnode("w1", ipv4="198.51.100.1", pod_cidrs=["10.1.0.0/24"]),
        make_ciliumnode("w2", ipv4="198.51.100.2", pod_cidrs=["10.2.0.0/24"]),
        make_node("w1", ipv4="198.51.100.1"),
        make_node("w2", ipv4="198.51.100.2"),
    ]
    with FakeApiServer(token=token, objects=objects, bookmark_interval=3600) as fake:
        settings = Settings(
            node_name="w1",
            kubeconfig=fake.write_kubeconfig(str(tmp_path / "kubeconfig")),
            health_bind="127.0.0.1:0",
            metrics_bind="127.0.0.1:0",
            request_timeout_seconds=2.0,
            watch_stall_seconds=10,
            reconcile_seconds=5,
            debounce_seconds=0.05,
        )
        agent = Agent(settings)
        datapath = FakeDatapath()
        stop = threading.Event()
        runner = threading.Thread(target=agent.run, args=(datapath, stop), daemon=True)
        runner.start()
        try:
            health_port, metrics_port = agent.health.port, agent.metrics_http.port

            def destinations() -> set[str]:
                current = datapath.current
                return {str(d.prefix) for d in current.destinations} if current else set()

            wait_for(
                lambda: "198.51.100.2/32" in destinations(),
                CLIENT_TIMEOUT,
                "the first state to be applied",
            )
            floods(health_port)
            floods(metrics_port)
            status, body, seconds = get(health_port, "/healthz")
            assert status == 200, body
            print(f"agent /healthz under 1000 connections: {seconds * 1000:.1f} ms")
            assert get(metrics_port, "/metrics")[0] == 200
            fake.apply(make_node("w3", ipv4="198.51.100.3"))
            fake.apply(make_ciliumnode("w3", ipv4="198.51.100.3", pod_cidrs=["10.3.0.0/24"]))
            started = time.monotonic()
            wait_for(
                lambda: "198.51.100.3/32" in destinations(),
                CLIENT_TIMEOUT,
                "the CiliumNode change to be applied under the flood",
            )
            print(
                f"CiliumNode change applied under the flood after "
                f"{time.monotonic() - started:.2f} s"
            )
            assert get(health_port, "/healthz")[0] == 200
        finally:
            stop.set()
            runner.join(CLIENT_TIMEOUT)
        assert not runner.is_alive()


@pytest.mark.parametrize(
    "text,expected",
    [
        (":8083", ("", 8083)),
        ("127.0.0.1:8083", ("127.0.0.1", 8083)),
        ("[::1]:8084", ("::1", 8084)),
        ("[::]:1", ("::", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_bind_addresses_parse(text, expected):
    from nodecryptor.observe.httpserver import parse_bind

    assert parse_bind(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "8083",
        "nonsense:80",
        "1.2.3.4.5:80",
        "localhost:80",
        "::1:8083",
        "[1.2.3.4]:80",
        "[::1]",
        ":65536",
        ":-1",
        ":",
        ":٦٤٤٣",
        ":²",
        ": 80",
        "[fe80::1:80",
    ],
)
def test_bad_bind_addresses_are_value_errors(text):
    from nodecryptor.observe.httpserver import parse_bind

    with pytest.raises(ValueError):
        parse_bind(text)


@pytest.mark.parametrize("spec", ["٦٤٤٣", "²", "6443-٦٤٤٤", "udp/²"])
def test_port_specs_are_ascii_only(spec):
    from nodecryptor.core.ports import PortSpecError, parse_port_spec

    with pytest.raises(PortSpecError):  # a clear error, never int()'s ValueError on "²"
        parse_port_spec(spec)


def test_overlapping_binds():
    from nodecryptor.observe.httpserver import binds_overlap

    assert binds_overlap(("", 9000), ("127.0.0.1", 9000))
    assert binds_overlap(("10.0.0.1", 9000), ("10.0.0.1", 9000))
    assert not binds_overlap(("10.0.0.1", 9000), ("10.0.0.2", 9000))
    assert not binds_overlap(("", 9000), ("", 9001))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
@pytest.mark.parametrize("failure", ["dies", "hangs"])
def test_agent_liveness_fails_when_the_sync_dies_or_hangs(failure, tmp_path, monkeypatch):
    """The agent's wiring: a sync thread that exits (a bug, say) or stops stepping turns
    /healthz red while the reconcile loop itself is fine."""
    from nodecryptor.cluster.sync import CiliumNodeSync

    healthy_run = CiliumNodeSync.run

    def broken_run(self, stop):
        if type(self) is not CiliumNodeSync:
            # The Node-role and exemption syncs reuse this loop (subclasses): they stay
            # healthy, so the probe's reason names the CiliumNode sync alone.
            return healthy_run(self, stop)
        if failure == "dies":
            raise RuntimeError("simulated bug in the sync")
        stop.wait()  # blocked forever, never stepping

    monkeypatch.setattr(CiliumNodeSync, "run", broken_run)
    with FakeApiServer(token="t") as fake:
        settings = Settings(
            node_name="w1",
            kubeconfig=fake.write_kubeconfig(str(tmp_path / "kubeconfig")),
            health_bind="127.0.0.1:0",
            metrics_bind="127.0.0.1:0",
            sync_stale_seconds=1.0,
            watch_stall_seconds=0.5,
            request_timeout_seconds=0.5,
        )
        agent = Agent(settings)
        stop = threading.Event()
        runner = threading.Thread(target=agent.run, args=(FakeDatapath(), stop), daemon=True)
        runner.start()
        try:

            def red() -> bytes | None:
                status, body, _ = get(agent.health.port, "/healthz")
                return body if status == 503 else None

            body = wait_for(red, CLIENT_TIMEOUT, "/healthz to turn red", interval=0.1)
            reason = json.loads(body)["reason"]
            assert ("k8s-sync has exited" if failure == "dies" else "no progress") in reason
        finally:
            stop.set()
            runner.join(CLIENT_TIMEOUT)


def test_a_reconnect_storm_does_not_lock_out_a_real_client():
    """Attackers that open connections as fast as they can (each held idle, so every new one
    evicts an older one) cannot push out a client that sends its request right away."""
    server = EndpointServer(
        "127.0.0.1:0",
        {"/healthz": lambda r: Response(200, "text/plain", b"ok")},
        max_connections=16,
        request_seconds=5.0,
    ).start()
    stop = threading.Event()
    opened = [0]

    def storm():
        held = []
        while not stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
                opened[0] += 1
            except OSError:
                continue
            if len(held) > 200:
                held.pop(0).close()
        for s in held:
            s.close()

    attackers = [threading.Thread(target=storm, daemon=True) for _ in range(3)]
    for t in attackers:
        t.start()
    try:
        slowest = 0.0
        for _ in range(20):
            status, body, seconds = get(server.port, "/healthz")
            assert (status, body) == (200, b"ok")
            slowest = max(slowest, seconds)
        print(
            f"20 requests during a storm of {opened[0]} connections: slowest "
            f"{slowest * 1000:.1f} ms, {server.evicted} evicted"
        )
        assert server.evicted > 0
    finally:
        stop.set()
        for t in attackers:
            t.join(10)
        server.stop()
