"""Bookkeeping of everything a lab created, so a crashed or kept lab can be removed later.

Each lab writes ``<STATE_DIR>/<pid>-<n>.json`` listing its namespaces, processes (with their
start time, so a recycled PID is never killed) and directories. The file is rewritten after every
creation, so a crash leaves an accurate list. ``reap_stale`` removes labs whose owner process
is gone, unless they were kept on purpose (``--keep``); ``reap`` removes one lab. Nothing that
is not listed in a state file is ever touched.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import asdict, dataclass, field

from nodecryptor.core.log import kv

log = logging.getLogger(__name__)

STATE_DIR = "/run/nodecryptor-lab"


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/PID/stat), or None."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses; fields follow the last ")".
    return int(stat.rsplit(")", 1)[1].split()[19])


@dataclass
class LabState:
    owner_pid: int
    path: str
    kept: bool = False
    netns: list[str] = field(default_factory=list)
    processes: list[tuple[int, int, str]] = field(default_factory=list)
    """(pid, start time, what) of every long-lived process the lab started."""
    directories: list[str] = field(default_factory=list)
    info: dict = field(default_factory=dict)
    """Free-form facts for ``--keep`` users (node names to namespaces, ...)."""

    @classmethod
    def new(cls, state_dir: str = STATE_DIR) -> "LabState":
        """A state file of its own, ``<pid>-<n>.json``: one process may run several labs."""
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        for n in range(1000):
            path = os.path.join(state_dir, f"{os.getpid()}-{n}.json")
            try:
                os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
            except FileExistsError:
                continue
            state = cls(owner_pid=os.getpid(), path=path)
            state.save()
            return state
        raise RuntimeError(f"no free lab state file name in {state_dir}")

    @property
    def name(self) -> str:
        """``<pid>-<n>``: names this lab's work directory too."""
        return os.path.basename(self.path)[: -len(".json")]

    @classmethod
    def load(cls, path: str) -> "LabState":
        with open(path) as f:
            data = json.load(f)
        data["processes"] = [tuple(p) for p in data.get("processes", [])]
        data["path"] = path
        return cls(**data)

    def save(self) -> None:
        # A temporary file per thread: scenarios stop several processes at once.
        tmp = f"{self.path}.{threading.get_ident()}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(self), f, indent=1)
        os.replace(tmp, self.path)

    def add_netns(self, name: str) -> None:
        self.netns.append(name)
        self.save()

    def add_process(self, pid: int, what: str) -> None:
        start = process_start_time(pid)
        if start is not None:
            self.processes.append((pid, start, what))
            self.save()

    def forget_process(self, pid: int) -> None:
        self.processes = [p for p in self.processes if p[0] != pid]
        self.save()

    def add_directory(self, path: str) -> None:
        self.directories.append(path)
        self.save()


def _kill_recorded(pid: int, start: int, sig: int) -> bool:
    """Signal ``pid`` only if it is still the process that was recorded."""
    if process_start_time(pid) != start:
        return False
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return False
    return True


def reap(state: LabState, grace: float = 2.0) -> None:
    """Remove everything ``state`` lists: processes (TERM, then KILL), namespaces, directories,
    and finally the state file. Safe to call twice."""
    alive = [
        (pid, start)
        for pid, start, _ in reversed(state.processes)
        if _kill_recorded(pid, start, signal.SIGTERM)
    ]
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        alive = [(p, s) for p, s in alive if process_start_time(p) == s]
        if alive:
            time.sleep(0.05)
    for pid, start in alive:
        _kill_recorded(pid, start, signal.SIGKILL)
    for name in reversed(state.netns):
        delete_netns(name)
    for path in reversed(state.directories):
        # Only directories the lab made, newest first, so a node's bpffs mount is gone before
        # its parent directory is removed (rmtree never descends into a live mount).
        if os.path.ismount(path):
            subprocess.run(["umount", "-l", path], capture_output=True)
        if not os.path.ismount(path):
            shutil.rmtree(path, ignore_errors=True)
    try:
        os.unlink(state.path)
    except FileNotFoundError:
        pass
    log.debug("lab removed", extra=kv(state=state.path, netns=len(state.netns)))


def delete_netns(name: str) -> None:
    # Every process in a lab namespace was started by the lab, so killing them is ours to do.
    pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout
    for pid in pids.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass
    subprocess.run(["ip", "netns", "del", name], capture_output=True)


def list_states(state_dir: str = STATE_DIR) -> list[LabState]:
    out = []
    try:
        names = sorted(os.listdir(state_dir))
    except FileNotFoundError:
        return out
    for name in names:
        if name.endswith(".json"):
            try:
                out.append(LabState.load(os.path.join(state_dir, name)))
            except (OSError, ValueError, TypeError) as e:
                log.warning("unreadable lab state file", extra=kv(file=name, error=str(e)))
    return out


def reap_stale(state_dir: str = STATE_DIR) -> list[str]:
    """Remove labs whose owner is gone and that were not kept; returns their state files."""
    removed = []
    for state in list_states(state_dir):
        if state.kept or os.path.exists(f"/proc/{state.owner_pid}"):
            continue
        reap(state)
        removed.append(state.path)
    return removed


def reap_kept(state_dir: str = STATE_DIR) -> list[str]:
    """Remove labs left up by ``--keep`` (what ``nodecryptor-demo --down`` does)."""
    removed = []
    for state in list_states(state_dir):
        if state.kept:
            reap(state)
            removed.append(state.path)
    return removed
