"""`nodecryptor explain`: what the installed datapath does with one packet.

With the BPF datapath the live attached program itself runs on a crafted packet
(BPF_PROG_TEST_RUN), so the answer is the program's, not a re-implementation's.
"""

from __future__ import annotations

import ipaddress

from nodecryptor.agent import exemption_record
from nodecryptor.datapath import detect
from nodecryptor.datapath.base import PacketQuery
from nodecryptor.core.errors import SettingsError
from nodecryptor.core.ports import IP_PROTOCOLS
from nodecryptor.commands.common import (
    add_bpffs,
    add_json,
    add_run_dir,
    print_json,
    settings_from_args,
)

PROTOCOLS = tuple(IP_PROTOCOLS)


def register(sub) -> None:
    p = sub.add_parser(
        "explain",
        help="say whether a packet would be encrypted, and why",
        description="Describe a packet leaving this node and print the verdict "
        "(encrypt, exempt, pass, drop) and the reason, as the "
        "installed datapath decides it.",
        epilog="example: nodecryptor explain --dst 10.244.2.7 --dport 80 --json",
    )
    p.add_argument("--dst", required=True, metavar="IP", help="destination address")
    p.add_argument(
        "--src",
        default=None,
        metavar="IP",
        help="source address (default: the one the kernel picks for --dst)",
    )
    p.add_argument(
        "--proto",
        default="tcp",
        metavar="PROTO",
        help="tcp, udp, sctp, icmp or icmpv6 (default: %(default)s)",
    )
    p.add_argument("--sport", default="40000", metavar="N", help="source port (default: 40000)")
    p.add_argument("--dport", default="80", metavar="N", help="destination port (default: 80)")
    p.add_argument("--mark", default="0", metavar="0xNNN", help="skb mark (default: 0)")
    p.add_argument(
        "--direction",
        default="egress",
        metavar="DIR",
        help="egress: a packet leaving this node; ingress: a packet arriving from "
        "--src (a peer) for --dst (a local address), as the ingress program "
        "decides it: pass, exempt or drop (default: %(default)s)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEV",
        help="underlay device (default: the one the route to --dst uses)",
    )
    add_bpffs(p)
    add_run_dir(p)  # where the agent records the names of the exemption policies
    add_json(p)
    p.set_defaults(func=handle)


def _ip(flag: str, text: str):
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise SettingsError(flag, text, "not an IPv4 or IPv6 address") from None


def _port(flag: str, text: str) -> int:
    if not text.isdigit() or not 0 <= int(text) <= 65535:
        raise SettingsError(flag, text, "expected a port from 0 to 65535")
    return int(text)


def query_from_args(args) -> PacketQuery:
    dst = _ip("--dst", args.dst)
    src = _ip("--src", args.src) if args.src is not None else None
    if src is not None and src.version != dst.version:
        raise SettingsError("--src", args.src, f"not the address family of --dst {args.dst}")
    proto = args.proto.lower()
    if proto not in PROTOCOLS:
        raise SettingsError("--proto", args.proto, "expected one of " + ", ".join(PROTOCOLS))
    if (proto == "icmp" and dst.version == 6) or (proto == "icmpv6" and dst.version == 4):
        raise SettingsError("--proto", args.proto, f"does not match the family of {args.dst}")
    try:
        mark = int(args.mark, 0)
    except ValueError:
        raise SettingsError("--mark", args.mark, "expected a number such as 0xe00") from None
    if not 0 <= mark <= 0xFFFFFFFF:
        raise SettingsError("--mark", args.mark, "must fit in 32 bits")
    if args.device is not None and (not args.device or len(args.device) > 15 or "/" in args.device):
        raise SettingsError("--device", args.device, "not a device name")
    return PacketQuery(
        dst=str(dst),
        src=str(src) if src else None,
        proto=proto,
        sport=_port("--sport", args.sport),
        dport=_port("--dport", args.dport),
        mark=mark,
        device=args.device,
    )


DIRECTIONS = ("egress", "ingress")


def _explain_ingress(module, settings, query):
    """The ingress verdict; a datapath without an ingress program says so instead of
    guessing (the ip-rule datapath cannot classify arriving packets)."""
    from nodecryptor.datapath.base import VERDICT_PASS, Explanation

    fn = getattr(module, "explain_ingress", None)
    if fn is None:
        return Explanation(
            VERDICT_PASS,
            "ingress-unsupported: this datapath does not classify "
            "arriving packets (clear text from peers is neither counted nor "
            "dropped)",
            str(getattr(module, "DATAPATH", "iprule")),
            None,
            {"direction": "ingress", "src": query.src, "dst": query.dst},
        )
    return fn(settings, query)


def handle(args) -> int:
    direction = getattr(args, "direction", "egress")
    if direction not in DIRECTIONS:
        raise SettingsError("--direction", direction, "expected egress or ingress")
    query = query_from_args(args)
    if direction == "ingress" and query.src is None:
        raise SettingsError("--src", "", "--direction ingress needs the peer's address")
    settings = settings_from_args(args)
    _, module = detect.installed(settings)
    try:
        if direction == "ingress":
            explanation = _explain_ingress(module, settings, query)
        else:
            explanation = module.explain(settings, query)
    except LookupError as e:
        raise SettingsError("--dst", args.dst, str(e)) from None
    _name_policy(settings, query, explanation)
    if args.json:
        print_json(explanation.to_json())
        return 0
    d = explanation.details
    print(f"{explanation.verdict}: {explanation.reason}")
    print(
        f"  {d.get('src', query.src)} -> {query.dst} {query.proto} "
        f"sport {query.sport} dport {query.dport} mark 0x{query.mark:x}"
    )
    print(
        f"  datapath {explanation.datapath}, device {explanation.device}"
        + (f", program {d['prog_id']}" if d.get("prog_id") else "")
        + (
            f", redirected to {d.get('redirect_device') or d['redirect_ifindex']}"
            if d.get("redirect_ifindex")
            else ""
        )
    )
    if d.get("policy"):
        print(f"  exemption policy {d['policy']}")
    return 0


# Exempt reasons of both datapaths: a destination port to a serving node, a reply's source
# port from the local serving node.
_EXEMPT_REASONS = {"exempt-control-plane-port": False, "exempt-control-plane-reply": True}


def _name_policy(settings, query: PacketQuery, explanation) -> None:
    """Name the EncryptionExemption (or the built-in policy) behind an exempt verdict, from
    the agent's record of the policies it applied (the datapaths hold bits, not names)."""
    reply = _EXEMPT_REASONS.get(explanation.reason)
    if reply is None:
        return
    record = exemption_record.read(settings)
    if record is None:
        return
    port = query.sport if reply else query.dport
    name = exemption_record.policy_of(record, reply, query.dst, query.proto, port)
    if name:
        explanation.details["policy"] = name
