"""The ``exemption`` scenario: an EncryptionExemption exempts a port to one labelled worker:
observed in the clear on the wire, while the same port to the other worker (and to the labelled
worker's pod) stays encrypted; the label is removed and the flow is encrypted again. Measures
policy change -> datapath on every other node, and label change -> datapath."""

from __future__ import annotations

import time

from nodecryptor.core.settings import Settings
from ..flows import CLEAR, ENCRYPTED, Flow, PortAllocator, Result, Row, observe
from ..spec import SERVICE_TCP_PORT, SERVICE_UDP_PORT
from ..topology import LabError
from .common import FAMILIES, seconds_until


EXEMPTION_LABEL = "example.com/lab-storage"
EXEMPTION_POLICY = "lab-storage"
EXEMPTION_LIMIT_SECONDS = 1.0
"""Policy or label change to datapath, as for a CiliumNode (the churn scenario's bound)."""


def _exempts_to(lab, name: str, target) -> bool:
    """Whether the datapath of ``name`` exempts SERVICE_TCP_PORT towards ``target``'s IPv4
    node address: BPF, the destination entry carries a policy in its ``serves`` mask (the
    target is a worker, so no built-in bit); ip rules, the dport rule exists."""
    if lab.datapath == "bpf":
        from nodecryptor.datapath.bpf import inspect as bpf_inspect

        dump = bpf_inspect.dump(Settings(bpffs=lab.nodes[name].bpffs))
        return any(
            d.get("prefix") == f"{target.ipv4}/32" and d.get("serves_mask")
            for d in dump.get("maps", {}).get("destinations", [])
        )
    rules = lab.run_in(name, "ip", "-4", "rule", "show")
    return f"to {target.ipv4} ipproto tcp dport {SERVICE_TCP_PORT} lookup main" in rules


def _relabel(api, name: str, value: str | None) -> None:
    node = api.get_node(name)
    labels = node["metadata"].setdefault("labels", {})
    if value is None:
        labels.pop(EXEMPTION_LABEL, None)
    else:
        labels[EXEMPTION_LABEL] = value
    node["metadata"].pop("resourceVersion", None)
    api.put_node(node)


def _timed_row(result: Result, what: str, took: dict[str, float]) -> None:
    worst = max(took.values())
    limit = f"<= {EXEMPTION_LIMIT_SECONDS:.1f} s"
    result.rows.append(
        Row(
            what,
            limit,
            limit if worst <= EXEMPTION_LIMIT_SECONDS else f"{worst:.2f} s",
            f"{worst:.2f} s",
        )
    )
    result.facts[what] = ", ".join(f"{n} {t * 1000:.0f} ms" for n, t in sorted(took.items()))


def run(lab, ports: PortAllocator) -> Result:
    result = Result("exemption", lab.datapath)
    spec = lab.spec
    if len(spec.workers) < 2:
        raise LabError("the exemption scenario needs two workers (--nodes 3 or more)")
    cp, w1, w2 = spec.control_plane[0], spec.workers[0], spec.workers[1]
    others = [n for n in lab.nodes if n != w2.name]
    api = lab.api()
    policy = {
        "apiVersion": "nodecryptor.io/v1alpha1",
        "kind": "EncryptionExemption",
        "metadata": {"name": EXEMPTION_POLICY},
        "spec": {
            "nodeSelector": {"matchLabels": {EXEMPTION_LABEL: "yes"}},
            "ports": [{"port": SERVICE_TCP_PORT}],
        },
    }
    try:
        _relabel(api, w2.name, "yes")
        since = time.monotonic()
        api.create_exemption(policy)
        took, missing = seconds_until(others, lambda n: _exempts_to(lab, n, w2), since, 10.0, 0.01)
        if missing:
            raise LabError(f"{', '.join(missing)} did not exempt {w2.name} within 10 s")
        _timed_row(result, f"policy created: every other agent exempts {w2.name}", took)
        flows = []
        for fam in FAMILIES:
            flows += [
                Flow(
                    w1.name, w2.name, fam, "tcp", SERVICE_TCP_PORT, CLEAR, "policy: labelled worker"
                ),
                Flow(
                    cp.name, w2.name, fam, "tcp", SERVICE_TCP_PORT, CLEAR, "policy: labelled worker"
                ),
                Flow(
                    cp.name,
                    w1.name,
                    fam,
                    "tcp",
                    SERVICE_TCP_PORT,
                    ENCRYPTED,
                    "same port, unlabelled worker",
                ),
                Flow(
                    w2.name,
                    w1.name,
                    fam,
                    "tcp",
                    SERVICE_TCP_PORT,
                    ENCRYPTED,
                    "same port, unlabelled worker",
                ),
                Flow(
                    w1.name,
                    f"{w2.name}/pod",
                    fam,
                    "tcp",
                    SERVICE_TCP_PORT,
                    ENCRYPTED,
                    "labelled worker's pod",
                ),
                Flow(
                    w1.name,
                    w2.name,
                    fam,
                    "udp",
                    SERVICE_UDP_PORT,
                    ENCRYPTED,
                    "another port of the labelled worker",
                ),
            ]
        result.rows += observe(lab, flows, ports, "exemption-on")
        # The operator's view: explain names the policy behind the exempt verdict.
        got = lab.nodecryptor(
            w1.name,
            "explain",
            "--dst",
            str(w2.ipv4),
            "--src",
            str(w1.ipv4),
            "--dport",
            str(SERVICE_TCP_PORT),
        )
        result.rows.append(
            Row(
                f"nodecryptor explain on {w1.name}: {w2.name} tcp/{SERVICE_TCP_PORT}",
                f"exempt by {EXEMPTION_POLICY}",
                f"{got.get('verdict')} by {got.get('policy')}",
            )
        )
        since = time.monotonic()
        _relabel(api, w2.name, None)
        took, missing = seconds_until(
            others, lambda n: not _exempts_to(lab, n, w2), since, 10.0, 0.01
        )
        if missing:
            raise LabError(
                f"{', '.join(missing)} still exempt {w2.name} 10 s after its label was removed"
            )
        _timed_row(result, f"label removed: every other agent encrypts {w2.name} again", took)
        result.rows += observe(
            lab,
            [
                Flow(w1.name, w2.name, fam, "tcp", SERVICE_TCP_PORT, ENCRYPTED, "label removed")
                for fam in FAMILIES
            ],
            ports,
            "exemption-off",
        )
    finally:
        try:
            api.delete_exemption(EXEMPTION_POLICY)
        except Exception:  # cleanup of a scenario that failed before creating it
            pass
        try:
            _relabel(api, w2.name, None)
        except Exception:  # as above
            pass
    return result
