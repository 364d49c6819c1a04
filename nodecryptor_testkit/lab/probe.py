"""Traffic for the scenarios: echo servers, and clients that try a batch of flows.

``serve`` answers TCP and UDP on the given ports on every address of the namespace (one
dual-stack socket per port). ``flows`` reads a JSON list of flows on stdin, tries them in
parallel and prints one JSON result per flow. Each flow uses its own fixed source port, so the
capture can tell exactly which packets on the underlay belong to it. Run inside a namespace as
``python -m nodecryptor_testkit.lab.probe serve|flows ...``.
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def _listener(kind: int, port: int, v6_only: bool = False) -> socket.socket:
    s = socket.socket(socket.AF_INET6, kind)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6_only else 0)
    s.bind(("::", port))
    return s


def _serve_tcp(sock: socket.socket) -> None:
    sock.listen(128)
    while True:
        conn, _ = sock.accept()
        threading.Thread(target=_echo_tcp, args=(conn,), daemon=True).start()


def _echo_tcp(conn: socket.socket) -> None:
    with conn:
        conn.settimeout(5)
        try:
            while data := conn.recv(4096):
                conn.sendall(data)
        except OSError:
            pass


def _serve_udp(sock: socket.socket) -> None:
    while True:
        data, peer = sock.recvfrom(65535)
        sock.sendto(data, peer)


def serve(tcp_ports: list[int], udp_ports: list[int], tcp6_only: list[int] = ()) -> None:
    """Dual-stack listeners, except ``tcp6_only`` ports (where another server owns IPv4)."""
    sockets = [(_serve_tcp, _listener(socket.SOCK_STREAM, p)) for p in tcp_ports]
    sockets += [(_serve_tcp, _listener(socket.SOCK_STREAM, p, v6_only=True)) for p in tcp6_only]
    sockets += [(_serve_udp, _listener(socket.SOCK_DGRAM, p)) for p in udp_ports]
    threads = [threading.Thread(target=fn, args=(sock,), daemon=True) for fn, sock in sockets]
    for t in threads:
        t.start()
    print("ready", flush=True)
    while True:
        time.sleep(3600)


def _family(address: str) -> int:
    return socket.AF_INET6 if ":" in address else socket.AF_INET


def try_flow(flow: dict) -> dict:
    """One attempt: TCP connect + echo, UDP echo, or one ICMP echo (ping)."""
    proto, dst, timeout = flow["proto"], flow["dst"], float(flow.get("timeout", 1.5))
    start = time.monotonic()
    payload = f"nc-lab {flow.get('id', '')}\n".encode()
    try:
        if proto == "icmp":
            argv = ["ping", "-n", "-q", "-c", "1", "-W", str(max(1, int(timeout))), dst]
            ok = subprocess.run(argv, capture_output=True, timeout=timeout + 2).returncode == 0
            return {
                "id": flow.get("id"),
                "ok": ok,
                "error": "" if ok else "no echo reply",
                "ms": round((time.monotonic() - start) * 1000, 1),
            }
        kind = socket.SOCK_STREAM if proto == "tcp" else socket.SOCK_DGRAM
        with socket.socket(_family(dst), kind) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.settimeout(timeout)
            s.bind((flow.get("src", ""), int(flow["sport"])))
            s.connect((dst, int(flow["dport"])))
            if flow.get("connect_only"):
                reply = payload
            else:
                s.sendall(payload)
                reply = s.recv(4096)
        ok = reply == payload
        error = "" if ok else f"unexpected reply {reply[:40]!r}"
    except (OSError, subprocess.TimeoutExpired) as e:
        ok, error = False, f"{type(e).__name__}: {e}"
    return {
        "id": flow.get("id"),
        "ok": ok,
        "error": error,
        "ms": round((time.monotonic() - start) * 1000, 1),
    }


def run_flows(flows: list[dict], parallel: int = 16) -> list[dict]:
    with ThreadPoolExecutor(max_workers=max(1, min(parallel, len(flows)))) as pool:
        return list(pool.map(try_flow, flows))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m nodecryptor_testkit.lab.probe")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="echo servers")
    s.add_argument("--tcp", default="", help="comma-separated TCP ports")
    s.add_argument("--udp", default="", help="comma-separated UDP ports")
    s.add_argument("--tcp6-only", default="", help="comma-separated TCP ports, IPv6 only")
    sub.add_parser("flows", help="try the JSON list of flows given on stdin")
    args = p.parse_args(argv)
    if args.cmd == "serve":

        def ports(text):
            return [int(x) for x in text.split(",") if x]

        serve(ports(args.tcp), ports(args.udp), ports(args.tcp6_only))
        return 0
    results = run_flows(json.load(sys.stdin))
    json.dump(results, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
