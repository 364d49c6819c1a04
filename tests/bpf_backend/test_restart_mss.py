"""The MSS clamp across the program swap of an agent restart: new TCP connections through the
tunnel (cilium_wg0 MTU 1420 on a 1500-byte underlay) are opened and filled without pause
while the agent on node A is killed and restarted several times; no WireGuard datagram may
leave A's underlay fragmented (an unclamped segment of 1460 bytes does not fit the tunnel)."""

from __future__ import annotations

import dataclasses
import signal
import socket
import threading

from bpf_backend_lab import Capture, in_netns
from test_bpfbackend_wire import lab  # noqa: F401
from test_lifecycle import run_agent

from bpf_backend_lab import WG_PORT
from nodecryptor.datapath.bpf.backend import BpfDatapath

SINK_PORT = 7790
RESTARTS = 3


def test_mss_clamp_holds_across_restarts_under_tcp_load(lab, bpffs, tmp_path):
    a, b = lab.a, lab.b
    with in_netns(b.netns):
        server = socket.create_server((b.ip, SINK_PORT))
    server.settimeout(0.5)
    stop = threading.Event()
    stats = {"accepted": 0, "connected": 0, "errors": 0}

    def sink():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except OSError:
                continue
            stats["accepted"] += 1
            with conn:
                conn.settimeout(2.0)
                try:
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    def load():
        payload = b"x" * 64 * 1024
        while not stop.is_set():
            try:
                with in_netns(a.netns):
                    s = socket.create_connection((b.ip, SINK_PORT), timeout=2.0)
                with s:
                    s.sendall(payload)
                stats["connected"] += 1
            except OSError:
                stats["errors"] += 1

    def fragments_while(action) -> tuple[int, int]:
        """(WireGuard datagrams, fragments among them) leaving A's underlay during
        ``action()``, under the load."""
        wg = Capture(a.netns, "eth0", str(tmp_path / "wg.pcap"), f"udp port {WG_PORT}")
        frags = Capture(
            a.netns, "eth0", str(tmp_path / "frag.pcap"), "ip[6:2] & 0x3fff != 0 or ip6[6] == 44"
        )
        before = stats["connected"]
        stop.clear()
        threads = [threading.Thread(target=sink), threading.Thread(target=load)]
        for t in threads:
            t.start()
        try:
            action()
        finally:
            stop.set()
            for t in threads:
                t.join(timeout=10)
            counts = len(wg.stop()), len(frags.stop())
        assert stats["connected"] - before >= 10, stats
        return counts

    try:
        # The measurement can fail: the same load with the clamp switched off fragments.
        settings = lab.settings(bpffs)
        with in_netns(a.netns):
            dp = BpfDatapath(settings)
            dp.start()
            dp.apply(dataclasses.replace(lab.desired(settings), mss_v4=0, mss_v6=0))
            dp.close()
        unclamped = fragments_while(lambda: stop.wait(1.5))
        assert unclamped[1] > 0, unclamped
        assert run_agent(lab, bpffs)[0] == -signal.SIGKILL  # the clamp is back

        def restarts():
            for _ in range(RESTARTS):
                assert run_agent(lab, bpffs)[0] == -signal.SIGKILL

        wireguard, fragments = fragments_while(restarts)
    finally:
        server.close()
    assert wireguard > 100, (wireguard, stats)
    assert fragments == 0, (fragments, stats)
