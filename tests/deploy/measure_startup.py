"""Measure what sizes the DaemonSet's resources and startupProbe: the agent's imports, then a
compile + load of bpf/nodecryptor.c with pinned maps on a throwaway bpffs.

Run as root from the repository root (the numbers in docs/operator-guide.md come from this):

    /usr/bin/time -v .venv/bin/python tests/deploy/measure_startup.py

It prints seconds and RSS after the imports and after the load, and the peak RSS.
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith("VmRSS:"))
    return int(line.split()[1]) / 1024


def main() -> int:
    started = time.perf_counter()
    # Everything the running agent imports, so the baseline is the agent's, not the loader's
    # (imported for their cost alone, hence the noqa).
    import nodecryptor.agent.wiring
    import nodecryptor.cluster.condition
    import nodecryptor.cluster.resources  # noqa: F401
    from nodecryptor.datapath.bpf import program
    from nodecryptor.core.settings import Settings

    imported = time.perf_counter()
    rss_imports = rss_mib()
    pin_dir = tempfile.mkdtemp(prefix="nc-measure-")
    subprocess.run(["mount", "-t", "bpf", "bpf", pin_dir], check=True)
    try:
        loaded = program.load(Settings(), pin_dir)
        done = time.perf_counter()
        rss_loaded = rss_mib()
        loaded.close()
    finally:
        subprocess.run(["umount", pin_dir], check=False)
        os.rmdir(pin_dir)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"imports: {imported - started:.2f} s, RSS {rss_imports:.0f} MiB")
    print(f"compile + load: {done - imported:.2f} s, RSS {rss_loaded:.0f} MiB")
    print(f"peak RSS: {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
