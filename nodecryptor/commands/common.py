"""Options shared by several commands and their translation into Settings."""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import sys

from nodecryptor.core.errors import SettingsError
from nodecryptor.observe.httpserver import binds_overlap, parse_bind
from nodecryptor.core.log import LEVELS
from nodecryptor.core.ports import PortSpecError, parse_port_spec
from nodecryptor.core.settings import (
    DEFAULT_EXEMPT_PORTS,
    MAX_EXEMPT_PORT_RANGES,
    DatapathMode,
    FailMode,
    IngressEnforcement,
    RoleSource,
    Settings,
    require_node_name,
)

# Every default below is read from Settings, where it is decided: the flags, the agent and the
# tests cannot disagree on one.


def parse_bool(text: str) -> bool:
    """Go's flag package spelling of booleans (-noop-route, -noop-route=true)."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def add_bpffs(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--bpffs",
        default=Settings.bpffs,
        metavar="DIR",
        help="bpffs mount; pins live under DIR/nodecryptor/ (default: %(default)s)",
    )


def add_wg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--wg-interface",
        default=Settings.wg_interface,
        metavar="IFNAME",
        help="Cilium's WireGuard device (default: %(default)s)",
    )


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-format",
        choices=("text", "json"),
        default="text",
        help="log line format (default: %(default)s)",
    )
    p.add_argument(
        "--log-level",
        choices=LEVELS,
        default="info",
        help="minimum level logged (default: %(default)s)",
    )


def add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kubeconfig",
        default=None,
        metavar="PATH",
        help="kubeconfig file; default: in-cluster service account",
    )
    p.add_argument(
        "--node-name",
        default=None,
        metavar="NAME",
        help="local node (its CiliumNode); default: $NODE_NAME",
    )
    p.add_argument(
        "--control-plane-exempt-ports",
        default=DEFAULT_EXEMPT_PORTS,
        metavar="SPEC",
        help="ports left in the clear to/from control-plane nodes: comma-separated "
        "PORT or FIRST-LAST, TCP unless prefixed udp/ or sctp/ "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--control-plane-label",
        action="append",
        default=None,
        metavar="LABEL",
        help="label whose presence marks a control-plane node (repeatable; default: "
        "node-role.kubernetes.io/control-plane and node-role.kubernetes.io/master)",
    )
    p.add_argument(
        "--address-types",
        default=",".join(Settings.address_types),
        metavar="TYPES",
        help="comma-separated CiliumNode address types treated as node addresses "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--role-source",
        default=RoleSource.NODE.value,
        metavar="SOURCE",
        help="where control-plane labels are read: node (the v1 Node objects, "
        "protected by NodeRestriction) or ciliumnode (writable by every Cilium "
        "agent; only without NodeRestriction) (default: %(default)s)",
    )
    p.add_argument(
        "--cluster-pod-cidrs",
        default=None,
        metavar="CIDRS",
        help="comma-separated pod ranges of the cluster; pod CIDRs outside them are "
        "rejected (default: read from Cilium's cilium-config ConfigMap and "
        "CiliumPodIPPools)",
    )
    p.add_argument(
        "--cilium-namespace",
        default=Settings.cilium_namespace,
        metavar="NAMESPACE",
        help="namespace of Cilium's cilium-config ConfigMap (default: %(default)s)",
    )
    p.add_argument(
        "--pod-cidr-min-prefix-v4",
        default=str(Settings.pod_cidr_min_prefix_v4),
        metavar="LEN",
        help="shortest prefix length accepted for an IPv4 pod CIDR (default: %(default)s)",
    )
    p.add_argument(
        "--pod-cidr-min-prefix-v6",
        default=str(Settings.pod_cidr_min_prefix_v6),
        metavar="LEN",
        help="shortest prefix length accepted for an IPv6 pod CIDR (default: %(default)s)",
    )


def add_run_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run-dir",
        default=Settings.run_dir,
        metavar="DIR",
        help="where the agent records which datapath it chose and why (default: %(default)s)",
    )


def add_datapath(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--datapath",
        choices=[m.value for m in DatapathMode],
        default=DatapathMode.AUTO.value,
        help="auto: BPF when it compiles, loads and attaches, else ip rules; "
        "bpf: fail instead of falling back (default: %(default)s)",
    )


def add_fail_mode(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--fail-mode",
        choices=[m.value for m in FailMode],
        default=FailMode.CLOSED.value,
        help="closed: drop cluster traffic that cannot be encrypted; open: let it "
        "out in the clear (default: %(default)s)",
    )


def add_ingress_enforcement(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--ingress-enforcement",
        choices=[m.value for m in IngressEnforcement],
        default=IngressEnforcement.AUDIT.value,
        help="clear text arriving from cluster peers: off: pass; audit: pass and "
        "count (status --leaks); enforce: drop and count. Roll out with audit "
        "everywhere, read the leak meter, then enforce (default: %(default)s)",
    )


HEALTH_FLAG = "--health-probe-bind-address"
METRICS_FLAG = "--metrics-server-bind-address"

# RFC 1123 subdomain, as Kubernetes requires of node names.
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
# A label key: optional DNS-subdomain prefix and "/", then a name of up to 63 characters.
_LABEL_NAME = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?")
_ADDRESS_TYPE = re.compile(r"[A-Za-z][A-Za-z0-9]*")


def _bind(flag: str, value: str) -> str:
    try:
        _host, port = parse_bind(value)
    except ValueError as e:
        raise SettingsError(flag, value, f"expected [HOST]:PORT: {e}") from None
    if port == 0:
        raise SettingsError(flag, value, "port 0 would listen on a random port no probe finds")
    return value


def _seconds(flag: str, value: str, low: float, high: float) -> float:
    # ASCII decimal only: float() would also take "1e2", "inf", "nan" and other scripts' digits.
    if not re.fullmatch(r"[0-9]+(\.[0-9]+)?", value):
        raise SettingsError(flag, value, "not a number of seconds")
    seconds = float(value)
    if not low <= seconds <= high:
        raise SettingsError(flag, value, f"outside {low:g}-{high:g} seconds")
    return seconds


def _ifname(flag: str, value: str, name: str) -> str:
    """Linux interface names: 1-15 bytes, no "/", ":" or whitespace, not "." or ".."."""
    if (
        not name
        or len(name.encode()) > 15
        or name in (".", "..")
        or any(c in name for c in "/:")
        or any(c.isspace() for c in name)
    ):
        raise SettingsError(flag, value, f"{name!r} is not a network device name")
    return name


def _node_name(value: str) -> str:
    if value and (len(value) > 253 or not _DNS_SUBDOMAIN.fullmatch(value)):
        raise SettingsError(
            "--node-name",
            value,
            "not a Kubernetes node name (lower-case letters, digits, '-' and '.', at most 253)",
        )
    return value


def _label_key(value: str) -> str:
    prefix, slash, name = value.rpartition("/")
    ok = bool(_LABEL_NAME.fullmatch(name)) and (
        not slash or (len(prefix) <= 253 and bool(_DNS_SUBDOMAIN.fullmatch(prefix)))
    )
    if not ok:
        raise SettingsError(
            "--control-plane-label",
            value,
            "not a label key ([PREFIX/]NAME, NAME at most 63 characters)",
        )
    return value


def _prefix_length(flag: str, text: str, family: int) -> int:
    top = 32 if family == 4 else 128
    if not (text.isascii() and text.isdigit()) or not 1 <= int(text) <= top:
        raise SettingsError(flag, text, f"expected a prefix length from 1 to {top}")
    return int(text)


def _cluster_cidrs(flag: str, text: str) -> tuple:
    cidrs = []
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            if not item.isascii():
                raise ValueError
            net = ipaddress.ip_network(item, strict=True)
        except ValueError:
            raise SettingsError(
                flag, text, f"{item!r} is not a CIDR with its host bits zero, such as 10.244.0.0/16"
            ) from None
        if net.prefixlen == 0:
            raise SettingsError(flag, text, f"{item} would accept every pod CIDR")
        cidrs.append(net)
    return tuple(dict.fromkeys(cidrs))


def _admission_settings(args: argparse.Namespace, kw: dict) -> None:
    if getattr(args, "role_source", None) is not None:
        # Settings turns it into a RoleSource or names the flag.
        kw["role_source"] = args.role_source
    if getattr(args, "cilium_namespace", None):
        kw["cilium_namespace"] = args.cilium_namespace
    if getattr(args, "cluster_pod_cidrs", None):
        kw["cluster_pod_cidrs"] = _cluster_cidrs("--cluster-pod-cidrs", args.cluster_pod_cidrs)
    for family in (4, 6):
        text = getattr(args, f"pod_cidr_min_prefix_v{family}", None)
        if text is not None:
            kw[f"pod_cidr_min_prefix_v{family}"] = _prefix_length(
                f"--pod-cidr-min-prefix-v{family}", text, family
            )


def settings_from_args(args: argparse.Namespace) -> Settings:
    """Translate parsed flags into Settings; raise SettingsError naming the flag and value."""
    kw: dict = {}
    spec = getattr(args, "control_plane_exempt_ports", None)
    if spec is not None:
        try:
            kw["exempt_ports"] = parse_port_spec(spec)
        except PortSpecError as e:
            raise SettingsError("--control-plane-exempt-ports", spec, str(e)) from None
        if len(kw["exempt_ports"]) > MAX_EXEMPT_PORT_RANGES:
            raise SettingsError(
                "--control-plane-exempt-ports",
                spec,
                f"{len(kw['exempt_ports'])} separate ranges after merging; the "
                f"datapath holds at most {MAX_EXEMPT_PORT_RANGES} (use ranges "
                "such as 2379-2380)",
            )
    if getattr(args, "control_plane_label", None):
        kw["control_plane_labels"] = tuple(_label_key(v) for v in args.control_plane_label)
    if getattr(args, "address_types", None) is not None:
        types = tuple(t.strip() for t in args.address_types.split(",") if t.strip())
        if not types:
            raise SettingsError("--address-types", args.address_types, "no address type given")
        for t in types:
            if not _ADDRESS_TYPE.fullmatch(t):
                raise SettingsError(
                    "--address-types",
                    args.address_types,
                    f"{t!r} is not an address type (such as InternalIP)",
                )
        kw["address_types"] = types
    if hasattr(args, "node_name"):
        name = args.node_name or os.environ.get("NODE_NAME", "")
        kw["node_name"] = _node_name(name)
    for attr, key in (
        ("kubeconfig", "kubeconfig"),
        ("bpffs", "bpffs"),
        ("log_format", "log_format"),
        ("log_level", "log_level"),
        ("datapath", "datapath"),
        ("wg_interface", "wg_interface"),
        ("fail_mode", "fail_mode"),
        ("run_dir", "run_dir"),
        ("ingress_enforcement", "ingress_enforcement"),
    ):
        if getattr(args, attr, None) is not None:
            kw[key] = getattr(args, attr)
    if getattr(args, "wg_interface", None) is not None:
        _ifname("--wg-interface", args.wg_interface, args.wg_interface)
    if getattr(args, "devices", None):
        devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
        for d in devices:
            _ifname("--devices", args.devices, d)
        kw["devices"] = devices
    if getattr(args, "health_probe_bind_address", None) is not None:
        kw["health_bind"] = _bind(HEALTH_FLAG, args.health_probe_bind_address)
    if getattr(args, "metrics_server_bind_address", None) is not None:
        kw["metrics_bind"] = _bind(METRICS_FLAG, args.metrics_server_bind_address)
    if (
        "health_bind" in kw
        and "metrics_bind" in kw
        and binds_overlap(parse_bind(kw["health_bind"]), parse_bind(kw["metrics_bind"]))
    ):
        raise SettingsError(
            METRICS_FLAG,
            kw["metrics_bind"],
            f"the same port as {HEALTH_FLAG} {kw['health_bind']!r}",
        )
    if getattr(args, "noop_route", None) is not None:
        kw["noop_route"] = bool(args.noop_route)
    _admission_settings(args, kw)
    if getattr(args, "watch_stall_seconds", None) is not None:
        kw["watch_stall_seconds"] = _seconds(
            "--watch-stall-seconds", args.watch_stall_seconds, 10, 300
        )
    if getattr(args, "take_over_pod_to_pod", None) is not None:
        kw["take_over_pod_to_pod"] = bool(args.take_over_pod_to_pod)
    return Settings(**kw)


def check_cluster_config(settings: Settings) -> None:
    """Refuse, as a flag error, a kubeconfig that cannot be loaded (missing, unreadable, a
    directory, not YAML, binary, no current context) or, without --kubeconfig, a missing
    in-cluster service account. Reads files only: the API server is not contacted, and an
    unreachable one is a runtime fault the agent retries."""
    # Loaded on use: commands that never talk to the API server skip the client.
    from nodecryptor.cluster import client
    from nodecryptor.cluster.k8s_errors import KubeConfigError

    try:
        client.check_config(settings)
    except KubeConfigError as e:
        if settings.kubeconfig is not None:
            raise SettingsError("--kubeconfig", settings.kubeconfig, str(e)) from None
        raise SettingsError(
            "--kubeconfig",
            "(unset)",
            f"no kubeconfig given and no usable in-cluster service account "
            f"(token in {client.SERVICE_ACCOUNT_DIR}, KUBERNETES_SERVICE_HOST/"
            f"PORT): {e}",
        ) from None


def validate_run(settings: Settings) -> None:
    """Everything `nodecryptor run` can check before it touches the node: the node name,
    the bpffs directory and the client configuration (flags were checked while parsing)."""
    require_node_name(settings)
    if not os.path.isdir(settings.bpffs):
        raise SettingsError("--bpffs", settings.bpffs, "not an existing directory")
    check_cluster_config(settings)


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
