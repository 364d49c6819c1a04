"""Reaching into a running lab from the host: the commands, HTTP requests, traffic probes and
API calls that the scenarios make from inside its network namespaces, and the environment the
lab's Python processes run with."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.error
import urllib.request

from . import probe
from . import topology as topo
from .kubeapi import KubeApi
from .spec import LabSpec, NodeSpec
from .topology import LabError, NodeHandle

API_TOKEN = "nodecryptor-lab"
PY = sys.executable
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def child_env() -> dict[str, str]:
    """Environment of the lab's Python processes: this source tree first on the path, so they
    run the same code as the demo whatever their working directory (a stale editable install
    can otherwise resolve ``nodecryptor`` to a namespace package outside the checkout)."""
    path = os.environ.get("PYTHONPATH", "")
    return dict(os.environ, PYTHONPATH=SOURCE_ROOT + (os.pathsep + path if path else ""))


class NetnsApi:
    """A KubeApi whose every request is made from inside one network namespace."""

    def __init__(self, netns: str, api: KubeApi):
        self._netns = netns
        self._api = api

    def __getattr__(self, name: str):
        method = getattr(self._api, name)
        return lambda *args, **kwargs: topo.call_in_netns(self._netns, method, *args, **kwargs)


class LabAccess:
    """The Lab's ways in (a mixin: the attributes are the Lab's)."""

    spec: LabSpec
    nodes: dict[str, NodeHandle]
    external: str
    api_url: str

    def run_dir(self, name: str) -> str:
        return os.path.join(self.nodes[name].workdir, "run")

    def http_status(self, netns: str, url: str) -> int:
        """Status code of a GET of ``url`` from inside ``netns`` (0 when nothing answered)."""

        def get() -> int:
            # No proxy: the URL is inside the lab, whatever the environment says.
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(url, timeout=2) as resp:
                    return resp.status
            except urllib.error.HTTPError as e:
                return e.code
            except (urllib.error.URLError, OSError):
                return 0

        return topo.call_in_netns(netns, get)

    def nodecryptor(self, name: str, *args: str, timeout: float = 30.0) -> dict:
        """Run an inspection command (``status``, ``bpf dump``) with ``--json`` on ``name``."""
        argv = self.nodes[name].enter() + [PY, "-m", "nodecryptor.cli", *args, "--json"]
        if args and args[0] in ("status", "bpf", "explain", "cleanup"):
            argv += ["--bpffs", self.nodes[name].bpffs]
        if args and args[0] in ("status", "explain"):
            argv += ["--run-dir", self.run_dir(name)]
        proc = subprocess.run(
            argv, capture_output=True, text=True, timeout=timeout, env=child_env()
        )
        if proc.returncode not in (0, 1) or not proc.stdout.strip():
            raise LabError(
                f"nodecryptor {' '.join(args)} on {name} failed "
                f"({proc.returncode}): {proc.stderr.strip()[-300:]}"
            )
        return json.loads(proc.stdout)

    def run_in(self, name: str, *argv: str) -> str:
        """Output of a short command run inside node ``name``."""
        return topo.sh(*argv, netns=self.nodes[name].netns, check=False).stdout

    def run_flows(self, netns: str, flows: list[dict]) -> list[dict]:
        """Try ``flows`` (see ``probe.try_flow``) from inside ``netns``. Runs in this process,
        on threads that joined the namespace: no interpreter start-up per batch, so polls and
        continuous traffic are timed to the millisecond."""
        if not flows:
            return []
        return topo.call_in_netns(netns, probe.run_flows, flows)

    def netns_of(self, endpoint: str) -> str:
        """``w1`` (the node), ``w1/pod`` (its pod) or ``ext`` (the external host)."""
        if endpoint == "ext":
            return self.external
        name, _, pod = endpoint.partition("/")
        handle = self.nodes[name]
        return handle.pod_netns if pod else handle.netns

    def address_of(self, endpoint: str, family: int) -> str:
        if endpoint == "ext":
            return str(self.spec.external(family))
        name, _, pod = endpoint.partition("/")
        node: NodeSpec = self.spec.node(name)
        return str(node.pod_address(family) if pod else node.address(family))

    def api(self) -> "NetnsApi":
        """The lab's API as seen from inside the API server's node (the host cannot reach it)."""
        return NetnsApi(
            self.nodes[self.spec.control_plane[0].name].netns, KubeApi(self.api_url, API_TOKEN)
        )
