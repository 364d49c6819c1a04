"""How the control-plane benchmark watches the agent from outside: its memory and CPU from
/proc, a worker thread inside a network namespace, and the two probes that ask the kernel
whether an address has reached the datapath (the live BPF program, or the route lookup)."""

from __future__ import annotations

import errno
import os
import shutil
import sys
import threading

from nodecryptor_testkit import netns


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM in kB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out[key] = int(value.split()[0])
    return out


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # fields[11], [12] are utime and stime (fields 14 and 15 of proc(5), counted from 1)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def py_spy() -> str:
    """py-spy from the venv (pip install py-spy) or the PATH."""
    local = os.path.join(os.path.dirname(sys.executable), "py-spy")
    found = local if os.path.exists(local) else shutil.which("py-spy")
    if not found:
        raise RuntimeError("--profile-dir needs py-spy (.venv/bin/pip install py-spy)")
    return found


class InNetns:
    """A worker thread living in a network namespace that runs submitted calls (sockets it
    opens belong to that namespace)."""

    def __init__(self, ns: str):
        self._calls: list = []
        self._cv = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(ns,), daemon=True)
        self._thread.start()

    def _run(self, ns: str) -> None:
        with netns.entered(ns):
            while True:
                with self._cv:
                    while not self._calls and not self._stop:
                        self._cv.wait()
                    if self._stop and not self._calls:
                        return
                    fn, box, done = self._calls.pop(0)
                try:
                    box["value"] = fn()
                except BaseException as e:  # handed back to the caller
                    box["error"] = e
                done.set()

    def call(self, fn):
        box: dict = {}
        done = threading.Event()
        with self._cv:
            self._calls.append((fn, box, done))
            self._cv.notify()
        done.wait()
        if "error" in box:
            raise box["error"]
        return box.get("value")

    def close(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify()
        self._thread.join(5)


class BpfProbe:
    """Asks the live program's dry-run twin (the pinned ``prog-explain``: same maps, changes
    no counter or fragment state) whether a packet to an address is redirected. The pin is
    opened for every question: a growing agent moves to a new generation of maps and pins a
    new twin with it."""

    def __init__(self, bpffs: str, src: str):
        self._bpffs = bpffs
        self._src = src
        self._frames: dict[str, bytes] = {}

    def present(self, addr: str) -> bool:
        from nodecryptor.datapath.bpf import pins, syscall, testrun

        frame = self._frames.get(addr)
        if frame is None:
            frame = self._frames[addr] = testrun.build_frame(
                self._src, addr, dport=8080, tcp_flags="A"
            )
        with syscall.obj_get(pins.explain_prog_path(self._bpffs)) as twin:
            return testrun.run(twin, frame).verdict == "encrypt"

    def close(self) -> None:
        pass


class RouteProbe:
    """Asks the kernel's route lookup in the agent's namespace (call from inside it)."""

    def __init__(self, wg_ifname: str):
        from pyroute2 import IPRoute

        self._ipr = IPRoute()
        self._wg = self._ipr.link_lookup(ifname=wg_ifname)[0]

    def present(self, addr: str) -> bool:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            routes = self._ipr.route("get", dst=addr)
        except NetlinkError as e:
            # fail-closed "unreachable" route in nodecryptor's table: installed, not covered
            return e.code in (errno.EHOSTUNREACH, errno.ENETUNREACH, errno.EACCES)
        return bool(routes) and routes[0].get_attr("RTA_OIF") == self._wg

    def close(self) -> None:
        self._ipr.close()
