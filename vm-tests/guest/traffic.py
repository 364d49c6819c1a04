"""Traffic and capture tools of the guest scenario: tcpdump captures to pcap files (decoded by
pcap.py), echo servers, one-shot clients, and iperf3.

Every process started here is remembered by PID and ended by that PID (``Processes.stop_all``);
the lab's namespaces are deleted afterwards anyway, which ends anything left inside them.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import time

from nodecryptor_testkit import netns

import pcap

PROBE_TEXT = "nodecryptor-vm-probe"


class Processes:
    """Children of the scenario, ended by PID."""

    def __init__(self):
        self.procs: list[subprocess.Popen] = []

    def start(self, ns: str, *cmd: str, **kw) -> subprocess.Popen:
        proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, *cmd],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            **kw,
        )
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def stop_all(self) -> None:
        for proc in list(self.procs):
            self.stop(proc)


class Capture:
    """tcpdump on one device of one namespace, written to a pcap file."""

    def __init__(
        self,
        procs: Processes,
        ns: str,
        dev: str,
        path: str,
        direction: str | None = None,
        snaplen: int = 128,
    ):
        self.procs, self.path = procs, path
        # --immediate-mode: without it libpcap hands packets over in blocks retired every
        # second, and a capture stopped sooner loses the last block (short phases came back
        # empty). -U writes each packet to the file as it arrives.
        cmd = [
            "tcpdump",
            "-i",
            dev,
            "-nn",
            "--immediate-mode",
            "-U",
            "-s",
            str(snaplen),
            "-w",
            path,
        ]
        if direction:
            cmd += ["-Q", direction]
        self.proc = procs.start(ns, *cmd)
        self._wait_listening()

    def _wait_listening(self, timeout: float = 20.0) -> None:
        # tcpdump announces "listening on <dev>" on stderr once the socket is bound; traffic
        # sent before that would be missed.
        deadline = time.monotonic() + timeout
        buf = b""
        fd = self.proc.stderr.fileno()
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.5)
            if ready:
                chunk = os.read(fd, 4096)
                if not chunk:
                    break
                buf += chunk
                if b"listening on" in buf:
                    return
        raise RuntimeError(f"tcpdump did not start: {buf.decode(errors='replace')}")

    def stop(self) -> None:
        time.sleep(0.5)  # let the last replies land before the capture ends
        self.procs.stop(self.proc, signal.SIGINT)

    def packets(self) -> list[pcap.Packet]:
        return pcap.read(self.path)


def count(packets, predicate) -> int:
    return sum(1 for p in packets if predicate(p))


def echo_servers(procs: Processes, ns: str, tcp_ports=(8080,), udp_ports=(5353,)) -> None:
    for port in tcp_ports:
        procs.start(ns, "socat", f"TCP-LISTEN:{port},reuseaddr,fork", "PIPE")
    for port in udp_ports:
        procs.start(ns, "socat", f"UDP-RECVFROM:{port},reuseaddr,fork", "PIPE")


def wait_port(ns: str, proto: str, port: int, timeout: float = 15.0) -> None:
    flag = "-tln" if proto == "tcp" else "-uln"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = netns.run("ss", "-H", flag, f"sport = :{port}", netns=ns, check=False).stdout
        if out.strip():
            return
        time.sleep(0.2)
    raise RuntimeError(f"no {proto} listener on port {port} in {ns}")


def echo(ns: str, proto: str, host: str, port: int, timeout: float = 20.0) -> bool:
    """Send one line and expect it back: the flow works end to end."""
    address = f"{'TCP' if proto == 'tcp' else 'UDP'}:{host}:{port}"
    try:
        out = subprocess.run(
            ["ip", "netns", "exec", ns, "socat", "-t", "2", "-T", "8", "-", address],
            input=PROBE_TEXT + "\n",
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    except subprocess.TimeoutExpired:
        return False
    return PROBE_TEXT in out.stdout


def ping(ns: str, host: str, count: int = 3) -> bool:
    out = netns.run(
        "ping", "-c", str(count), "-i", "0.3", "-W", "5", host, netns=ns, check=False, timeout=30
    )
    return out.returncode == 0


def iperf3(ns: str, host: str, nbytes: str, reverse: bool = False, timeout: float = 120.0) -> dict:
    """A bulk TCP transfer client → host (host → client with ``reverse``); returns iperf3's
    summary (bytes, seconds, bps)."""
    out = netns.run(
        "iperf3",
        "-c",
        host,
        "-n",
        nbytes,
        "-J",
        *(["-R"] if reverse else []),
        netns=ns,
        check=False,
        timeout=timeout,
    )
    try:
        data = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {"ok": False, "error": (out.stderr or out.stdout)[-400:]}
    if "error" in data:
        return {"ok": False, "error": data["error"]}
    sent = data["end"]["sum_sent"]
    return {
        "ok": True,
        "bytes": sent["bytes"],
        "seconds": round(sent["seconds"], 2),
        "mbit_per_s": round(sent["bits_per_second"] / 1e6, 1),
        "retransmits": sent.get("retransmits", 0),
    }
