"""EncryptionExemption policies: parsing, label selectors and evaluation. Pure, no I/O.

An ``EncryptionExemption`` (``encryptionexemptions.nodecryptor.io/v1alpha1``, cluster-scoped)
names the nodes that serve some ports (``spec.nodeSelector``), optionally the nodes that use
them as clients (``spec.clientNodeSelector``, default all), and the ports in NetworkPolicy's
shape. It generalises the control-plane bootstrap exemption, which stays as the built-in
policy ``control-plane-bootstrap`` (``--control-plane-exempt-ports`` on the nodes carrying a
``--control-plane-label``).

Policies are written by cluster administrators, but are still checked once here: a malformed
policy is rejected as a whole (``parse_exemption``), with a reason, and the others still
apply. Selectors are evaluated against the trusted labels (``trusted_labels``): the ones the
control-plane role is read from (``Settings.role_source``). Policies only ever add exemptions.

Limits (``MAX_POLICIES``, ``MAX_RANGES_PER_POLICY``, ``MAX_RANGES``) bound what the datapath
scans per packet; a policy beyond them is rejected as a whole (the ones that fit, in order:
built-in first, then by name, still apply).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from nodecryptor.core.model import Rejection
from nodecryptor.core.ports import PolicyRange, PortRange, merge_ranges
from nodecryptor.core.settings import RoleSource, Settings

KIND = "EncryptionExemption"
GROUP = "nodecryptor.io"
VERSION = "v1alpha1"
PLURAL = "encryptionexemptions"
BUILTIN_NAME = "control-plane-bootstrap"

MAX_POLICIES = 32
"""Policies in force at once, the built-in one included: each gets one bit of a 32-bit mask
on the datapath's destination entries."""
MAX_RANGES_PER_POLICY = 16
"""Port ranges of one policy (after merging overlapping and adjacent ranges)."""
MAX_RANGES = 64
"""Port ranges of all policies together: the datapath scans this many at most per packet."""

OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
MAX_NAME = 253

REASON_MALFORMED = "malformed"
REASON_LIMIT = "exemption-limit"


class SelectorError(ValueError):
    def __init__(self, field_: str, value: object, why: str):
        super().__init__(why)
        self.field = field_
        self.value = value
        self.why = why


@dataclass(frozen=True)
class Requirement:
    key: str
    operator: str  # one of OPERATORS
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        # As metav1.LabelSelector defines them: NotIn and DoesNotExist match an absent key.
        present = self.key in labels
        if self.operator == "In":
            return present and labels[self.key] in self.values
        if self.operator == "NotIn":
            return not present or labels[self.key] not in self.values
        if self.operator == "Exists":
            return present
        return not present  # DoesNotExist

    def to_json(self) -> dict:
        out: dict = {"key": self.key, "operator": self.operator}
        if self.operator in ("In", "NotIn"):
            out["values"] = list(self.values)
        return out


@dataclass(frozen=True)
class LabelSelector:
    """A metav1.LabelSelector: every requirement must hold (matchLabels are ``In`` with one
    value). The empty selector matches every node."""

    requirements: tuple[Requirement, ...] = ()
    any_key: tuple[str, ...] = ()
    """Built-in policy only: matches when any of these keys is present (the control-plane
    labels, which a LabelSelector cannot OR)."""

    def matches(self, labels: Mapping[str, str]) -> bool:
        if self.any_key and not any(k in labels for k in self.any_key):
            return False
        return all(r.matches(labels) for r in self.requirements)

    def keys(self) -> set[str]:
        return {r.key for r in self.requirements} | set(self.any_key)


@dataclass(frozen=True)
class ExemptionPolicy:
    name: str
    node_selector: LabelSelector
    ports: tuple[PortRange, ...]
    client_selector: LabelSelector | None = None
    """None: every node is a client."""
    builtin: bool = False

    def label_keys(self) -> set[str]:
        keys = self.node_selector.keys()
        if self.client_selector is not None:
            keys |= self.client_selector.keys()
        return keys


def rejection(
    name: str, field_: str, value: object, why: str, reason: str = REASON_MALFORMED
) -> Rejection:
    text = value if isinstance(value, str) else repr(value)
    return Rejection(name, field_, text[:120], why, reason, kind=KIND)


# --------------------------------------------------------------------------------------------
# Parsing


def _label_value_ok(text: object) -> bool:
    return isinstance(text, str) and len(text) <= 63


def _label_key_ok(text: object) -> bool:
    return isinstance(text, str) and 0 < len(text) <= 316 and not any(c.isspace() for c in text)


def parse_selector(obj: object, where: str) -> LabelSelector:
    """A metav1.LabelSelector. Raises SelectorError; a null selector is the caller's call."""
    if not isinstance(obj, dict):
        raise SelectorError(where, obj, "not a label selector (a mapping)")
    unknown = set(obj) - {"matchLabels", "matchExpressions"}
    if unknown:
        raise SelectorError(
            where, sorted(unknown), "unknown field(s) " + ", ".join(sorted(unknown))
        )
    reqs: list[Requirement] = []
    labels = obj.get("matchLabels") or {}
    if not isinstance(labels, dict):
        raise SelectorError(f"{where}.matchLabels", labels, "not a map")
    for key, value in sorted(labels.items(), key=lambda kv: str(kv[0])):
        if not _label_key_ok(key):
            raise SelectorError(f"{where}.matchLabels", key, "not a label key")
        if not _label_value_ok(value):
            raise SelectorError(f"{where}.matchLabels[{key}]", value, "not a label value")
        reqs.append(Requirement(key, "In", (value,)))
    exprs = obj.get("matchExpressions") or []
    if not isinstance(exprs, list):
        raise SelectorError(f"{where}.matchExpressions", exprs, "not a list")
    for i, expr in enumerate(exprs):
        at = f"{where}.matchExpressions[{i}]"
        if not isinstance(expr, dict):
            raise SelectorError(at, expr, "not a mapping")
        key, op, values = expr.get("key"), expr.get("operator"), expr.get("values")
        if not _label_key_ok(key):
            raise SelectorError(f"{at}.key", key, "missing or not a label key")
        if op not in OPERATORS:
            raise SelectorError(
                f"{at}.operator", op, "unknown operator (In, NotIn, Exists, DoesNotExist)"
            )
        if op in ("In", "NotIn"):
            if not isinstance(values, list) or not values:
                raise SelectorError(f"{at}.values", values, f"{op} needs a non-empty list")
            if not all(_label_value_ok(v) for v in values):
                raise SelectorError(f"{at}.values", values, "not label values")
            reqs.append(Requirement(key, op, tuple(sorted(set(values)))))
        else:
            if values:
                raise SelectorError(f"{at}.values", values, f"{op} takes no values")
            reqs.append(Requirement(key, op))
    return LabelSelector(tuple(reqs))


def _parse_ports(raw: object) -> tuple[PortRange, ...]:
    if not isinstance(raw, list) or not raw:
        raise SelectorError("spec.ports", raw, "missing or not a non-empty list")
    ranges = []
    for i, entry in enumerate(raw):
        at = f"spec.ports[{i}]"
        if not isinstance(entry, dict):
            raise SelectorError(at, entry, "not a mapping")
        unknown = set(entry) - {"protocol", "port", "endPort"}
        if unknown:
            raise SelectorError(
                at, sorted(unknown), "unknown field(s) " + ", ".join(sorted(unknown))
            )
        proto = entry.get("protocol", "TCP")
        if not isinstance(proto, str) or proto not in ("TCP", "UDP", "SCTP"):
            raise SelectorError(f"{at}.protocol", proto, "unknown protocol (TCP, UDP or SCTP)")
        port = entry.get("port")
        # Named ports (strings) mean a pod's container port: nodes have none.
        if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
            raise SelectorError(f"{at}.port", port, "not a port number 1-65535")
        end = entry.get("endPort", port)
        if isinstance(end, bool) or not isinstance(end, int) or not 1 <= end <= 65535:
            raise SelectorError(f"{at}.endPort", end, "not a port number 1-65535")
        if end < port:
            raise SelectorError(f"{at}.endPort", end, f"below port {port}")
        ranges.append(PortRange(proto.lower(), port, end))
    merged = merge_ranges(ranges)
    if len(merged) > MAX_RANGES_PER_POLICY:
        raise SelectorError(
            "spec.ports",
            len(merged),
            f"{len(merged)} port ranges after merging; "
            f"a policy may have at most {MAX_RANGES_PER_POLICY}",
        )
    return merged


def parse_exemption(obj: object) -> tuple[ExemptionPolicy | None, list[Rejection]]:
    """(policy, []) or (None, [the rejection]) - a malformed policy is rejected whole."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    name = meta.get("name") if isinstance(meta, dict) else None
    if not isinstance(name, str) or not name or len(name) > MAX_NAME:
        return None, [rejection("?", "metadata.name", name, "missing or not a valid name")]
    if name == BUILTIN_NAME:
        return None, [
            rejection(
                name,
                "metadata.name",
                name,
                "reserved for the built-in policy (--control-plane-exempt-ports)",
            )
        ]
    spec = obj.get("spec")
    try:
        if not isinstance(spec, dict):
            raise SelectorError("spec", spec, "missing or not a mapping")
        if spec.get("nodeSelector") is None:
            raise SelectorError("spec.nodeSelector", None, "required (use {} for every node)")
        nodes = parse_selector(spec["nodeSelector"], "spec.nodeSelector")
        clients = None
        if spec.get("clientNodeSelector") is not None:
            clients = parse_selector(spec["clientNodeSelector"], "spec.clientNodeSelector")
        ports = _parse_ports(spec.get("ports"))
    except SelectorError as e:
        return None, [rejection(name, e.field, e.value, e.why)]
    return ExemptionPolicy(name, nodes, ports, clients), []


def builtin_policy(settings: Settings) -> ExemptionPolicy | None:
    """``control-plane-bootstrap``: the flag's ports on nodes carrying a control-plane label,
    for every client. None when the port list is empty (turned off)."""
    if not settings.exempt_ports or not settings.control_plane_labels:
        return None
    return ExemptionPolicy(
        BUILTIN_NAME,
        LabelSelector(any_key=tuple(settings.control_plane_labels)),
        tuple(settings.exempt_ports),
        None,
        builtin=True,
    )


def within_limits(
    policies: Iterable[ExemptionPolicy],
) -> tuple[tuple[ExemptionPolicy, ...], tuple[Rejection, ...]]:
    """The policies in force, in order (built-in first, then by name), and a rejection for
    each beyond ``MAX_POLICIES`` or ``MAX_RANGES``."""
    ordered = sorted(policies, key=lambda p: (not p.builtin, p.name))
    kept: list[ExemptionPolicy] = []
    rejected: list[Rejection] = []
    ranges = 0
    for pol in ordered:
        if len(kept) >= MAX_POLICIES:
            rejected.append(
                rejection(
                    pol.name,
                    "metadata.name",
                    pol.name,
                    f"more than {MAX_POLICIES} policies (the built-in one "
                    f"included); policies apply in name order",
                    REASON_LIMIT,
                )
            )
            continue
        if ranges + len(pol.ports) > MAX_RANGES:
            rejected.append(
                rejection(
                    pol.name,
                    "spec.ports",
                    len(pol.ports),
                    f"all policies together would have more than {MAX_RANGES} "
                    f"port ranges; policies apply in name order",
                    REASON_LIMIT,
                )
            )
            continue
        kept.append(pol)
        ranges += len(pol.ports)
    return tuple(kept), tuple(rejected)


# --------------------------------------------------------------------------------------------
# Evaluation


def trusted_labels(node, role_source: RoleSource) -> dict[str, str]:
    """The labels selectors (and the control-plane role) are evaluated against: the v1
    Node's by default (empty until that Node is known), the CiliumNode's with
    ``--role-source ciliumnode``."""
    if role_source == RoleSource.CILIUMNODE:
        return node.label_map()
    return dict(node.node_labels or ())


@dataclass(frozen=True)
class Exemptions:
    """What the policies mean for one local node."""

    policies: tuple[ExemptionPolicy, ...] = ()
    """In force, in bit order (index i is the datapath's policy bit i)."""
    to_node: Mapping[str, tuple[PolicyRange, ...]] = field(default_factory=dict)
    """Remote node name -> ranges exempt towards its node addresses (local node a client)."""
    serves: tuple[PolicyRange, ...] = ()
    """Ranges the local node serves (replies from its node addresses stay in the clear)."""
    clients: Mapping[str, frozenset[str]] = field(default_factory=dict)
    """Remote node name -> names of the policies served here it is a client of."""
    rejected: tuple[Rejection, ...] = ()

    def index(self, name: str) -> int:
        return next(i for i, p in enumerate(self.policies) if p.name == name)


def _ranges(pol: ExemptionPolicy) -> tuple[PolicyRange, ...]:
    return tuple(PolicyRange(r.protocol, r.first, r.last, pol.name) for r in pol.ports)


def evaluate(
    policies: Iterable[ExemptionPolicy], snapshot: Mapping, local_name: str, settings: Settings
) -> Exemptions:
    """Evaluate ``policies`` (the built-in one is added from ``settings``) for ``local_name``.
    A node without trusted labels yet matches only selectors that match the empty label set."""
    builtin = builtin_policy(settings)
    pols = [p for p in policies if p.name != BUILTIN_NAME]
    if builtin is not None:
        pols.append(builtin)
    kept, rejected = within_limits(pols)
    labels = {name: trusted_labels(node, settings.role_source) for name, node in snapshot.items()}
    local_labels = labels.get(local_name, {})
    local_known = local_name in snapshot

    def client(pol: ExemptionPolicy, lab: Mapping[str, str]) -> bool:
        return pol.client_selector is None or pol.client_selector.matches(lab)

    to_node: dict[str, tuple[PolicyRange, ...]] = {}
    clients: dict[str, frozenset[str]] = {}
    # A local node without a CiliumNode serves nothing (it is a worker, as for the role), but
    # it is still a client: its traffic to serving nodes keeps the exemption it had.
    serving = [p for p in kept if local_known and p.node_selector.matches(local_labels)]
    users = [p for p in kept if client(p, local_labels)]
    for name in sorted(snapshot):
        if name == local_name:
            continue
        lab = labels[name]
        ranges = [r for p in users if p.node_selector.matches(lab) for r in _ranges(p)]
        if ranges:
            to_node[name] = tuple(
                sorted(ranges, key=lambda r: (r.protocol, r.first, r.last, r.policy))
            )
        served = frozenset(p.name for p in serving if client(p, lab))
        if served:
            clients[name] = served
    serves = tuple(
        sorted(
            (r for p in serving for r in _ranges(p)),
            key=lambda r: (r.protocol, r.first, r.last, r.policy),
        )
    )
    return Exemptions(kept, to_node, serves, clients, rejected)


def policy_for(ranges: Iterable[PolicyRange], protocol: str, port: int) -> str | None:
    """The first policy (in the given order) whose range holds ``port``: explain's answer."""
    for r in ranges:
        if r.protocol == protocol and port in r:
            return r.policy
    return None
