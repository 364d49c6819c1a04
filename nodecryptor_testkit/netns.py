"""Throwaway network namespaces with unique names, for tests and the lab.

Names start with ``nct-`` followed by the creating PID so leftovers of a crashed run can be
recognised (``cleanup_stale``) without touching anybody else's namespaces.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import subprocess
import threading

PREFIX = "nct-"
_counter = itertools.count()


def run(
    *cmd: str,
    netns: str | None = None,
    check: bool = True,
    capture: bool = True,
    timeout: float = 30.0,
) -> subprocess.CompletedProcess:
    argv = (["ip", "netns", "exec", netns] if netns else []) + list(cmd)
    return subprocess.run(argv, check=check, capture_output=capture, text=True, timeout=timeout)


def create(tag: str = "t") -> str:
    name = f"{PREFIX}{os.getpid()}-{tag}-{next(_counter)}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    run("ip", "link", "set", "lo", "up", netns=name)
    return name


def delete(name: str) -> None:
    """Delete a namespace, killing processes still inside it that this run started."""
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), 9)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def cleanup_stale() -> list[str]:
    """Remove namespaces left by earlier runs of this prefix whose creating PID is gone."""
    removed = []
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid = name[len(PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            delete(name)
            removed.append(name)
    return removed


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def entered(name: str):
    """Run the block with this thread in network namespace ``name``, then come back. setns(2)
    on a network namespace changes only the calling thread, so the rest of the process stays
    where it is; sockets opened in the block live in ``name``."""
    libc = ctypes.CDLL(None, use_errno=True)
    back = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(f"/run/netns/{name}", os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns into {name}: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(back, CLONE_NEWNET) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"setns back from {name}: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(back)


def call_in(name: str, fn, *args, **kwargs):
    """Run ``fn`` on a fresh thread inside network namespace ``name``; return its result or
    re-raise its exception in the caller's thread."""
    outcome: dict = {}

    def target() -> None:
        try:
            with entered(name):
                outcome["value"] = fn(*args, **kwargs)
        except BaseException as e:  # handed to the caller below
            outcome["error"] = e

    thread = threading.Thread(target=target, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome.get("value")
