"""The list/watch loop: ``CiliumNodeSync`` keeps the store equal to the cluster's CiliumNodes -
list, then watch from the list's resourceVersion; re-list on 410 Gone and periodically; every
request has a timeout, and a watch that stays silent for ``watch_stall_seconds`` is abandoned
as stalled and resumed, so a dead or frozen API server never hangs the agent for long; errors
back off exponentially with jitter. During an API outage the store keeps its last content: an
unreachable API says nothing about the cluster. The other synced resources (resources.py)
reuse this loop through its hooks.

Every object goes through ``ciliumnode.parse_ciliumnode``; only the NodeInfo reaches the
store."""

from __future__ import annotations

import json
import logging
import random
import threading
import time

import kubernetes.client
from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

from nodecryptor.cluster.apis import GROUP, PLURAL, VERSION
from nodecryptor.cluster.client import TRANSPORT_ERRORS, api_host, load_client, translate_error
from nodecryptor.cluster.k8s_errors import ApiGone, ApiUnavailable, KubernetesError
from nodecryptor.cluster.pages import (
    MAX_OBJECT_BYTES,
    list_complete,
    meta_of,
    oversized,
    version_of,
)
from nodecryptor.cluster.store import Store
from nodecryptor.core.backoff import Backoff
from nodecryptor.core.log import kv
from nodecryptor.core.model import NodeInfo
from nodecryptor.core.settings import Settings
from nodecryptor.observe.metrics import Metrics
from nodecryptor.policy.ciliumnode import Rejection, parse_ciliumnode

log = logging.getLogger("nodecryptor.k8s")


class CiliumNodeSync:
    """Keeps ``store`` equal to the cluster's CiliumNodes (as NodeInfo).

    ``backoff`` and ``read_timeout_margin`` (seconds added to the server-side watch timeout
    for the client-side read timeout, which never exceeds ``watch_stall_seconds``) are
    injectable so tests run fast; everything else comes from Settings (list_page_size,
    watch_timeout_seconds, watch_stall_seconds, request_timeout_seconds, resync_seconds).

    ``heartbeat`` (monotonic) advances whenever the loop makes a step (a request, an event or
    bookmark, a retry); ``alive()`` turns it into a liveness check for /healthz.
    """

    def __init__(
        self,
        settings: Settings,
        store: Store,
        metrics: Metrics | None = None,
        backoff: Backoff = Backoff(),
        read_timeout_margin: float = 5.0,
        rng: random.Random | None = None,
    ):
        self.settings = settings
        self.store = store
        self.metrics = metrics
        self.backoff = backoff
        self.read_timeout_margin = read_timeout_margin
        self._rng = rng or random.Random()
        self._logged: dict[str, str] = {}
        """name -> resourceVersion whose rejections were already logged and counted."""
        self._lock = threading.Lock()
        self._response = None
        self.failures = 0
        """Consecutive failed attempts (list or watch); 0 after a success."""
        self._expiries = 0
        """Consecutive 410s on watch without an event in between."""
        self.lists = 0
        """Complete lists so far (for tests and status)."""
        self.resource_version: str | None = None
        """Newest resourceVersion seen (list, event or bookmark); None forces a list."""
        self.heartbeat = time.monotonic()
        """Monotonic time of the loop's last step: liveness, independent of the API's health."""

    # Public entry point

    def run(self, stop: threading.Event) -> None:
        """List and watch until ``stop`` is set. Never raises: API trouble, and even a
        client configuration that cannot be loaded (a service-account mount that is not there
        yet), is logged, counted and retried with backoff while the store keeps its content."""
        api_client = None
        # Unblock a read in progress as soon as stop is set, instead of waiting for the
        # read timeout (minutes in production).
        closer = threading.Thread(
            target=self._close_on_stop, args=(stop,), name="ciliumnode-sync-stop", daemon=True
        )
        closer.start()
        next_resync = 0.0
        try:
            while not stop.is_set():
                self.heartbeat = time.monotonic()
                try:
                    if api_client is None:
                        api_client = load_client(self.settings)
                        api = self._make_api(api_client)
                    if self.resource_version is None or time.monotonic() >= next_resync:
                        if self.resource_version is not None:
                            self._restart("resync")
                        self.resource_version = self._relist(api)
                        next_resync = time.monotonic() + self.settings.resync_seconds
                    self._watch(api, stop, next_resync)
                except ApiGone as e:
                    # Our version fell out of the server's history: only a new list can
                    # tell what we missed. Not a server fault, so no backoff the first time.
                    log.info(f"{self.kind} watch expired; listing again", extra=kv(error=str(e)))
                    self._restart(e.cause)
                    self.resource_version = None
                    self._expiries += 1
                    if self._expiries > 1:
                        # Expired again before any event arrived: do not spin on list.
                        stop.wait(self.backoff.delay(self._expiries - 1, self._rng))
                except KubernetesError as e:
                    self._restart(e.cause)
                    self.failures += 1
                    delay = self._sleep(stop)
                    log.warning(
                        f"{self.kind} sync failed; keeping the last known nodes",
                        extra=kv(
                            error=str(e),
                            retry_in=f"{delay:.2f}s",
                            failures=self.failures,
                            nodes=len(self.store),
                        ),
                    )
                except Exception as e:
                    # A bug (or a client library surprise) must not end the sync silently
                    # while the node keeps reporting healthy: log it with its trace, count it,
                    # back off and carry on with the store as it is.
                    log.exception(
                        f"{self.kind} sync failed unexpectedly; retrying",
                        extra=kv(error=f"{type(e).__name__}: {e}"),
                    )
                    self._restart("internal-error")
                    self.failures += 1
                    self._sleep(stop)
        finally:
            with self._lock:
                self._response = None
            if api_client is not None:
                api_client.close()

    # Steps

    def _relist(self, api) -> str:
        started = time.monotonic()
        result = list_complete(
            api,
            self.settings,
            self._parse,
            self.noun,
            self._beat,
            lambda: self._restart("list-expired"),
        )
        for meta, rejections in result.rejections:
            self._report(meta, rejections)
        self._forget_logged(result.nodes)
        self._install(result.nodes)
        self.lists += 1
        self.failures = 0
        if self.metrics is not None:
            self.metrics.last_sync.set(time.time())
        log.info(
            f"listed {self.noun}",
            extra=kv(
                nodes=len(result.nodes),
                pages=result.pages,
                resource_version=result.resource_version,
                seconds=f"{time.monotonic() - started:.3f}",
            ),
        )
        return result.resource_version

    def _watch(self, api, stop: threading.Event, next_resync: float) -> None:
        """Watch from ``self.resource_version`` until the server ends the stream, the resync
        is due or stop is set, advancing the version with every event and bookmark, so a
        failed watch resumes where it broke. Errors raise KubernetesError.

        Stall detection: the read timeout (waiting for the response, then between any two
        reads of the stream) is at most ``watch_stall_seconds``, and the server is asked to
        end the watch a little before that, so a healthy server always sends something (its
        pre-deadline bookmark, the end of the stream) in time and silence means a stall."""
        rv = self.resource_version
        remaining = max(1.0, next_resync - time.monotonic())
        stall = self.settings.watch_stall_seconds
        server_timeout = max(
            1, int(min(self.settings.watch_timeout_seconds, remaining, stall - min(5.0, stall / 2)))
        )
        connect = self.settings.request_timeout_seconds
        read = min(server_timeout + self.read_timeout_margin, stall)
        what = f"watching {self.noun} from resourceVersion {rv}"
        try:
            resp = api.list_cluster_custom_object(
                GROUP,
                VERSION,
                PLURAL,
                watch=True,
                allow_watch_bookmarks=True,
                resource_version=rv,
                timeout_seconds=server_timeout,
                _preload_content=False,
                _request_timeout=(connect, read),
            )
        except ApiException as e:
            raise translate_error(e, api_host(api), what) from e
        except TRANSPORT_ERRORS as e:
            raise translate_error(e, api_host(api), what) from e
        with self._lock:
            self._response = resp
        events = 0
        try:
            if stop.is_set():  # set while we connected: the closer thread has already run
                return
            for line in iter_resp_lines(resp):
                if not line:
                    continue
                self.heartbeat = time.monotonic()
                self.resource_version = self._handle_event(line, self.resource_version, what)
                events += 1
                if events == 1:
                    # The watch works: the next error starts a new backoff.
                    self.failures = self._expiries = 0
                if stop.is_set() or time.monotonic() >= next_resync:
                    break
        except (ApiException, *TRANSPORT_ERRORS) as e:
            if stop.is_set():
                return
            raise translate_error(e, api_host(api), what) from e
        finally:
            with self._lock:
                self._response = None
            resp.release_conn()
            resp.close()
        if not stop.is_set() and time.monotonic() < next_resync:
            # The server ended the watch (its timeout): reconnect from where we are.
            self.failures = 0
            self._restart("timeout")

    def _handle_event(self, line: str, rv: str | None, what: str) -> str | None:
        """Apply one watch event to the store; return the resourceVersion it carries."""
        try:
            event = json.loads(line)
            kind, obj = event["type"], event["object"]
        except (ValueError, KeyError, TypeError) as e:
            raise ApiUnavailable(f"{what}: unparsable event {line[:120]!r}: {e}") from None
        meta = meta_of(obj)
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message") if isinstance(obj, dict) else obj
            if code == 410:
                raise ApiGone(f"{what}: {message}")
            raise ApiUnavailable(f"{what}: the server sent an error event ({code}): {message}")
        if kind == "BOOKMARK":
            return version_of(meta, rv)
        if kind in ("ADDED", "MODIFIED") and len(line) > MAX_OBJECT_BYTES:
            # Rejected whole, as a list would: the object stops counting.
            name = meta.get("name")
            self._report(meta, [oversized(str(name or "?"), self.kind, len(line))])
            if isinstance(name, str):
                self._remove(name)
            return version_of(meta, rv)
        if kind in ("ADDED", "MODIFIED"):
            info, rejections = self._parse(obj)
            if rejections:
                self._report(meta, rejections)
            if info is not None:
                self._upsert(info)
        elif kind == "DELETED":
            name = meta.get("name")
            if isinstance(name, str):
                self._remove(name)
                self._logged.pop(name, None)
        else:
            log.debug("ignoring watch event of unknown type", extra=kv(type=kind))
        return version_of(meta, rv)

    # What is synced: CiliumNodes into the store (NodeRoleSync overrides these)

    kind = "CiliumNode"
    noun = "CiliumNodes"

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return kubernetes.client.CustomObjectsApi(api_client)

    def _parse(self, obj: object):
        return parse_ciliumnode(obj)

    def _install(self, items: dict) -> None:
        self.store.replace_all(items.values())

    def _upsert(self, item) -> None:
        self.store.upsert(item)

    def _remove(self, name: str) -> None:
        self.store.delete(name)

    # Helpers

    def _report(self, meta: dict, rejections: list[Rejection]) -> None:
        """Log and count an object's rejections once per object version, so neither a
        re-list nor a periodic resync repeats the same warning."""
        name = str(meta.get("name") or "?")
        version = str(meta.get("resourceVersion") or "")
        if version and self._logged.get(name) == version:
            return
        if version:
            self._logged[name] = version
        self._log_rejections(rejections, version)

    def _log_rejections(self, rejections: list[Rejection], version: str) -> None:
        """Say and count one object version's rejections (once: see ``_report``)."""
        for rej in rejections:
            log.warning(
                f"skipping invalid {self.kind} entry",
                extra=kv(
                    node=rej.obj,
                    field=rej.field,
                    value=rej.value,
                    why=rej.why,
                    resource_version=version,
                ),
            )
        if self.metrics is not None:
            self.metrics.record_rejections(rejections)

    def _forget_logged(self, nodes: dict[str, NodeInfo]) -> None:
        for name in [n for n in self._logged if n not in nodes]:
            del self._logged[name]

    def _restart(self, cause: str) -> None:
        if self.metrics is not None:
            self.metrics.watch_restarts.labels(cause=cause).inc()
            if cause == "stalled":
                self.metrics.watch_stalls.inc()

    def _sleep(self, stop: threading.Event) -> float:
        delay = self.backoff.delay(max(1, self.failures), self._rng)
        self.heartbeat = time.monotonic()
        stop.wait(delay)
        return delay

    def _beat(self) -> None:
        self.heartbeat = time.monotonic()

    def alive(self, now: float | None = None) -> tuple[bool, str]:
        """Liveness of the loop (not of the API server: an outage keeps it turning). The
        longest step a healthy loop takes is a connect plus a silent watch read, so a stall
        threshold raised above the default also raises the limit (with half again as margin)."""
        s = self.settings
        limit = max(s.sync_stale_seconds, 1.5 * (s.watch_stall_seconds + s.request_timeout_seconds))
        age = (now if now is not None else time.monotonic()) - self.heartbeat
        if age > limit:
            return False, f"{self.kind} sync made no progress for {age:.0f}s"
        return True, f"{self.kind} sync stepped {age:.1f}s ago"

    def _close_on_stop(self, stop: threading.Event) -> None:
        stop.wait()
        with self._lock:
            resp = self._response
        if resp is not None:
            _abort(resp)


def _abort(resp) -> None:
    """Shut the socket under a streaming response so a blocked read returns now."""
    conn = getattr(resp, "connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(2)  # SHUT_RDWR
        except OSError:
            pass  # already closed
