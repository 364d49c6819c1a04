"""The NodeEncryptionReady condition on the agent's own Node (nodecryptor.policy.peerhealth
decides it; this writes it): ``NodeConditionWriter`` patches ``status.conditions`` from its own
thread, with heartbeats, rate limits and backoff, and records a transition as an Event."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import kubernetes.client
from kubernetes.client.exceptions import ApiException

from nodecryptor.cluster.client import (
    TRANSPORT_ERRORS,
    api_host,
    load_client,
    status_message,
    translate_error,
)
from nodecryptor.cluster.k8s_errors import ApiUnavailable, KubernetesError
from nodecryptor.core.backoff import Backoff
from nodecryptor.core.log import kv
from nodecryptor.core.settings import Settings
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy.peerhealth import Condition

log = logging.getLogger("nodecryptor.k8s")

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
EVENT_NAMESPACE = "default"
"""Where Events about Nodes live (a Node is cluster-scoped; the kubelet uses "default" too)."""


def condition_patch(
    condition_type: str, status: str, reason: str, message: str, heartbeat: str, transition: str
) -> dict:
    """A strategic merge patch of one entry of ``status.conditions``: the API server merges the
    list by ``type``, so the kubelet's and other controllers' conditions are left alone and no
    resourceVersion (hence no read-modify-write race) is involved."""
    return {
        "status": {
            "conditions": [
                {
                    "type": condition_type,
                    "status": status,
                    "reason": reason,
                    "message": message[:1024],
                    "lastHeartbeatTime": heartbeat,
                    "lastTransitionTime": transition,
                }
            ]
        }
    }


def _rfc3339(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))


class NodeConditionWriter:
    """Keeps one condition of the agent's own Node up to date from its own thread: ``submit``
    never blocks (it records the newest condition and wakes the thread), so an API outage
    never delays the reconcile or health loops.

    A write (PATCH nodes/<name>/status) happens when the (status, reason) pair differs from
    the last one written, and otherwise once every ``heartbeat_seconds`` (jittered by
    ``jitter``) so a consumer can tell a live writer from a dead one; a new message alone never
    writes. Writes are at least ``min_interval`` apart (a flapping input coalesces into its
    latest value). Failures, 409 conflicts included, retry with exponential backoff; the
    condition that is written is always the newest submitted. Each written change of
    (status, reason) after the first also creates a core/v1 Event on the Node, at most one per
    ``event_interval`` seconds. Stopping leaves the condition as it is."""

    def __init__(
        self,
        settings: Settings,
        condition_type: str,
        metrics: Metrics | None = None,
        *,
        heartbeat_seconds: float = 1800.0,
        jitter: float = 0.1,
        min_interval: float = 10.0,
        event_interval: float = 60.0,
        backoff: Backoff = Backoff(initial=1.0, maximum=60.0),
        rng: random.Random | None = None,
        wall=time.time,
        clock=time.monotonic,
    ):
        self.settings = settings
        self.type = condition_type
        self.metrics = metrics
        self.heartbeat_seconds = heartbeat_seconds
        self.jitter = jitter
        self.min_interval = min_interval
        self.event_interval = event_interval
        self.backoff = backoff
        self._rng = rng or random.Random()
        self._wall = wall
        self._clock = clock
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._pending = None
        self.written = None
        """The last condition written successfully (a peerhealth.Condition)."""
        self._transition: str | None = None
        self._node_uid: str | None = None
        self._known = False
        """Whether the Node's existing condition was read (to keep its transition time)."""
        self.failures = 0
        self.writes = 0
        self.events = 0
        self._next_heartbeat = 0.0
        self._not_before = 0.0
        self._last_event = -float("inf")

    def submit(self, condition) -> None:
        with self._lock:
            self._pending = condition
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        api_client = None
        while not stop.is_set():
            self._wake.clear()
            delay = 1.0
            try:
                if api_client is None:
                    api_client = load_client(self.settings)
                delay = self.step(kubernetes.client.CoreV1Api(api_client))
            except KubernetesError as e:
                self.failures += 1
                delay = self.backoff.delay(self.failures, self._rng)
                self._not_before = self._clock() + delay
                if self.metrics is not None:
                    self.metrics.condition_writes.labels(result="error").inc()
                log.warning(
                    "node condition write failed; will retry",
                    extra=kv(
                        condition=self.type,
                        error=str(e),
                        retry_in=f"{delay:.1f}s",
                        failures=self.failures,
                    ),
                )
            except Exception as e:  # a bug must not end the writer silently
                self.failures += 1
                delay = self.backoff.delay(self.failures, self._rng)
                self._not_before = self._clock() + delay
                log.exception(
                    "node condition writer failed unexpectedly",
                    extra=kv(error=f"{type(e).__name__}: {e}"),
                )
            # Re-check at least every second: ``stop`` is noticed promptly, and ``step`` does
            # no I/O unless a write is due.
            self._wake.wait(min(max(0.05, delay), 1.0))
        if api_client is not None:
            api_client.close()

    def step(self, core) -> float:
        """Write if a write is due; return the seconds until the next check. Raises
        KubernetesError on a failed request (the caller backs off)."""
        with self._lock:
            cond = self._pending
        now = self._clock()
        if cond is None:
            return 60.0
        # The first write happens at start whatever the Node already carries (it refreshes
        # lastHeartbeatTime for this agent's life).
        changed = self.writes == 0 or self.written.key != cond.key
        if not changed and now < self._next_heartbeat:
            return self._next_heartbeat - now
        if now < self._not_before:
            return self._not_before - now
        self._write(core, cond)
        return 1.0

    def _call(self, what: str, fn, *args, **kwargs):
        """``fn`` with timeouts; returns the decoded JSON body (read whole, so the connection
        can be reused). Raises KubernetesError (a 409 as a retryable conflict)."""
        try:
            resp = fn(
                *args,
                **kwargs,
                _preload_content=False,
                _request_timeout=(self.settings.request_timeout_seconds,) * 2,
            )
            try:
                return json.loads(resp.data or b"null")
            finally:
                resp.release_conn()
        except ApiException as e:
            if e.status == 409:
                raise ApiUnavailable(
                    f"{what}: conflict (409): {status_message(e)}", cause="conflict"
                ) from e
            raise translate_error(e, api_host(fn), what) from e
        except TRANSPORT_ERRORS as e:
            raise translate_error(e, api_host(fn), what) from e

    def _read_existing(self, core) -> None:
        """Before the first write: the Node's uid (for Events) and the condition already
        there (a restarted agent keeps its lastTransitionTime when the status is unchanged)."""
        node = self._call(
            f"reading node {self.settings.node_name}", core.read_node, self.settings.node_name
        )
        if not isinstance(node, dict):
            raise ApiUnavailable(f"reading node {self.settings.node_name}: not an object")
        self._node_uid = (node.get("metadata") or {}).get("uid")
        for c in (node.get("status") or {}).get("conditions") or []:
            if isinstance(c, dict) and c.get("type") == self.type:
                self._transition = f"{c.get('status')}|{c.get('lastTransitionTime')}"
                # What a previous agent wrote counts as written: a restart with an unchanged
                # (status, reason) is no transition (no write beyond the start one, no Event).
                self.written = Condition(
                    str(c.get("status")), str(c.get("reason")), str(c.get("message") or "")
                )
        self._known = True

    def _write(self, core, cond) -> None:
        if not self._known:
            self._read_existing(core)
        wall = self._wall()
        previous = self.written if self.writes else None
        inherited = self.written if not self.writes else None
        old_status, _, old_time = (self._transition or "|").partition("|")
        # lastTransitionTime moves only when the status does (a reason change is no
        # transition, as for the kubelet's conditions).
        transition = old_time if old_status == cond.status and old_time else _rfc3339(wall)
        body = condition_patch(
            self.type, cond.status, cond.reason, cond.message, _rfc3339(wall), transition
        )
        self._call(
            f"patching node {self.settings.node_name} status",
            core.patch_node_status,
            self.settings.node_name,
            body,
            _content_type=STRATEGIC_MERGE,
        )
        self._transition = f"{cond.status}|{transition}"
        self.written = cond
        self.writes += 1
        self.failures = 0
        now = self._clock()
        self._not_before = now + self.min_interval
        spread = self.heartbeat_seconds * self.jitter
        self._next_heartbeat = now + self.heartbeat_seconds + self._rng.uniform(-spread, spread)
        if self.metrics is not None:
            self.metrics.condition_writes.labels(result="ok").inc()
        if previous is None or previous.key != cond.key:
            log.info(
                "node condition written",
                extra=kv(
                    condition=self.type,
                    status=cond.status,
                    reason=cond.reason,
                    message=cond.message,
                ),
            )
            if previous is not None or (inherited is not None and inherited.key != cond.key):
                self._event(core, cond, now)

    def _event(self, core, cond, now: float) -> None:
        """An Event on the Node for a transition, rate-limited; a failed Event is logged and
        dropped (the condition itself was written)."""
        if now - self._last_event < self.event_interval:
            log.info("node event suppressed (rate limit)", extra=kv(reason=cond.reason))
            return
        self._last_event = now
        stamp = _rfc3339(self._wall())
        node = self.settings.node_name
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{node}.", "namespace": EVENT_NAMESPACE},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Node",
                "name": node,
                "uid": self._node_uid or node,
            },
            "reason": cond.reason,
            "message": cond.message[:1024],
            "type": "Normal" if cond.status == "True" else "Warning",
            "source": {"component": "nodecryptor", "host": node},
            "reportingComponent": "nodecryptor",
            "reportingInstance": node,
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            self._call("creating a node event", core.create_namespaced_event, EVENT_NAMESPACE, body)
            self.events += 1
        except KubernetesError as e:
            log.warning("node event not created", extra=kv(reason=cond.reason, error=str(e)))
