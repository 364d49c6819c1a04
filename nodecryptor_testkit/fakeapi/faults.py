"""Fault injection of the fake API server: the pending faults, the FakeApiServer methods that set
them (tests call them directly), and ``control``, the same faults for a fake running in another
process (``POST /_fake/<action>``)."""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .cluster import ApiError, FakeCluster


@dataclass
class Faults:
    """Pending injected faults; FakeApiServer's methods set them, request handlers take them."""

    fail_remaining: int = 0
    fail_code: int = 500
    stall_remaining: int = 0
    stall_kind: str = "any"  # "any" | "watch" | "list" | "write"
    expire_next_watches: int = 0
    drop_generation: int = 0
    freeze_watches: bool = False
    frozen: bool = False
    """The whole server hangs: every request is accepted and never answered, open watches go
    silent (a stopped process, or a black hole behind a load balancer)."""
    stall_release: threading.Event = field(default_factory=threading.Event)


class FaultInjection:
    """FakeApiServer's fault-injection methods (a mixin: the attributes are the server's)."""

    cluster: FakeCluster
    nodes: FakeCluster
    exemptions: FakeCluster
    configmaps: FakeCluster
    pod_ip_pools: FakeCluster
    faults: Faults
    status_faults: collections.deque
    stopping: threading.Event
    bookmark_generation: int
    status_patches: list
    events: list
    exemptions_installed: bool

    def compact(self) -> None:
        self.cluster.compact()
        self.nodes.compact()
        self.exemptions.compact()
        self.configmaps.compact()
        self.pod_ip_pools.compact()

    def advance(self, count: int = 1) -> None:
        self.cluster.advance(count)

    def expire_next_continue(self, count: int = 1) -> None:
        """The next ``count`` list requests with a continue token get 410 Expired."""
        with self.cluster.cond:
            self.cluster.expire_next_continues += count

    def expire_next_watch(self, count: int = 1) -> None:
        """The next ``count`` watches answer with an ERROR event carrying 410 Expired."""
        with self.cluster.cond:
            self.faults.expire_next_watches += count

    def take_expire(self) -> bool:
        if self.faults.expire_next_watches > 0:
            self.faults.expire_next_watches -= 1
            return True
        return False

    def drop_watches(self) -> None:
        """Cut every open watch connection abruptly (no terminating chunk)."""
        with self.cluster.cond:
            self.faults.drop_generation += 1

    def send_bookmark(self) -> None:
        """Make every open watch that allows bookmarks send one now."""
        with self.cluster.cond:
            self.bookmark_generation += 1
            self.cluster.cond.notify_all()

    def freeze_watches(self, frozen: bool = True) -> None:
        """Open and new watches stop sending anything (events, bookmarks, their end) while
        frozen: the connection stays open but dead, as behind a black-holing middlebox."""
        self.faults.freeze_watches = frozen

    def freeze(self, frozen: bool = True) -> None:
        """Hang the whole server: connections are still accepted, but no request is answered
        and open watches send nothing, until ``freeze(False)``. Requests that arrived while
        frozen are then dropped unanswered. ``POST /_fake/freeze`` still answers."""
        self.faults.frozen = frozen

    def stall_next(self, count: int = 1, kind: str = "any") -> None:
        """The next ``count`` requests of ``kind`` ("any", "watch", "list", "write") are
        accepted and never answered, until release_stalls() or stop()."""
        if kind not in ("any", "watch", "list", "write"):
            raise ValueError(f"stall kind {kind!r}: expected any, watch, list or write")
        with self.cluster.cond:
            self.faults.stall_release.clear()
            self.faults.stall_remaining = count
            self.faults.stall_kind = kind

    def release_stalls(self) -> None:
        self.faults.stall_release.set()

    def take_stall(self, kind: str) -> bool:
        with self.cluster.cond:
            f = self.faults
            if f.stall_remaining > 0 and f.stall_kind in ("any", kind):
                f.stall_remaining -= 1
                return True
            return False

    def fail_next(self, count: int, code: int = 500) -> None:
        """The next ``count`` requests fail with ``code`` (and a Status body)."""
        with self.cluster.cond:
            self.faults.fail_remaining = count
            self.faults.fail_code = code

    def take_failure(self) -> int:
        with self.cluster.cond:
            if self.faults.fail_remaining > 0:
                self.faults.fail_remaining -= 1
                return self.faults.fail_code
            return 0

    def fail_status_next(self, count: int, code: int = 409) -> None:
        """Answer the next ``count`` PATCHes of nodes/<name>/status with ``code``."""
        with self.nodes.cond:
            self.status_faults.extend([code] * count)

    def take_status_fault(self) -> int:
        return self.status_faults.popleft() if self.status_faults else 0

    def control(self, action: str, body: object) -> dict:
        """``POST /_fake/<action>`` for a fake running in another process: the action from
        ``CONTROL_ACTIONS`` with the request's JSON object as its arguments. Raises ApiError 404
        for an unknown action, ValueError or TypeError for arguments it cannot use."""
        run = CONTROL_ACTIONS.get(action)
        if run is None:
            raise ApiError(404, "NotFound", f"unknown fake control action {action!r}")
        answer = run(self, body if isinstance(body, dict) else {})
        return {
            "ok": True,
            "action": action,
            **(answer if answer is not None else {"resourceVersion": str(self.cluster.rv)}),
        }

    def _refuse_for_a_while(self, args: dict) -> None:
        seconds = float(args.get("seconds", 5))
        # Reopen from a timer: once the listener is closed this endpoint is unreachable.
        threading.Thread(target=self._refuse_for, args=(seconds,), daemon=True).start()

    def _apply_object(self, args: dict) -> None:
        # Create or replace any object (v1 Nodes included, which the HTTP API here only serves
        # read-only), e.g. to relabel a Node from another process.
        obj = args.get("object")
        if not isinstance(obj, dict):
            raise ValueError('apply needs {"object": {...}}')
        self.apply(obj)

    def _set_exemptions_installed(self, args: dict) -> None:
        self.exemptions_installed = bool(args.get("installed", True))

    def _count_status_writes(self, _args: dict) -> dict:
        return {"patches": len(self.status_patches), "events": len(self.events)}

    def _refuse_for(self, seconds: float) -> None:
        time.sleep(0.1)  # let the control request's answer leave first
        self.refuse_connections()
        if not self.stopping.wait(seconds):
            self.accept_connections()


def _count(args: dict, default: int = 1) -> int:
    return int(args.get("count", default))


def _frozen(args: dict) -> bool:
    return bool(args.get("frozen", True))


CONTROL_ACTIONS: dict[str, Callable[[FaultInjection, dict], dict | None]] = {
    "compact": lambda f, a: f.compact(),
    "advance": lambda f, a: f.advance(_count(a)),
    "expire-next-watch": lambda f, a: f.expire_next_watch(_count(a)),
    "expire-next-continue": lambda f, a: f.expire_next_continue(_count(a)),
    "drop-watches": lambda f, a: f.drop_watches(),
    "bookmark": lambda f, a: f.send_bookmark(),
    "freeze": lambda f, a: f.freeze(_frozen(a)),
    "freeze-watches": lambda f, a: f.freeze_watches(_frozen(a)),
    "stall-next": lambda f, a: f.stall_next(_count(a), str(a.get("kind", "any"))),
    "release-stalls": lambda f, a: f.release_stalls(),
    "fail-next": lambda f, a: f.fail_next(_count(a), int(a.get("code", 500))),
    "fail-status-next": lambda f, a: f.fail_status_next(_count(a), int(a.get("code", 409))),
    "refuse": FaultInjection._refuse_for_a_while,
    "apply": FaultInjection._apply_object,
    # A v1 Node removed (kubectl delete node), which the HTTP API here does not take.
    "delete-node": lambda f, a: f.delete_node(str(a.get("name", ""))),
    "exemptions-installed": FaultInjection._set_exemptions_installed,
    "status-patches": FaultInjection._count_status_writes,
}
"""What ``POST /_fake/<action>`` can do: action -> function(fake, arguments) returning the
answer's extra fields (None: the resourceVersion after the action)."""
