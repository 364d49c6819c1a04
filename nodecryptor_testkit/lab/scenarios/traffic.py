"""Continuous background traffic between every node and pod, for the scenarios that disturb the
datapath while packets flow (restart, cilium-restart)."""

from __future__ import annotations

import threading

from ..flows import PortAllocator
from ..spec import SERVICE_TCP_PORT
from ..topology import LabError
from .common import FAMILIES


class Traffic:
    """Continuous flows from every node and pod to every other node and pod, in the background,
    until stopped; counts attempts and failures."""

    def __init__(self, lab, ports: PortAllocator):
        self.lab = lab
        self.ports = ports
        self.stop_event = threading.Event()
        self.attempts = 0
        self.failures = 0
        self.lock = threading.Lock()
        self.errors: dict[str, str] = {}
        """First flow that failed with each distinct error."""
        self.threads: list[threading.Thread] = []

    def _loop(self, src: str) -> None:
        lab = self.lab
        targets = [n for n in lab.nodes if n != src.split("/")[0]]
        while not self.stop_event.is_set():
            batch = []
            for dst in targets:
                for fam in FAMILIES:
                    for end in (dst, f"{dst}/pod"):
                        batch.append(
                            {
                                "id": len(batch),
                                "proto": "tcp",
                                "src": lab.address_of(src, fam),
                                "dst": lab.address_of(end, fam),
                                "dport": SERVICE_TCP_PORT,
                                "sport": self.ports.take(),
                                "timeout": 1.0,
                            }
                        )
            try:
                results = lab.run_flows(lab.netns_of(src), batch)
            except (LabError, OSError) as e:
                results = [{"ok": False, "error": f"{type(e).__name__}: {e}"}] * len(batch)
            with self.lock:
                self.attempts += len(results)
                for r, req in zip(results, batch):
                    if not r["ok"]:
                        self.failures += 1
                        self.errors.setdefault(r.get("error", ""), f"{src} -> {req['dst']}")
            # Pace the batches: the agents being restarted need the two CPUs too.
            self.stop_event.wait(0.2)

    def __enter__(self) -> "Traffic":
        for name in self.lab.nodes:
            for src in (name, f"{name}/pod"):
                t = threading.Thread(target=self._loop, args=(src,), daemon=True)
                t.start()
                self.threads.append(t)
        return self

    def __exit__(self, *exc) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=30)
