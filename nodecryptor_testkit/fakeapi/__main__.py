"""``python -m nodecryptor_testkit.fakeapi``: the fake API server as a process (the lab's
kube-apiserver). Prints one ``ready url=...`` line when serving; exits 0 on SIGTERM."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time

from .objects import load_objects
from .server import FakeApiServer


def _parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) < 65536:
        raise argparse.ArgumentTypeError(f"--bind {text!r}: expected HOST:PORT")
    return host.strip("[]") or "127.0.0.1", int(port)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m nodecryptor_testkit.fakeapi",
        description="Serve CiliumNodes like a kube-apiserver, for tests and the lab.",
        epilog="example:\n  python -m nodecryptor_testkit.fakeapi --bind 127.0.0.1:6443 "
        "--objects nodecryptor/examples/cluster.json --token t --write-kubeconfig kc",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--bind", type=_parse_bind, default=("127.0.0.1", 0), metavar="HOST:PORT")
    parser.add_argument("--objects", metavar="FILE.json", help="CiliumNodes to serve")
    parser.add_argument("--token", default="nodecryptor-test", help="accepted bearer token")
    parser.add_argument("--write-kubeconfig", metavar="PATH", help="write a kubeconfig here")
    parser.add_argument(
        "--tls",
        action="store_true",
        help="serve HTTPS with a self-signed certificate (CA in the kubeconfig)",
    )
    parser.add_argument("--bookmark-interval", type=float, default=60.0, metavar="SECONDS")
    parser.add_argument(
        "--history",
        type=int,
        default=1000,
        metavar="EVENTS",
        help="events retained for watches (default: %(default)s)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        objects = load_objects(args.objects) if args.objects else []
    except (OSError, ValueError) as e:
        print(f"fakeapi: --objects: {e}", file=sys.stderr)
        return 2
    host, port = args.bind
    server = FakeApiServer(
        host,
        port,
        token=args.token,
        objects=objects,
        tls=args.tls,
        initial_rv=int(time.time() * 1000),
        bookmark_interval=args.bookmark_interval,
        history_limit=args.history,
    )
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    server.start()
    if args.write_kubeconfig:
        server.write_kubeconfig(args.write_kubeconfig)
    print(
        f"ready url={server.url} objects={len(objects)}"
        + (f" kubeconfig={args.write_kubeconfig}" if args.write_kubeconfig else ""),
        flush=True,
    )
    while not done.wait(0.5):
        pass
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
