"""The one narrow interface between the reconcile loop and the kernel.

A backend realises a DesiredState idempotently: ``apply`` adds what is missing (new destinations
before stale ones are removed) and prunes what is beyond the desired state, touching only
nodecryptor's own objects. ``observe`` reports what is actually installed. ``close`` releases
the agent's handles but leaves the datapath enforcing (fail-static); ``cleanup`` removes
everything nodecryptor created.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from nodecryptor.core.errors import DatapathError
from nodecryptor.core.model import DesiredState

VERDICT_ENCRYPT = "encrypt"
VERDICT_EXEMPT = "exempt"
VERDICT_PASS = "pass"
VERDICT_DROP = "drop"


@dataclass
class Observation:
    """What a backend reports about itself (for readiness, status and metrics)."""

    datapath: str
    attached: bool
    ready: bool
    reason: str = ""
    """Why not ready (empty when ready)."""
    details: dict[str, Any] = field(default_factory=dict)
    """Backend-specific facts (devices and attach mode, program id, rule count, ...)."""
    counters: dict[str, int] = field(default_factory=dict)
    """Packets by verdict reason, where the backend counts them."""


@runtime_checkable
class Datapath(Protocol):
    name: str

    def apply(self, desired: DesiredState) -> None:
        """Make the kernel match ``desired``. Idempotent; raises DatapathError to be retried."""

    def observe(self) -> Observation:
        """Report the realised state; never raises for an expected condition."""

    def close(self) -> None:
        """Release handles; leave what is installed enforcing."""

    def cleanup(self) -> None:
        """Remove every object this backend created, and nothing else."""


class FakeDatapath:
    """In-memory datapath for tests: records what was applied, can be told to fail."""

    name = "fake"

    def __init__(self, fail_times: int = 0):
        self.applied: list[DesiredState] = []
        self.current: DesiredState | None = None
        self.fail_times = fail_times
        self.apply_calls = 0
        self.closed = False
        self.cleaned = False

    def apply(self, desired: DesiredState) -> None:
        self.apply_calls += 1
        if self.fail_times > 0:
            self.fail_times -= 1
            raise DatapathError("injected failure")
        if desired != self.current:
            self.applied.append(desired)
        self.current = desired

    def observe(self) -> Observation:
        ready = self.current is not None
        return Observation(
            datapath=self.name,
            attached=ready,
            ready=ready,
            reason="" if ready else "nothing applied yet",
            details={"destinations": len(self.current.destinations) if self.current else 0},
        )

    def close(self) -> None:
        self.closed = True

    def cleanup(self) -> None:
        self.cleaned = True
        self.current = None


@dataclass(frozen=True)
class PacketQuery:
    """A packet described by an operator (``nodecryptor explain``) or a test case. Both
    datapaths answer it with the same verdict words; see ``Explanation``."""

    dst: str
    src: str | None = None
    """None: the local address the kernel would pick for ``dst``."""
    proto: str = "tcp"  # tcp | udp | sctp | icmp | icmpv6
    sport: int = 40000
    dport: int = 80
    mark: int = 0
    device: str | None = None
    """Underlay device the packet leaves through; None: the one the route to ``dst`` uses."""
    icmp_type: int = 8
    tcp_flags: str = "S"  # letters of SYN/ACK/FIN/RST/PSH, as in tcpdump


@dataclass(frozen=True)
class Explanation:
    verdict: str  # VERDICT_*
    reason: str
    datapath: str  # "bpf" | "iprule"
    device: str | None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        out = {
            "verdict": self.verdict,
            "reason": self.reason,
            "datapath": self.datapath,
            "device": self.device,
        }
        out.update(self.details)
        return out
