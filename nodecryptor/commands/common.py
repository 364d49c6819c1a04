"""Options shared by several commands and their translation into Settings."""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import SettingsError
from ..log import LEVELS
from ..ports import PortSpecError, parse_port_spec
from ..settings import DEFAULT_EXEMPT_PORTS, MAX_EXEMPT_PORT_RANGES, Settings


def parse_bool(text: str) -> bool:
    """Go's flag package spelling of booleans (-noop-route, -noop-route=true)."""
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes", "on"):
        return True
    if value in ("0", "f", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not a boolean")


def add_bpffs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bpffs", default="/sys/fs/bpf", metavar="DIR",
                   help="bpffs mount; pins live under DIR/nodecryptor/ (default: %(default)s)")


def add_json(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable JSON output")


def add_logging(p: argparse.ArgumentParser) -> None:
    p.add_argument("--log-format", choices=("text", "json"), default="text",
                   help="log line format (default: %(default)s)")
    p.add_argument("--log-level", choices=LEVELS, default="info",
                   help="minimum level logged (default: %(default)s)")


def add_cluster(p: argparse.ArgumentParser) -> None:
    p.add_argument("--kubeconfig", default=None, metavar="PATH",
                   help="kubeconfig file; default: in-cluster service account")
    p.add_argument("--node-name", default=None, metavar="NAME",
                   help="local node (its CiliumNode); default: $NODE_NAME")
    p.add_argument("--control-plane-exempt-ports", default=DEFAULT_EXEMPT_PORTS, metavar="SPEC",
                   help="ports left in the clear to/from control-plane nodes: comma-separated "
                        "PORT or FIRST-LAST, TCP unless prefixed udp/ or sctp/ "
                        "(default: %(default)s)")
    p.add_argument("--control-plane-label", action="append", default=None, metavar="LABEL",
                   help="label whose presence marks a control-plane node (repeatable; default: "
                        "node-role.kubernetes.io/control-plane and node-role.kubernetes.io/master)")
    p.add_argument("--address-types", default="InternalIP", metavar="TYPES",
                   help="comma-separated CiliumNode address types treated as node addresses "
                        "(default: %(default)s)")


def _bind(flag: str, value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise SettingsError(flag, value, "expected [HOST]:PORT with a port from 1 to 65535")
    return value


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
            raise SettingsError("--control-plane-exempt-ports", spec,
                                f"{len(kw['exempt_ports'])} separate ranges after merging; the "
                                f"datapath holds at most {MAX_EXEMPT_PORT_RANGES} (use ranges "
                                "such as 2379-2380)")
    if getattr(args, "control_plane_label", None):
        kw["control_plane_labels"] = tuple(args.control_plane_label)
    if getattr(args, "address_types", None) is not None:
        types = tuple(t.strip() for t in args.address_types.split(",") if t.strip())
        if not types:
            raise SettingsError("--address-types", args.address_types, "no address type given")
        kw["address_types"] = types
    if hasattr(args, "node_name"):
        name = args.node_name or os.environ.get("NODE_NAME", "")
        kw["node_name"] = name
    for attr, key in (("kubeconfig", "kubeconfig"), ("bpffs", "bpffs"),
                      ("log_format", "log_format"), ("log_level", "log_level"),
                      ("datapath", "datapath"), ("wg_interface", "wg_interface"),
                      ("fail_mode", "fail_mode")):
        if getattr(args, attr, None) is not None:
            kw[key] = getattr(args, attr)
    if getattr(args, "devices", None):
        devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
        for d in devices:
            if len(d) > 15 or "/" in d or " " in d:
                raise SettingsError("--devices", args.devices, f"{d!r} is not a device name")
        kw["devices"] = devices
    if getattr(args, "health_probe_bind_address", None) is not None:
        kw["health_bind"] = _bind("--health-probe-bind-address", args.health_probe_bind_address)
    if getattr(args, "metrics_server_bind_address", None) is not None:
        kw["metrics_bind"] = _bind("--metrics-server-bind-address",
                                   args.metrics_server_bind_address)
    if getattr(args, "noop_route", None) is not None:
        kw["noop_route"] = bool(args.noop_route)
    return Settings(**kw)


def require_node_name(settings: Settings) -> None:
    if not settings.node_name:
        raise SettingsError("--node-name", "", "required (or set NODE_NAME)")


def print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")
