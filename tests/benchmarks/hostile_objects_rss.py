"""Peak RSS of ``nodecryptor plan --json`` against a cluster holding large hostile CiliumNodes.

Cilium's schema lets ``spec.ipam.pool`` hold any number of entries; a node's Cilium service
account may write any CiliumNode. This serves the bundled example cluster plus ``--count``
CiliumNodes of about ``--size`` bytes each from the fake API server (a subprocess on
127.0.0.1) and runs ``plan --json`` for w1 under ``/usr/bin/time -v``, once per given
nodecryptor executable, printing the maximum resident set size of each.

    python tests/benchmarks/hostile_objects_rss.py --count 45 --size 1800000 \\
        /work/main/.venv/bin/nodecryptor .venv/bin/nodecryptor
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

from nodecryptor_testkit.fakeapi import load_objects, make_ciliumnode  # noqa: E402

EXAMPLE = os.path.join(ROOT, "nodecryptor", "examples", "cluster.json")


def hostile(i: int, size: int) -> dict:
    obj = make_ciliumnode(
        f"bloat{i:03d}", ipv4=f"198.51.100.{i % 250 + 1}", pod_cidrs=[f"10.250.{i % 250}.0/24"]
    )
    pool = {}
    n = 0
    while n * 60 < size:
        pool[f"10.{200 + n // 65536 % 50}.{n // 256 % 256}.{n % 256}"] = {
            "owner": f"ns/pod-{n:08d}"
        }
        n += 1
    obj["spec"]["ipam"]["pool"] = pool
    return obj


def wait_for_file(path: str, deadline: float) -> None:
    while not os.path.exists(path):
        if time.monotonic() > deadline:
            raise SystemExit(f"fake API server wrote no kubeconfig at {path}")
        time.sleep(0.1)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--count", type=int, default=45)
    ap.add_argument(
        "--size",
        type=int,
        default=1_800_000,
        help="target pool size in bytes; 1,800,000 gives objects of about 1.4 MB",
    )
    ap.add_argument("executables", nargs="+")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        objects = load_objects(EXAMPLE) + [hostile(i, args.size) for i in range(args.count)]
        path = os.path.join(tmp, "objects.json")
        with open(path, "w") as f:
            json.dump(objects, f)
        one = len(json.dumps(objects[-1]))
        kc = os.path.join(tmp, "kc")
        server = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "nodecryptor_testkit.fakeapi",
                "--bind",
                "127.0.0.1:0",
                "--objects",
                path,
                "--token",
                "t",
                "--write-kubeconfig",
                kc,
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_for_file(kc, time.monotonic() + 120)
            print(f"{args.count} hostile CiliumNodes of {one} bytes each")
            for exe in args.executables:
                run = subprocess.run(
                    [
                        "/usr/bin/time",
                        "-v",
                        exe,
                        "plan",
                        "--json",
                        "--kubeconfig",
                        kc,
                        "--node-name",
                        "w1",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=900,
                )
                rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", run.stderr)
                kept = len(json.loads(run.stdout)["destinations"]) if run.returncode == 0 else None
                print(
                    f"{exe}: exit {run.returncode}, peak RSS "
                    f"{int(rss.group(1)) / 1024:.0f} MiB, {kept} destinations"
                )
        finally:
            server.terminate()
            server.wait(30)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
