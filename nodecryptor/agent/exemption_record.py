"""The record of the exemption policies the agent last applied, kept in ``settings.run_dir``
(``exemptions.json``) so that ``nodecryptor explain`` (another process) can name the policy
behind an exempt verdict: the datapaths know ranges and policy bits, not names.

Compact: the policy names in bit order, the ranges the local node serves, the exempt ranges
per destination prefix (node addresses of serving nodes only), and the client sets only of
the policies some destinations are no client of."""

from __future__ import annotations

import ipaddress
import logging
import os

from nodecryptor.policy.exemptions import PolicyRange, policy_for
from nodecryptor.core.log import kv
from nodecryptor.core.runfiles import read_json_object, write_json
from nodecryptor.core.model import DesiredState
from nodecryptor.core.settings import Settings

log = logging.getLogger(__name__)

RECORD_FILE = "exemptions.json"


def record_path(settings: Settings) -> str:
    return os.path.join(settings.run_dir, RECORD_FILE)


def summarize(desired: DesiredState) -> dict:
    plan = desired.plan
    everyone = sorted(
        {r.policy for r in plan.serves if all(r.policy in d.client_of for d in plan.destinations)}
    )
    return {
        "policies": list(plan.policies),
        "serves": [r.to_json() for r in plan.serves],
        "all_clients": everyone,
        "exempt": {
            str(d.prefix): [r.to_json() for r in d.exempt_ports]
            for d in plan.destinations
            if d.exempt_ports
        },
        "clients": {
            str(d.prefix): sorted(set(d.client_of) - set(everyone))
            for d in plan.destinations
            if set(d.client_of) - set(everyone)
        },
    }


def write(settings: Settings, summary: dict) -> None:
    """Persist for other processes; a read-only run directory only loses the policy name in
    ``explain``, never the agent."""
    path = record_path(settings)
    try:
        write_json(path, summary)
    except OSError as e:
        log.warning("cannot record the exemption policies", extra=kv(path=path, error=str(e)))


def read(settings: Settings) -> dict[str, object] | None:
    return read_json_object(record_path(settings))


def _ranges(items) -> list[PolicyRange]:
    out = []
    for r in items or ():
        try:
            out.append(
                PolicyRange(str(r["protocol"]), int(r["first"]), int(r["last"]), str(r["policy"]))
            )
        except (KeyError, TypeError, ValueError):
            continue
    return out


def _longest(table: dict, dst: str):
    addr = ipaddress.ip_address(dst)
    best = None
    for prefix in table:
        try:
            net = ipaddress.ip_network(prefix)
        except ValueError:
            continue
        if (
            addr.version == net.version
            and addr in net
            and (best is None or net.prefixlen > best[0].prefixlen)
        ):
            best = (net, prefix)
    return best[1] if best else None


def policy_of(record: dict, reason_is_reply: bool, dst: str, proto: str, port: int) -> str | None:
    """The policy that exempts a packet to ``dst``: by its destination port to a serving
    node, or (``reason_is_reply``) by its source port from the local serving node."""
    if not reason_is_reply:
        prefix = _longest(record.get("exempt") or {}, dst)
        return (
            policy_for(_ranges((record.get("exempt") or {}).get(prefix)), proto, port)
            if prefix
            else None
        )
    allowed = set(record.get("all_clients") or ())
    prefix = _longest(record.get("clients") or {}, dst)
    if prefix:
        allowed |= set(record["clients"][prefix])
    return policy_for(
        [r for r in _ranges(record.get("serves")) if r.policy in allowed], proto, port
    )
