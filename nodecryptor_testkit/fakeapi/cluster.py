"""The fake API server's state: CiliumNodes (and v1 Nodes), the global resourceVersion, the
bounded event
history and the snapshots behind continue tokens. No HTTP here."""

from __future__ import annotations

import base64
import copy
import datetime
import json
import threading
import uuid
from collections import deque
from dataclasses import dataclass

from .objects import API_VERSION, KIND, merge_patch, status_object


@dataclass(frozen=True)
class Resource:
    """What a FakeCluster stores: the kind, its apiVersion and its name in error messages."""

    kind: str
    api_version: str
    qualified: str  # "ciliumnodes.cilium.io", "nodes"


CILIUMNODE_RESOURCE = Resource(KIND, API_VERSION, "ciliumnodes.cilium.io")
NODE_RESOURCE = Resource("Node", "v1", "nodes")
EXEMPTION_RESOURCE = Resource(
    "EncryptionExemption", "nodecryptor.io/v1alpha1", "encryptionexemptions.nodecryptor.io"
)
CONFIGMAP_RESOURCE = Resource("ConfigMap", "v1", "configmaps")
POD_IP_POOL_RESOURCE = Resource(
    "CiliumPodIPPool", "cilium.io/v2alpha1", "ciliumpodippools.cilium.io"
)


class _Clock:
    """The global resourceVersion: etcd's revision, shared by every resource."""

    def __init__(self, rv: int):
        self.rv = rv


MAX_SNAPSHOTS = 64
"""Paginated lists in progress that the server remembers."""


class ApiError(Exception):
    """An error the server answers with a Status object."""

    def __init__(self, code: int, reason: str, message: str, name: str | None = None):
        super().__init__(message)
        self.status = status_object(code, reason, message, name)
        self.code = code


@dataclass
class _Snapshot:
    """The frozen result of a paginated list; continue tokens point into it."""

    rv: int
    items: list[dict]


class FakeCluster:
    """Objects of one resource (CiliumNodes unless told), resourceVersions and the event
    history, independent of HTTP. ``shared_with``: another FakeCluster whose resourceVersion
    counter, lock and request log this one shares, as resources share etcd's revision."""

    def __init__(
        self,
        history_limit: int = 1000,
        initial_rv: int = 0,
        resource: Resource = CILIUMNODE_RESOURCE,
        shared_with: "FakeCluster | None" = None,
    ):
        self.resource = resource
        self._clock = shared_with._clock if shared_with is not None else _Clock(initial_rv)
        self.cond = shared_with.cond if shared_with is not None else threading.Condition()
        initial_rv = self._clock.rv
        """A real apiserver's resourceVersions come from etcd and never go backwards, also
        across apiserver restarts. A standalone fake starts from a time-based value so a
        restarted fake answers a client's older resourceVersion with 410, as a real one does
        once the history is compacted."""
        self.objects: dict[str, dict] = {}
        self.history: deque[tuple[int, str, dict]] = deque(maxlen=history_limit)
        self.oldest_watchable_rv = initial_rv
        """A watch may start from any rv >= this; older ones were compacted (410)."""
        self.snapshots: dict[str, _Snapshot] = {}
        self.expire_next_continues = 0
        """Fault: this many continue tokens are answered with 410 Expired."""
        self.requests: deque[tuple[str, str]] = (
            shared_with.requests if shared_with is not None else deque(maxlen=10000)
        )
        """(method, path with query) of recent API requests, for tests to inspect."""

    @property
    def rv(self) -> int:
        return self._clock.rv

    @rv.setter
    def rv(self, value: int) -> None:
        self._clock.rv = value

    # Writes. Each one bumps the global resourceVersion and records an event.

    def _record(self, kind: str, obj: dict) -> None:
        if len(self.history) == self.history.maxlen:
            # The oldest retained event falls out: watching from before it is impossible.
            self.oldest_watchable_rv = self.history[0][0]
        # Stored objects are never mutated after this point (writes replace them), so the
        # history can share them with ``objects``.
        self.history.append((self.rv, kind, obj))
        self.cond.notify_all()

    def _stamp(self, obj: dict, old: dict | None) -> dict:
        self.rv += 1
        meta = obj.setdefault("metadata", {})
        meta["resourceVersion"] = str(self.rv)
        if old is not None:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
        else:
            meta.setdefault("uid", str(uuid.uuid4()))
            now = datetime.datetime.now(datetime.timezone.utc)
            meta.setdefault("creationTimestamp", now.strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta.setdefault("generation", 1)
        return obj

    def _not_found(self, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{self.resource.qualified} "{name}" not found', name)

    @staticmethod
    def _name_of(obj: object) -> str:
        meta = obj.get("metadata") if isinstance(obj, dict) else None
        name = meta.get("name") if isinstance(meta, dict) else None
        if not isinstance(name, str) or not name:
            raise ApiError(
                422,
                "Invalid",
                "the object is invalid: metadata.name: Required value: name is required",
            )
        return name

    def create(self, obj: dict) -> dict:
        with self.cond:
            name = self._name_of(obj)
            if name in self.objects:
                raise ApiError(
                    409, "AlreadyExists", f'{self.resource.qualified} "{name}" already exists', name
                )
            obj = copy.deepcopy(obj)
            obj.setdefault("apiVersion", self.resource.api_version)
            obj.setdefault("kind", self.resource.kind)
            obj["metadata"].pop("resourceVersion", None)
            self.objects[name] = self._stamp(obj, None)
            self._record("ADDED", obj)
            return copy.deepcopy(obj)

    def replace(self, name: str, obj: dict, check_rv: bool = True) -> dict:
        """PUT semantics: the whole object; a stale resourceVersion is a 409 conflict."""
        with self.cond:
            if self._name_of(obj) != name:
                raise ApiError(
                    400,
                    "BadRequest",
                    "the name of the object does not match the name on the URL",
                    name,
                )
            old = self.objects.get(name)
            if old is None:
                raise self._not_found(name)
            given = obj.get("metadata", {}).get("resourceVersion")
            if check_rv and given and given != old["metadata"]["resourceVersion"]:
                raise ApiError(
                    409,
                    "Conflict",
                    f"Operation cannot be fulfilled on "
                    f'{self.resource.qualified} "{name}": the object has been modified; '
                    f"please apply your changes to the latest version and try again",
                    name,
                )
            return self._write(name, copy.deepcopy(obj), old)

    def _write(self, name: str, obj: dict, old: dict) -> dict:
        obj["apiVersion"], obj["kind"] = self.resource.api_version, self.resource.kind
        unchanged = {k: v for k, v in obj.items() if k != "metadata"} == {
            k: v for k, v in old.items() if k != "metadata"
        }
        meta_new = {k: v for k, v in obj["metadata"].items() if k != "resourceVersion"}
        meta_old = {k: v for k, v in old["metadata"].items() if k != "resourceVersion"}
        if unchanged and meta_new == meta_old:
            # Like the real server, a write that changes nothing does not bump the version.
            return copy.deepcopy(old)
        self.objects[name] = self._stamp(obj, old)
        self._record("MODIFIED", obj)
        return copy.deepcopy(obj)

    def patch(self, name: str, patch: dict) -> dict:
        with self.cond:
            old = self.objects.get(name)
            if old is None:
                raise self._not_found(name)
            if not isinstance(patch, dict):
                raise ApiError(400, "BadRequest", "a merge patch must be a JSON object", name)
            # merge_patch shares untouched subtrees with ``old``; stored objects must stay
            # immutable, so the result is copied before it is stamped.
            merged = copy.deepcopy(merge_patch(old, patch))
            if merged.get("metadata", {}).get("name") != name:
                raise ApiError(422, "Invalid", "metadata.name cannot be changed by a patch", name)
            return self._write(name, merged, old)

    def delete(self, name: str) -> dict:
        with self.cond:
            old = self.objects.pop(name, None)
            if old is None:
                raise self._not_found(name)
            self.rv += 1
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(self.rv)
            self._record("DELETED", gone)
            return gone

    def apply(self, obj: dict) -> dict:
        """Create or replace, for tests and the lab (no conflict check)."""
        name = self._name_of(obj)
        with self.cond:
            if name in self.objects:
                return self.replace(name, obj, check_rv=False)
            return self.create(obj)

    def advance(self, count: int = 1) -> None:
        """Writes to other resources: the global resourceVersion moves on (as it does in
        etcd for every write in the cluster) without any CiliumNode event."""
        with self.cond:
            self.rv += count
            self.cond.notify_all()

    def compact(self) -> None:
        """Drop the whole history and every list snapshot: watches from any earlier
        resourceVersion and all outstanding continue tokens now get 410."""
        with self.cond:
            self.history.clear()
            self.oldest_watchable_rv = self.rv
            self.snapshots.clear()

    # Reads.

    def get(self, name: str) -> dict:
        with self.cond:
            obj = self.objects.get(name)
            if obj is None:
                raise self._not_found(name)
            return copy.deepcopy(obj)

    def list_page(self, limit: int, token: str) -> dict:
        with self.cond:
            if token:
                snap_id, start = self._decode_token(token)
                snap = self.snapshots.get(snap_id)
                if self.expire_next_continues > 0:
                    self.expire_next_continues -= 1
                    snap = None
                if snap is None or snap.rv < self.oldest_watchable_rv:
                    raise ApiError(
                        410,
                        "Expired",
                        "The provided continue parameter is too old "
                        "to display a consistent list result. You "
                        "can start a new list without the continue "
                        "parameter.",
                    )
            else:
                snap_id, start = uuid.uuid4().hex, 0
                snap = _Snapshot(self.rv, [self.objects[n] for n in sorted(self.objects)])
            end = len(snap.items) if limit <= 0 else min(len(snap.items), start + limit)
            # Objects are replaced, never mutated in place, so sharing them is safe; the
            # encoder serialises them outside the lock.
            items = snap.items[start:end]
            meta: dict = {"resourceVersion": str(snap.rv)}
            if end < len(snap.items):
                self.snapshots[snap_id] = snap
                while len(self.snapshots) > MAX_SNAPSHOTS:
                    # Abandoned lists: forget the oldest (its token then gets 410).
                    del self.snapshots[next(iter(self.snapshots))]
                meta["continue"] = self._encode_token(snap_id, end)
                meta["remainingItemCount"] = len(snap.items) - end
            else:
                self.snapshots.pop(snap_id, None)
            return {
                "apiVersion": self.resource.api_version,
                "kind": f"{self.resource.kind}List",
                "metadata": meta,
                "items": items,
            }

    @staticmethod
    def _encode_token(snap_id: str, start: int) -> str:
        raw = json.dumps({"s": snap_id, "i": start}).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @staticmethod
    def _decode_token(token: str) -> tuple[str, int]:
        try:
            raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
            data = json.loads(raw)
            return str(data["s"]), int(data["i"])
        except (ValueError, KeyError, TypeError):
            raise ApiError(400, "BadRequest", f"invalid continue token {token!r}") from None

    def bookmark(self) -> dict:
        return {
            "type": "BOOKMARK",
            "object": {
                "apiVersion": self.resource.api_version,
                "kind": self.resource.kind,
                "metadata": {"resourceVersion": str(self.rv)},
            },
        }
