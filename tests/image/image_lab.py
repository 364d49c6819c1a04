"""Running the agent image on a lab node as the DaemonSet runs it on a Kubernetes node. Shared by
test_image.py and measure_image.py.

The container gets everything from k8s/daemonset.yaml (daemonset_podman.translate), with the
DaemonSet's hostPath volumes pointing at the lab node's stand-ins (its own bpffs for
/sys/fs/bpf; the machine's /lib/modules and /usr/src). Three things differ from a cluster, and
only these:

* the API server is the lab's, reached with a kubeconfig (mounted read-only) instead of the
  pod's service-account token;
* the health and metrics servers listen where the lab polls them (127.0.0.1:9883/9884 instead
  of :8083/:8084);
* the node's /var/run/wireguard is mounted: the lab's cilium_wg0 is wireguard-go, which answers
  only on its socket there (kernel WireGuard, as on a real node, answers over netlink).

Runtime: podman with runc (scripts/podman-run.sh says why), entered into the node's network
namespace with `nsenter --net` (not `ip netns exec`, whose private /sys hides the cgroup file
system from podman), and --network=host, which is then the node's network.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import yaml

from daemonset_podman import ContainerRun, translate
from nodecryptor_testkit.lab.lab import HEALTH_BIND, METRICS_BIND
from nodecryptor_testkit.lab.topology import NodeHandle

REPO = Path(__file__).resolve().parents[2]
DAEMONSET = REPO / "k8s" / "daemonset.yaml"
IMAGE = os.environ.get("NODECRYPTOR_IMAGE", "localhost/nodecryptor:dev")
PODMAN_RUN = ["bash", str(REPO / "scripts" / "podman-run.sh")]
CONTAINER = "nodecryptor"
LAB_KUBECONFIG = "/etc/nodecryptor-lab/kubeconfig"
WG_UAPI = "/var/run/wireguard"
REPLACED_ARGS = ("--health-probe-bind-address=", "--metrics-server-bind-address=")


def daemonset() -> dict:
    docs = [d for d in yaml.safe_load_all(DAEMONSET.read_text()) if d]
    found = [d for d in docs if d.get("kind") == "DaemonSet"]
    assert len(found) == 1, f"expected one DaemonSet in {DAEMONSET}"
    return found[0]


def host_paths(node: NodeHandle) -> dict[str, str]:
    """The DaemonSet's hostPaths -> what stands for them on this lab node."""
    return {"/sys/fs/bpf": node.bpffs, "/lib/modules": "/lib/modules", "/usr/src": "/usr/src"}


def container_run(node: NodeHandle, scratch: Path) -> ContainerRun:
    return translate(daemonset(), CONTAINER, node.spec.name, host_paths(node), scratch)


def lab_args(args: list[str]) -> list[str]:
    """The DaemonSet's arguments with the lab's three differences (module docstring)."""
    kept = [a for a in args if not a.startswith(REPLACED_ARGS)]
    return kept + [
        f"--health-probe-bind-address={HEALTH_BIND}",
        f"--metrics-server-bind-address={METRICS_BIND}",
        f"--kubeconfig={LAB_KUBECONFIG}",
    ]


def agent_command(name: str, scratch: Path):
    """A Lab agent_commands entry: the node's agent as container ``name`` of the image."""

    def command(node: NodeHandle, _usual_argv: list[str]) -> list[str]:
        run = container_run(node, scratch)
        lab_mounts = [
            f"--volume={node.workdir}/kubeconfig:{LAB_KUBECONFIG}:ro",
            # The holder process's mount namespace owns the node's wireguard-go socket.
            f"--volume=/proc/{node.holder_pid}/root{WG_UAPI}:{WG_UAPI}:rw",
        ]
        return [
            "nsenter",
            f"--net=/run/netns/{node.netns}",
            *PODMAN_RUN,
            "--rm",
            f"--name={name}",
            *run.options,
            *lab_mounts,
            IMAGE,
            *lab_args(run.args),
        ]

    return command


def remove_container(name: str) -> None:
    """Safety net after the lab stopped the agent: nothing of the test stays in podman."""
    subprocess.run(
        ["podman", "rm", "--force", "--ignore", "--time", "5", name],
        capture_output=True,
        timeout=60,
    )
