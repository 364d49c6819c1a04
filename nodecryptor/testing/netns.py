"""Throwaway network namespaces with unique names, for tests and the lab.

Names start with ``nct-`` followed by the creating PID so leftovers of a crashed run can be
recognised (``cleanup_stale``) without touching anybody else's namespaces.
"""

from __future__ import annotations

import itertools
import os
import subprocess

PREFIX = "nct-"
_counter = itertools.count()


def run(*cmd: str, netns: str | None = None, check: bool = True, capture: bool = True,
        timeout: float = 30.0) -> subprocess.CompletedProcess:
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
        pid = name[len(PREFIX):].split("-", 1)[0]
        if pid.isdigit() and not os.path.exists(f"/proc/{pid}"):
            delete(name)
            removed.append(name)
    return removed
