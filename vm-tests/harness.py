"""Host side of the kernel-VM integration harness.

Boots Debian's 6.1 kernel (which has the WireGuard module this host's kernel lacks) under qemu
with virtme-ng, sharing the host's root filesystem read-only, runs vm-tests/guest/scenario.py
as root inside it, and returns the guest's JSON result. The guest writes the result into a host
directory shared read-write (``vng --rwdir``). qemu runs in a process group of its own that is
killed on timeout, so nothing outlives the harness.

    python vm-tests/harness.py [--out result.json] [--datapaths bpf,iprule] [--timeout 420]
    python vm-tests/harness.py --load-only     # only: does the 6.1 verifier accept the program?

Set-up (kernel image, matching headers, qemu, virtme-ng): ``bash scripts/setup-vm.sh``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
VNG = os.path.join(HERE, ".cache", "venv", "bin", "vng")
GUEST_PYTHON = os.path.join(REPO, ".venv", "bin", "python")
DEFAULT_TIMEOUT = 420.0
GUEST_MEMORY = "2G"


class HarnessError(Exception):
    """The VM could not be booted or produced no result; the message says what to do."""


@dataclass(frozen=True)
class GuestKernel:
    version: str
    image: str
    headers: str


def find_kernel() -> GuestKernel:
    """The newest installed Debian amd64 kernel image whose headers of the same version are
    installed too (BCC inside the guest compiles against them)."""
    candidates = []
    for image in glob.glob("/boot/vmlinuz-*-amd64"):
        version = image[len("/boot/vmlinuz-") :]
        headers = f"/lib/modules/{version}/build"
        if os.path.exists(os.path.join(headers, "include", "generated", "autoconf.h")):
            candidates.append(GuestKernel(version, image, headers))
    if not candidates:
        raise HarnessError(
            "no /boot/vmlinuz-*-amd64 with matching headers in "
            "/lib/modules/<ver>/build: run bash scripts/setup-vm.sh"
        )

    def key(k: GuestKernel):
        return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", k.version)]

    return max(candidates, key=key)


def missing_prerequisites() -> list[str]:
    """What prevents a VM run on this machine (empty when nothing)."""
    missing = []
    if os.geteuid() != 0:
        missing.append("root (the guest runs as the host user; the scenario needs root)")
    if not os.access(VNG, os.X_OK):
        missing.append(f"virtme-ng at {VNG} (bash scripts/setup-vm.sh)")
    if shutil.which("qemu-system-x86_64") is None:
        missing.append("qemu-system-x86_64 (apt qemu-system-x86)")
    if shutil.which("busybox") is None:
        missing.append("busybox (apt busybox-static; virtme-ng builds its initramfs with it)")
    if not os.access(GUEST_PYTHON, os.X_OK):
        missing.append(f"project venv {GUEST_PYTHON} (bash scripts/setup.sh)")
    try:
        find_kernel()
    except HarnessError as e:
        missing.append(str(e))
    return missing


def vng_command(kernel: GuestKernel, result_dir: str, guest_cmd: str, cpus: int) -> list[str]:
    # KVM is unavailable here; TCG emulation boots in ~20 s. The root filesystem is shared
    # read-only, so the guest sees the repository and .venv but cannot change them; only
    # result_dir is writable.
    return [
        VNG,
        "--run",
        kernel.image,
        "--disable-kvm",
        "--memory",
        GUEST_MEMORY,
        "--cpus",
        str(cpus),
        "--rwdir",
        result_dir,
        "--cwd",
        REPO,
        "--exec",
        guest_cmd,
    ]


def run(
    datapaths: str = "bpf,iprule", timeout: float = DEFAULT_TIMEOUT, keep_dir: str | None = None
) -> dict:
    """Boot the guest, run the scenario, return its JSON plus host-side timings."""
    kernel = find_kernel()
    result_dir = keep_dir or tempfile.mkdtemp(prefix="nc-vm-")
    os.makedirs(result_dir, exist_ok=True)
    result_path = os.path.join(result_dir, "result.json")
    log_path = os.path.join(result_dir, "console.log")
    if os.path.exists(result_path):
        os.unlink(result_path)
    guest_cmd = (
        f"PYTHONDONTWRITEBYTECODE=1 {GUEST_PYTHON} "
        f"{os.path.join(HERE, 'guest', 'scenario.py')} "
        f"--out {result_path} --datapaths {datapaths}"
    )
    cmd = vng_command(kernel, result_dir, guest_cmd, cpus=min(2, os.cpu_count() or 1))
    env = dict(os.environ, PATH=f"{os.path.dirname(VNG)}:{os.environ.get('PATH', '')}")
    started = time.monotonic()
    with open(log_path, "w") as log:
        # A session of its own: on timeout the whole group (vng, qemu) is killed by its id.
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise HarnessError(
                f"VM did not finish within {timeout:.0f}s; console log: {log_path}"
            ) from None
    elapsed = time.monotonic() - started
    if not os.path.exists(result_path):
        with open(log_path) as f:
            tail = f.read()[-3000:]
        raise HarnessError(f"guest wrote no result (vng rc={rc}); console tail:\n{tail}")
    with open(result_path) as f:
        result = json.load(f)
    guest_total = result.get("timings", {}).get("guest_total", 0.0)
    result["host"] = {
        "vng_rc": rc,
        "wall_seconds": round(elapsed, 2),
        # boot + shutdown: everything the guest scenario did not account for
        "boot_and_shutdown_seconds": round(elapsed - guest_total, 2),
        "kernel": kernel.version,
        "result_dir": result_dir,
        "command": cmd,
    }
    return result


def load_only(timeout: float = DEFAULT_TIMEOUT, keep_dir: str | None = None) -> dict:
    """Boot the guest and only compile + load bpf/nodecryptor.c (guest/loadcheck.py): whether
    the 6.1 verifier accepts the program, in one boot and no scenario. On a rejection the
    result's ``log_tail`` holds the end of the verifier's log."""
    kernel = find_kernel()
    result_dir = keep_dir or tempfile.mkdtemp(prefix="nc-vm-")
    os.makedirs(result_dir, exist_ok=True)
    out_path = os.path.join(result_dir, "loadcheck.json")
    err_path = os.path.join(result_dir, "loadcheck.log")
    for path in (out_path, err_path):
        if os.path.exists(path):
            os.unlink(path)
    guest_cmd = (
        f"PYTHONDONTWRITEBYTECODE=1 {GUEST_PYTHON} "
        f"{os.path.join(HERE, 'guest', 'loadcheck.py')} >{out_path} 2>{err_path}"
    )
    cmd = vng_command(kernel, result_dir, guest_cmd, cpus=min(2, os.cpu_count() or 1))
    env = dict(os.environ, PATH=f"{os.path.dirname(VNG)}:{os.environ.get('PATH', '')}")
    started = time.monotonic()
    with open(os.path.join(result_dir, "console.log"), "w") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise HarnessError(f"VM did not finish within {timeout:.0f}s") from None
    try:
        with open(out_path) as f:
            result = json.loads(f.read().strip().splitlines()[-1])
    except (OSError, IndexError, ValueError) as e:
        raise HarnessError(f"guest wrote no load-check result ({e}); see {result_dir}") from e
    if not result.get("ok") and os.path.exists(err_path):
        with open(err_path, errors="replace") as f:
            result["log_tail"] = f.read().splitlines()[-12:]
    result["host"] = {
        "wall_seconds": round(time.monotonic() - started, 2),
        "kernel": kernel.version,
        "result_dir": result_dir,
    }
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description="Run the nodecryptor scenario in a 6.1 VM.")
    ap.add_argument("--out", help="write the result JSON here (default: stdout)")
    ap.add_argument("--datapaths", default="bpf,iprule")
    ap.add_argument("--timeout", type=float, default=DEFAULT_TIMEOUT)
    ap.add_argument("--keep-dir", help="directory for result and console log")
    ap.add_argument(
        "--load-only",
        action="store_true",
        help="only compile and load bpf/nodecryptor.c in the guest (exit 1 if the "
        "verifier rejects it)",
    )
    args = ap.parse_args()
    missing = missing_prerequisites()
    if missing:
        print("cannot run the VM harness:\n  " + "\n  ".join(missing), file=sys.stderr)
        return 2
    try:
        if args.load_only:
            result = load_only(args.timeout, args.keep_dir)
        else:
            result = run(args.datapaths, args.timeout, args.keep_dir)
    except HarnessError as e:
        print(f"vm harness: {e}", file=sys.stderr)
        return 1
    text = json.dumps(result, indent=1, sort_keys=True)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    else:
        print(text)
    return 0 if result.get("ok", True) else 1


if __name__ == "__main__":
    sys.exit(main())
