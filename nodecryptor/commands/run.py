"""`nodecryptor run`: the agent (what the DaemonSet runs)."""

from __future__ import annotations

from nodecryptor.commands.common import (
    add_bpffs,
    add_cluster,
    add_datapath,
    add_fail_mode,
    add_ingress_enforcement,
    add_logging,
    add_run_dir,
    add_wg,
    parse_bool,
    settings_from_args,
    validate_run,
)


def register(sub) -> None:
    p = sub.add_parser(
        "run",
        help="run the agent",
        description="Watch CiliumNodes and keep this node's datapath sending "
        "traffic to remote nodes and pods through WireGuard.",
    )
    add_cluster(p)
    add_bpffs(p)
    add_logging(p)
    p.add_argument(
        "--health-probe-bind-address",
        default=":8083",
        metavar="ADDR",
        help="[HOST]:PORT for /healthz and /readyz (default: %(default)s)",
    )
    p.add_argument(
        "--metrics-server-bind-address",
        default=":8084",
        metavar="ADDR",
        help="[HOST]:PORT for /metrics (default: %(default)s)",
    )
    p.add_argument(
        "--noop-route",
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        metavar="BOOL",
        help="create the seed's dummy device and route (compatibility; ip-rule datapath only)",
    )
    add_datapath(p)
    add_wg(p)
    p.add_argument(
        "--devices",
        default=None,
        metavar="DEVS",
        help="comma-separated underlay devices; default: detected from the routes "
        "to remote node addresses",
    )
    p.add_argument(
        "--watch-stall-seconds",
        default="55",
        metavar="SECONDS",
        help="a CiliumNode watch silent for this long is abandoned as stalled and "
        "resumed; watches are renewed a few seconds sooner, so lower means "
        "faster detection and more watch requests; 10-300 "
        "(default: %(default)s)",
    )
    add_fail_mode(p)
    add_ingress_enforcement(p)
    add_run_dir(p)
    p.add_argument(
        "--take-over-pod-to-pod",
        nargs="?",
        const=True,
        default=False,
        type=parse_bool,
        metavar="BOOL",
        help="redirect local-pod to remote-pod traffic into WireGuard here instead "
        "of leaving it to Cilium, which encrypts it itself (default: false)",
    )
    p.set_defaults(func=handle)


def handle(args) -> int:
    from nodecryptor.agent.wiring import run_agent

    settings = settings_from_args(args)
    validate_run(settings)  # configuration errors exit 2 before anything is touched
    return run_agent(settings)
