"""Thread-safe store of the cluster as the policy sees it: NodeInfo by node name.

The Kubernetes sync writes it; the reconcile loop reads snapshots. ``changed`` wakes the loop.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable

from .model import NodeInfo


class Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._nodes: dict[str, NodeInfo] = {}
        self.changed = threading.Event()
        self.synced = threading.Event()
        """Set after the first complete list; the loop applies nothing before it."""
        self.version = 0
        self.last_sync: float = 0.0

    def replace_all(self, nodes: Iterable[NodeInfo]) -> None:
        """Install the result of a complete list (objects absent from it are gone)."""
        fresh = {n.name: n for n in nodes}
        with self._lock:
            if fresh != self._nodes:
                self._nodes = fresh
                self.version += 1
                self.changed.set()
            self.last_sync = time.time()
        self.synced.set()
        self.changed.set()

    def upsert(self, node: NodeInfo) -> None:
        with self._lock:
            if self._nodes.get(node.name) != node:
                self._nodes[node.name] = node
                self.version += 1
                self.changed.set()

    def delete(self, name: str) -> None:
        with self._lock:
            if self._nodes.pop(name, None) is not None:
                self.version += 1
                self.changed.set()

    def snapshot(self) -> dict[str, NodeInfo]:
        with self._lock:
            return dict(self._nodes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._nodes)
