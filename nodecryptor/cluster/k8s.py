"""Kubernetes access: the only module that imports the ``kubernetes`` client.

- ``load_client``: an ApiClient from ``--kubeconfig`` or the in-cluster service account;
  ``check_config``: the same loading without a client, so commands refuse an unusable
  configuration before they change anything.
- ``snapshot_once``: one paginated list of CiliumNodes, for ``nodecryptor plan``.
- ``CiliumNodeSync``: list, then watch from the list's resourceVersion, feeding the Store;
  re-lists on 410 Gone and periodically; every request has a timeout, and a watch that stays
  silent for ``watch_stall_seconds`` is abandoned as stalled and resumed, so a dead or frozen
  API server never hangs the agent for long; errors back off exponentially with jitter. During
  an API outage the store keeps its last content: an unreachable API says nothing about the
  cluster.
- ``NodeRoleSync``: the same loop over the v1 Nodes, metadata only, for the control-plane
  role labels (``--role-source node``, the default) and the labels exemption policies select.
- ``ExemptionSync``: the same loop over ``encryptionexemptions.nodecryptor.io/v1alpha1``
  (exemptions.py); a missing CRD is reported and retried, the built-in policy still applies.

Every object goes through ``ciliumnode.parse_ciliumnode`` (or ``parse_node_roles`` for a
Node); only the NodeInfo (or the Node's role labels) reaches the store.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import threading
import time
from dataclasses import dataclass

import kubernetes.client
import kubernetes.config
import urllib3
import yaml
from kubernetes.client.exceptions import ApiException
from kubernetes.config.incluster_config import InClusterConfigLoader
from kubernetes.watch.watch import iter_resp_lines

from nodecryptor.policy import exemptions
from nodecryptor.policy.ciliumnode import Rejection, parse_ciliumnode, parse_node_roles
from nodecryptor.core.backoff import Backoff
from nodecryptor.cluster.k8s_errors import (ApiForbidden, ApiGone, ApiUnavailable, KubeConfigError,
                         KubernetesError)
from nodecryptor.core.log import kv
from nodecryptor.observe.metrics import Metrics
from nodecryptor.core.model import NodeInfo
from nodecryptor.policy.peerhealth import Condition
from nodecryptor.core.settings import RoleSource, Settings
from nodecryptor.cluster.store import Store

log = logging.getLogger("nodecryptor.k8s")

GROUP = "cilium.io"
VERSION = "v2"
PLURAL = "ciliumnodes"
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where the kubelet mounts the service-account token and CA (in-cluster configuration)."""


# --------------------------------------------------------------------------------------------
# Client and errors


MAX_KUBECONFIG_BYTES = 16 << 20
"""A kubeconfig larger than this is refused rather than parsed (it is not one)."""

# What loading a broken kubeconfig raises, besides ConfigException: file errors, YAML errors
# (binary content is a UnicodeDecodeError, a ValueError), and TypeError, AttributeError or
# KeyError when the YAML is valid but not a kubeconfig-shaped mapping.
_CONFIG_ERRORS = (kubernetes.config.ConfigException, OSError, ValueError, TypeError,
                  AttributeError, KeyError, yaml.YAMLError)


def _check_kubeconfig_file(path: str) -> None:
    """Clear messages for the file-level faults the client reports obscurely (a missing
    file is "No configuration found", a directory an IsADirectoryError)."""
    if not os.path.exists(path):
        raise KubeConfigError("the file does not exist")
    if os.path.isdir(path):
        raise KubeConfigError("it is a directory, not a kubeconfig file")
    if not os.path.isfile(path):
        raise KubeConfigError("it is not a regular file")
    try:
        with open(path, "rb") as f:
            head = f.read(MAX_KUBECONFIG_BYTES + 1)
    except OSError as e:
        raise KubeConfigError(f"cannot read it: {e.strerror or e}") from None
    if len(head) > MAX_KUBECONFIG_BYTES:
        raise KubeConfigError(f"larger than {MAX_KUBECONFIG_BYTES >> 20} MiB: not a kubeconfig")
    if b"\0" in head:
        raise KubeConfigError("binary content, not a YAML kubeconfig")
    try:
        doc = yaml.safe_load(head.decode("utf-8"))
    except UnicodeDecodeError:
        raise KubeConfigError("not UTF-8 text, so not a YAML kubeconfig") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise KubeConfigError(f"not YAML: {getattr(e, 'problem', None) or e}{where}") from None
    if doc is None:
        raise KubeConfigError("the file is empty")
    if not isinstance(doc, dict):
        raise KubeConfigError(f"YAML, but a {type(doc).__name__}, not a kubeconfig (a mapping "
                              f"with clusters, users, contexts and current-context)")
    if not doc.get("current-context"):
        raise KubeConfigError("no current-context set")


def _load_config(settings: Settings, cfg: kubernetes.client.Configuration) -> None:
    """Fill ``cfg`` from ``settings.kubeconfig`` or the in-cluster service account. Raises
    KubeConfigError whose message says what is wrong (not where: callers add that)."""
    try:
        if settings.kubeconfig is not None:
            _check_kubeconfig_file(os.path.expanduser(settings.kubeconfig))
            kubernetes.config.load_kube_config(config_file=settings.kubeconfig,
                                               client_configuration=cfg)
        else:
            InClusterConfigLoader(
                token_filename=os.path.join(SERVICE_ACCOUNT_DIR, "token"),
                cert_filename=os.path.join(SERVICE_ACCOUNT_DIR, "ca.crt"),
            ).load_and_set(cfg)
    except KubeConfigError:
        raise
    except _CONFIG_ERRORS as e:
        raise KubeConfigError(str(e).replace("\n", " ") or type(e).__name__) from e


def config_source(settings: Settings) -> str:
    return (f"--kubeconfig {settings.kubeconfig!r}" if settings.kubeconfig is not None else
            f"in-cluster configuration (service account in {SERVICE_ACCOUNT_DIR}, "
            f"KUBERNETES_SERVICE_HOST/PORT)")


def check_config(settings: Settings) -> None:
    """Load the client configuration without contacting the API server, so a command can
    refuse an unusable kubeconfig or a missing service account before it changes anything.
    Raises KubeConfigError saying what is wrong."""
    _load_config(settings, kubernetes.client.Configuration())


def load_client(settings: Settings) -> kubernetes.client.ApiClient:
    """An ApiClient for ``settings.kubeconfig``, or the in-cluster service account when it is
    None. Retries inside urllib3 are off: the sync's own backoff decides when to retry, and a
    hidden retry would multiply every timeout. Raises KubeConfigError."""
    cfg = kubernetes.client.Configuration()
    try:
        _load_config(settings, cfg)
    except KubeConfigError as e:
        raise KubeConfigError(f"cannot load {config_source(settings)}: {e}") from e
    cfg.retries = False
    # TCP keepalive (client-go's timings) notices a peer that vanished without a FIN or RST
    # (a rebooted control-plane node) long before the watch's read timeout would.
    cfg.keep_alive = True
    return kubernetes.client.ApiClient(cfg)


def _server(api: kubernetes.client.CustomObjectsApi) -> str:
    return api.api_client.configuration.host


def translate_error(err: Exception, server: str, what: str) -> KubernetesError:
    """Map client and transport exceptions to nodecryptor's error classes."""
    if isinstance(err, ApiException):
        status = err.status or 0
        detail = _status_message(err)
        if status in (401, 403):
            return ApiForbidden(f"{what}: the API server {server} refused access "
                                f"({status} {err.reason}): {detail}")
        if status == 410:
            return ApiGone(f"{what}: {detail}")
        if status == 504 and "ResourceVersionTooLarge" in str(err.body):
            # Our version is newer than the server's (it was restored or replaced): only a
            # new list helps, as for 410.
            return ApiGone(f"{what}: {detail}", cause="too-large")
        if status == 404 and _status_details_name(err):
            return KubernetesError(f"{what}: not found on {server} (404): {detail}")
        if status == 404:
            return KubernetesError(f"{what}: {server} has no ciliumnodes.cilium.io/v2 resource "
                                   f"(is Cilium installed?): {detail}")
        if status >= 500 or status in (0, 429):
            return ApiUnavailable(f"{what}: the API server {server} answered {status} "
                                  f"{err.reason}: {detail}", cause="server-error")
        return KubernetesError(f"{what}: the API server {server} answered {status} "
                               f"{err.reason}: {detail}")
    if isinstance(err, urllib3.exceptions.ReadTimeoutError):
        return ApiUnavailable(f"{what}: {server} sent nothing within the read timeout ({err})",
                              cause="stalled")
    if isinstance(err, urllib3.exceptions.ProtocolError):
        return ApiUnavailable(f"{what}: the connection to {server} broke: {err}",
                              cause="dropped")
    return ApiUnavailable(f"{what}: cannot reach the API server {server}: {err}",
                          cause="unreachable")


def _status_details_name(err: ApiException) -> str | None:
    """The object name of a Status body: present when one object, not the resource, is
    missing."""
    try:
        return json.loads(err.body)["details"]["name"]
    except (TypeError, ValueError, KeyError):
        return None


def _status_message(err: ApiException) -> str:
    try:
        return str(json.loads(err.body).get("message") or err.body)
    except (TypeError, ValueError, AttributeError):
        return str(err.body or err.reason)


# Errors a request can end with besides ApiException: connection refused or reset, timeouts,
# TLS failures, a stream cut short, an unparsable body.
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError, ValueError)


# --------------------------------------------------------------------------------------------
# Listing


@dataclass
class ListResult:
    nodes: dict[str, NodeInfo]
    rejections: list[tuple[dict, list[Rejection]]]
    """(object metadata, rejections) per object that had invalid entries."""
    resource_version: str
    pages: int


def _list_all(api: kubernetes.client.CustomObjectsApi, page_size: int,
              timeout: float, parse=parse_ciliumnode, noun: str = "CiliumNodes",
              on_page=None) -> ListResult:
    """Follow limit/continue to the end, turning each item into a value with a ``name`` by
    ``parse`` and calling ``on_page`` after every page (progress for the liveness check).
    Raises KubernetesError (ApiGone for a stale continue token: the caller starts over)."""
    nodes: dict[str, NodeInfo] = {}
    rejected: list[tuple[dict, list[Rejection]]] = []
    token: str | None = None
    pages = 0
    while True:
        try:
            page = api.list_cluster_custom_object(GROUP, VERSION, PLURAL, limit=page_size,
                                                  _continue=token,
                                                  _request_timeout=(timeout, timeout))
        except ApiException as e:
            raise translate_error(e, _server(api), f"listing {noun}") from e
        except _TRANSPORT_ERRORS as e:
            raise translate_error(e, _server(api), f"listing {noun}") from e
        pages += 1
        if on_page is not None:
            on_page()
        if not isinstance(page, dict) or not isinstance(page.get("items"), list):
            raise ApiUnavailable(f"listing {noun}: {_server(api)} sent no item list")
        for obj in page["items"]:
            info, rejections = parse(obj)
            if info is not None:
                nodes[info.name] = info
            if rejections:
                rejected.append((_meta(obj), rejections))
        meta = page.get("metadata") or {}
        token = meta.get("continue") or None
        if token is None:
            return ListResult(nodes, rejected, str(meta.get("resourceVersion") or ""), pages)


def _version(meta: dict, default: str | None) -> str | None:
    value = meta.get("resourceVersion")
    return str(value) if value else default


def _meta(obj: object) -> dict:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return meta if isinstance(meta, dict) else {}


def snapshot_once(settings: Settings) -> tuple[dict[str, NodeInfo], list[Rejection]]:
    """List every CiliumNode once, and with ``role_source`` "node" every Node's role labels,
    merged as the agent's store merges them. Raises a KubernetesError naming the server and
    the cause when the API is unreachable, refuses access, or has no CiliumNode resource."""
    api_client = load_client(settings)
    try:
        result = _list_retrying(kubernetes.client.CustomObjectsApi(api_client), settings)
        nodes = result.nodes
        if settings.role_source == RoleSource.NODE:
            roles = _list_retrying(
                NodeMetadataApi(api_client), settings, "Nodes",
                lambda obj: parse_node_roles(obj, None)).nodes
            nodes = {name: dataclasses.replace(info, node_labels=roles[name].labels)
                     if name in roles else info for name, info in nodes.items()}
        return nodes, [r for _, rs in result.rejections for r in rs]
    finally:
        api_client.close()


def exemptions_once(settings: Settings) -> tuple[tuple, list[Rejection], str | None]:
    """List the EncryptionExemptions once: (policies, rejections, note). ``note`` says why
    none could be listed (the CRD is not installed), which only leaves the built-in policy."""
    api_client = load_client(settings)
    try:
        result = _list_retrying(ResourceApi(api_client, exemptions.GROUP, exemptions.VERSION,
                                            exemptions.PLURAL), settings,
                                "EncryptionExemptions", exemptions.parse_exemption)
    except ResourceMissing as e:
        return (), [], str(e)
    finally:
        api_client.close()
    return (tuple(result.nodes[n] for n in sorted(result.nodes)),
            [r for _, rs in result.rejections for r in rs], None)


def _list_retrying(api, settings: Settings, noun: str = "CiliumNodes",
                   parse=parse_ciliumnode) -> ListResult:
    for attempt in range(3):
        try:
            return _list_all(api, settings.list_page_size, settings.request_timeout_seconds,
                             parse, noun)
        except ApiGone:
            # The snapshot behind a continue token was compacted: start the list over.
            if attempt == 2:
                raise
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------------------------
# The sync loop


class CiliumNodeSync:
    """Keeps ``store`` equal to the cluster's CiliumNodes (as NodeInfo).

    ``backoff`` and ``read_timeout_margin`` (seconds added to the server-side watch timeout
    for the client-side read timeout, which never exceeds ``watch_stall_seconds``) are
    injectable so tests run fast; everything else comes from Settings (list_page_size,
    watch_timeout_seconds, watch_stall_seconds, request_timeout_seconds, resync_seconds).

    ``heartbeat`` (monotonic) advances whenever the loop makes a step (a request, an event or
    bookmark, a retry); ``alive()`` turns it into a liveness check for /healthz.
    """

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None,
                 backoff: Backoff = Backoff(), read_timeout_margin: float = 5.0,
                 rng: random.Random | None = None):
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
        closer = threading.Thread(target=self._close_on_stop, args=(stop,),
                                  name="ciliumnode-sync-stop", daemon=True)
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
                    log.warning(f"{self.kind} sync failed; keeping the last known nodes",
                                extra=kv(error=str(e), retry_in=f"{delay:.2f}s",
                                         failures=self.failures, nodes=len(self.store)))
                except Exception as e:
                    # A bug (or a client library surprise) must not end the sync silently
                    # while the node keeps reporting healthy: log it with its trace, count it,
                    # back off and carry on with the store as it is.
                    log.exception(f"{self.kind} sync failed unexpectedly; retrying",
                                  extra=kv(error=f"{type(e).__name__}: {e}"))
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
        try:
            result = _list_all(api, self.settings.list_page_size,
                               self.settings.request_timeout_seconds, self._parse, self.noun,
                               self._beat)
        except ApiGone:
            # A continue token expired in the middle of the list: start it over at once.
            self._restart("list-expired")
            result = _list_all(api, self.settings.list_page_size,
                               self.settings.request_timeout_seconds, self._parse, self.noun,
                               self._beat)
        for meta, rejections in result.rejections:
            self._report(meta, rejections)
        self._forget_logged(result.nodes)
        self._install(result.nodes)
        self.lists += 1
        self.failures = 0
        if self.metrics is not None:
            self.metrics.last_sync.set(time.time())
        log.info(f"listed {self.noun}", extra=kv(nodes=len(result.nodes), pages=result.pages,
                                                 resource_version=result.resource_version,
                                                 seconds=f"{time.monotonic() - started:.3f}"))
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
        server_timeout = max(1, int(min(self.settings.watch_timeout_seconds, remaining,
                                        stall - min(5.0, stall / 2))))
        connect = self.settings.request_timeout_seconds
        read = min(server_timeout + self.read_timeout_margin, stall)
        what = f"watching {self.noun} from resourceVersion {rv}"
        try:
            resp = api.list_cluster_custom_object(
                GROUP, VERSION, PLURAL, watch=True, allow_watch_bookmarks=True,
                resource_version=rv, timeout_seconds=server_timeout,
                _preload_content=False, _request_timeout=(connect, read))
        except ApiException as e:
            raise translate_error(e, _server(api), what) from e
        except _TRANSPORT_ERRORS as e:
            raise translate_error(e, _server(api), what) from e
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
        except (ApiException, *_TRANSPORT_ERRORS) as e:
            if stop.is_set():
                return
            raise translate_error(e, _server(api), what) from e
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
        meta = _meta(obj)
        if kind == "ERROR":
            code = obj.get("code") if isinstance(obj, dict) else None
            message = obj.get("message") if isinstance(obj, dict) else obj
            if code == 410:
                raise ApiGone(f"{what}: {message}")
            raise ApiUnavailable(f"{what}: the server sent an error event ({code}): {message}")
        if kind == "BOOKMARK":
            return _version(meta, rv)
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
        return _version(meta, rv)

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
            log.warning(f"skipping invalid {self.kind} entry",
                        extra=kv(node=rej.obj, field=rej.field, value=rej.value, why=rej.why,
                                 resource_version=version))
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
        limit = max(s.sync_stale_seconds,
                    1.5 * (s.watch_stall_seconds + s.request_timeout_seconds))
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


# --------------------------------------------------------------------------------------------
# Control-plane roles from the v1 Nodes

NODE_METADATA_LIST = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1"
NODE_METADATA_WATCH = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
"""Accept headers that make the API server send Nodes as metadata only (PartialObjectMetadata:
names, labels, annotations; no spec, no status), a fraction of a full Node. A list asks for the
List kind, a watch for the per-object kind, as client-go's metadata client does."""


class NodeMetadataApi:
    """List and watch of v1 Nodes as metadata only, offered under the call CiliumNodeSync's
    list/watch loop makes (``list_cluster_custom_object``), so that loop - pagination,
    bookmarks, re-list on 410, timeouts, backoff - serves both resources. ``group``,
    ``version`` and ``plural`` are ignored: this object only ever reads /api/v1/nodes."""

    def __init__(self, api_client: kubernetes.client.ApiClient):
        self.api_client = api_client
        self._core = kubernetes.client.CoreV1Api(api_client)

    def list_cluster_custom_object(self, _group, _version, _plural, watch: bool = False,
                                   _preload_content: bool = True, **kwargs):
        accept = NODE_METADATA_WATCH if watch else NODE_METADATA_LIST
        # Always the raw response: the client's model classes would turn 10,000 items into
        # objects only to be read back as dicts.
        resp = self._core.list_node(watch=True if watch else None, _preload_content=False,
                                    _headers={"Accept": accept}, **kwargs)
        if not _preload_content:
            return resp
        try:
            return json.loads(resp.data)
        finally:
            resp.release_conn()


class NodeRoleSync(CiliumNodeSync):
    """Keeps the store's role labels equal to the v1 Nodes' (``Settings.role_source`` "node").

    The labels ``node-role.kubernetes.io/*`` on a Node are protected by the NodeRestriction
    admission plugin: a kubelet cannot set them, unlike a CiliumNode's labels, which every
    Cilium agent may write. Every label is read; the store keeps only the selector labels and
    the keys exemption policies name (``Store.set_role_label_keys``), so the steady stream of
    Node updates wakes nothing. Until its Node is known, a node is a
    worker. Reuses CiliumNodeSync's list/watch loop with a metadata-only request."""

    kind = "Node"
    noun = "Nodes"

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None,
                 **kwargs):
        # The base class's metrics describe the CiliumNode sync; this one counts its restarts
        # in a counter of its own.
        super().__init__(settings, store, None, **kwargs)
        self.role_metrics = metrics
        store.expect_node_labels()
        # Every label is read; the store keeps the role labels and the keys the exemption
        # policies' selectors name.
        store.set_role_label_keys(settings.control_plane_labels)

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return NodeMetadataApi(api_client)

    def _parse(self, obj: object):
        return parse_node_roles(obj, None)

    def _install(self, items: dict) -> None:
        self.store.replace_node_labels({name: r.labels for name, r in items.items()})

    def _upsert(self, item) -> None:
        self.store.set_node_labels(item.name, item.labels)

    def _remove(self, name: str) -> None:
        self.store.delete_node_labels(name)

    def _restart(self, cause: str) -> None:
        if self.role_metrics is not None:
            self.role_metrics.node_watch_restarts.labels(cause=cause).inc()


# --------------------------------------------------------------------------------------------
# EncryptionExemption policies


class ResourceMissing(KubernetesError):
    """404 on a whole resource: its CustomResourceDefinition is not installed."""

    cause = "crd-missing"


class ResourceApi:
    """A custom resource other than CiliumNodes, under the call CiliumNodeSync's loop makes
    (its group, version and plural arguments are replaced by this object's). A 404 on the
    resource (not on one object) becomes ResourceMissing."""

    def __init__(self, api_client: kubernetes.client.ApiClient, group: str, version: str,
                 plural: str):
        self.api_client = api_client
        self._api = kubernetes.client.CustomObjectsApi(api_client)
        self.resource = (group, version, plural)

    def list_cluster_custom_object(self, _group, _version, _plural, **kwargs):
        try:
            return self._api.list_cluster_custom_object(*self.resource, **kwargs)
        except ApiException as e:
            if e.status == 404 and not _status_details_name(e):
                group, version, plural = self.resource
                raise ResourceMissing(f"{_server(self)} has no {plural}.{group}/{version} "
                                      f"resource (the CRD is not installed): "
                                      f"{_status_message(e)}") from None
            raise


class ExemptionSync(CiliumNodeSync):
    """Keeps the store's EncryptionExemption policies equal to the cluster's, with
    CiliumNodeSync's loop (pagination, bookmarks, re-list on 410, stall detection, backoff).
    A missing CRD is logged, shown by nodecryptor_exemption_crd_missing and retried with
    backoff; the store's policies stay as they were (none at start: the built-in policy
    alone applies). The store is never held unsynced by this sync."""

    kind = "EncryptionExemption"
    noun = "EncryptionExemptions"

    def __init__(self, settings: Settings, store: Store, metrics: Metrics | None = None,
                 **kwargs):
        super().__init__(settings, store, None, **kwargs)
        self.exemption_metrics = metrics
        self.crd_missing = False

    def _make_api(self, api_client: kubernetes.client.ApiClient):
        return ResourceApi(api_client, exemptions.GROUP, exemptions.VERSION, exemptions.PLURAL)

    def _parse(self, obj: object):
        return exemptions.parse_exemption(obj)

    def _install(self, items: dict) -> None:
        self._set_missing(False)
        self.store.replace_exemptions(items.values())

    def _upsert(self, item) -> None:
        self.store.upsert_exemption(item)

    def _remove(self, name: str) -> None:
        self.store.delete_exemption(name)

    def _handle_event(self, line: str, rv, what: str):
        # A policy that turns malformed is rejected whole: it must stop applying, as a
        # re-list would drop it.
        try:
            event = json.loads(line)
            obj = event.get("object") if isinstance(event, dict) else None
            if event.get("type") in ("ADDED", "MODIFIED"):
                policy, _ = exemptions.parse_exemption(obj)
                name = _meta(obj).get("name")
                if policy is None and isinstance(name, str):
                    self.store.delete_exemption(name)
        except (ValueError, AttributeError):
            pass  # the base class reports it
        return super()._handle_event(line, rv, what)

    def _log_rejections(self, rejections: list[Rejection], version: str) -> None:
        # A malformed policy is rejected whole; counted with the claim rejections.
        for rej in rejections:
            log.warning("rejecting EncryptionExemption", extra=kv(
                policy=rej.obj, field=rej.field, value=rej.value, why=rej.why,
                resource_version=version))
        if self.exemption_metrics is not None:
            self.exemption_metrics.record_claim_rejections(rejections)

    def _restart(self, cause: str) -> None:
        if cause == ResourceMissing.cause:
            if not self.crd_missing:
                log.warning("the EncryptionExemption CRD is not installed; only the built-in "
                            "policy applies; retrying")
            self._set_missing(True)
        if self.exemption_metrics is not None:
            self.exemption_metrics.exemption_watch_restarts.labels(cause=cause).inc()

    def _set_missing(self, missing: bool) -> None:
        if self.crd_missing and not missing:
            log.info("the EncryptionExemption CRD is installed; policies apply")
        self.crd_missing = missing
        if self.exemption_metrics is not None:
            self.exemption_metrics.exemption_crd_missing.set(1 if missing else 0)


def _abort(resp) -> None:
    """Shut the socket under a streaming response so a blocked read returns now."""
    conn = getattr(resp, "connection", None)
    sock = getattr(conn, "sock", None)
    if sock is not None:
        try:
            sock.shutdown(2)  # SHUT_RDWR
        except OSError:
            pass  # already closed


# --------------------------------------------------------------------------------------------
# The NodeEncryptionReady condition (nodecryptor.policy.peerhealth decides it; this writes it)

STRATEGIC_MERGE = "application/strategic-merge-patch+json"
EVENT_NAMESPACE = "default"
"""Where Events about Nodes live (a Node is cluster-scoped; the kubelet uses "default" too)."""


def condition_patch(condition_type: str, status: str, reason: str, message: str,
                    heartbeat: str, transition: str) -> dict:
    """A strategic merge patch of one entry of ``status.conditions``: the API server merges the
    list by ``type``, so the kubelet's and other controllers' conditions are left alone and no
    resourceVersion (hence no read-modify-write race) is involved."""
    return {"status": {"conditions": [{
        "type": condition_type, "status": status, "reason": reason, "message": message[:1024],
        "lastHeartbeatTime": heartbeat, "lastTransitionTime": transition}]}}


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

    def __init__(self, settings: Settings, condition_type: str, metrics: Metrics | None = None,
                 *, heartbeat_seconds: float = 1800.0, jitter: float = 0.1,
                 min_interval: float = 10.0, event_interval: float = 60.0,
                 backoff: Backoff = Backoff(initial=1.0, maximum=60.0),
                 rng: random.Random | None = None, wall=time.time, clock=time.monotonic):
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
                log.warning("node condition write failed; will retry",
                            extra=kv(condition=self.type, error=str(e),
                                     retry_in=f"{delay:.1f}s", failures=self.failures))
            except Exception as e:  # a bug must not end the writer silently
                self.failures += 1
                delay = self.backoff.delay(self.failures, self._rng)
                self._not_before = self._clock() + delay
                log.exception("node condition writer failed unexpectedly",
                              extra=kv(error=f"{type(e).__name__}: {e}"))
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
            resp = fn(*args, **kwargs, _preload_content=False,
                      _request_timeout=(self.settings.request_timeout_seconds,) * 2)
            try:
                return json.loads(resp.data or b"null")
            finally:
                resp.release_conn()
        except ApiException as e:
            if e.status == 409:
                raise ApiUnavailable(f"{what}: conflict (409): {_status_message(e)}",
                                     cause="conflict") from e
            raise translate_error(e, core_host(fn), what) from e
        except _TRANSPORT_ERRORS as e:
            raise translate_error(e, core_host(fn), what) from e

    def _read_existing(self, core) -> None:
        """Before the first write: the Node's uid (for Events) and the condition already
        there (a restarted agent keeps its lastTransitionTime when the status is unchanged)."""
        node = self._call(f"reading node {self.settings.node_name}", core.read_node,
                          self.settings.node_name)
        if not isinstance(node, dict):
            raise ApiUnavailable(f"reading node {self.settings.node_name}: not an object")
        self._node_uid = (node.get("metadata") or {}).get("uid")
        for c in (node.get("status") or {}).get("conditions") or []:
            if isinstance(c, dict) and c.get("type") == self.type:
                self._transition = f"{c.get('status')}|{c.get('lastTransitionTime')}"
                # What a previous agent wrote counts as written: a restart with an unchanged
                # (status, reason) is no transition (no write beyond the start one, no Event).
                self.written = Condition(str(c.get("status")), str(c.get("reason")),
                                         str(c.get("message") or ""))
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
        body = condition_patch(self.type, cond.status, cond.reason, cond.message,
                               _rfc3339(wall), transition)
        self._call(f"patching node {self.settings.node_name} status", core.patch_node_status,
                   self.settings.node_name, body, _content_type=STRATEGIC_MERGE)
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
            log.info("node condition written", extra=kv(condition=self.type,
                                                        status=cond.status, reason=cond.reason,
                                                        message=cond.message))
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
        body = {"apiVersion": "v1", "kind": "Event",
                "metadata": {"generateName": f"{node}.", "namespace": EVENT_NAMESPACE},
                "involvedObject": {"apiVersion": "v1", "kind": "Node", "name": node,
                                   "uid": self._node_uid or node},
                "reason": cond.reason, "message": cond.message[:1024],
                "type": "Normal" if cond.status == "True" else "Warning",
                "source": {"component": "nodecryptor", "host": node},
                "reportingComponent": "nodecryptor", "reportingInstance": node,
                "firstTimestamp": stamp, "lastTimestamp": stamp, "count": 1}
        try:
            self._call("creating a node event", core.create_namespaced_event, EVENT_NAMESPACE,
                       body)
            self.events += 1
        except KubernetesError as e:
            log.warning("node event not created", extra=kv(reason=cond.reason, error=str(e)))


def core_host(fn) -> str:
    owner = getattr(fn, "__self__", None)
    try:
        return owner.api_client.configuration.host
    except AttributeError:
        return "the API server"


def read_node_conditions(settings: Settings, condition_type: str) -> list[dict]:
    """Every Node's name and its ``condition_type`` condition (None when absent), for
    ``nodecryptor status --cluster``. Raises KubernetesError."""
    api_client = load_client(settings)
    core = kubernetes.client.CoreV1Api(api_client)
    out: list[dict] = []
    token = None
    try:
        while True:
            try:
                resp = core.list_node(limit=settings.list_page_size, _continue=token,
                                      _preload_content=False,
                                      _request_timeout=(settings.request_timeout_seconds,) * 2)
                try:
                    page = json.loads(resp.data)
                finally:
                    resp.release_conn()
            except ApiException as e:
                raise translate_error(e, api_client.configuration.host, "listing Nodes") from e
            except _TRANSPORT_ERRORS as e:
                raise translate_error(e, api_client.configuration.host, "listing Nodes") from e
            for node in page.get("items") or []:
                name = (node.get("metadata") or {}).get("name")
                found = None
                for c in (node.get("status") or {}).get("conditions") or []:
                    if isinstance(c, dict) and c.get("type") == condition_type:
                        found = {k: c.get(k) for k in ("status", "reason", "message",
                                                       "lastHeartbeatTime",
                                                       "lastTransitionTime")}
                out.append({"node": name, "condition": found})
            token = (page.get("metadata") or {}).get("continue") or None
            if token is None:
                return sorted(out, key=lambda n: str(n["node"]))
    finally:
        api_client.close()
