"""`nodecryptor run`: the agent (what the DaemonSet runs)."""

from __future__ import annotations

from .common import add_bpffs, add_cluster, add_logging, parse_bool, settings_from_args


def register(sub) -> None:
    p = sub.add_parser("run", help="run the agent",
                       description="Watch CiliumNodes and keep this node's datapath sending "
                                   "traffic to remote nodes and pods through WireGuard.")
    add_cluster(p)
    add_bpffs(p)
    add_logging(p)
    p.add_argument("--health-probe-bind-address", default=":8083", metavar="ADDR",
                   help="[HOST]:PORT for /healthz and /readyz (default: %(default)s)")
    p.add_argument("--metrics-server-bind-address", default=":8084", metavar="ADDR",
                   help="[HOST]:PORT for /metrics (default: %(default)s)")
    p.add_argument("--noop-route", nargs="?", const=True, default=False, type=parse_bool,
                   metavar="BOOL", help="create the seed's dummy device and route "
                                        "(compatibility; ip-rule datapath only)")
    p.add_argument("--datapath", choices=("auto", "bpf", "iprule"), default="auto",
                   help="auto: BPF when it compiles, loads and attaches, else ip rules; "
                        "bpf: fail instead of falling back (default: %(default)s)")
    p.add_argument("--wg-interface", default="cilium_wg0", metavar="IFNAME",
                   help="Cilium's WireGuard device (default: %(default)s)")
    p.add_argument("--devices", default=None, metavar="DEVS",
                   help="comma-separated underlay devices; default: detected from the routes "
                        "to remote node addresses")
    p.add_argument("--fail-mode", choices=("open", "closed"), default="closed",
                   help="closed: drop cluster traffic that cannot be encrypted; open: let it "
                        "out in the clear (default: %(default)s)")
    p.add_argument("--take-over-pod-to-pod", nargs="?", const=True, default=False,
                   type=parse_bool, metavar="BOOL",
                   help="redirect local-pod to remote-pod traffic into WireGuard here instead "
                        "of leaving it to Cilium, which encrypts it itself (default: false)")
    p.set_defaults(func=handle)


def handle(args) -> int:
    from ..agent import run_agent

    settings = settings_from_args(args)
    return run_agent(settings)
