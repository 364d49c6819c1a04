"""Loading of the deployment files (k8s/, the operator guide) for the
tests in this directory. Reading only; no test logic here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
GUIDE = REPO / "docs" / "operator-guide.md"

# Kinds defined by CustomResourceDefinitions: the Kubernetes OpenAPI schema does not know them.
CRD_KINDS = {
    "ServiceMonitor": "monitoring.coreos.com/v1 (Prometheus Operator CRD)",
    "EncryptionExemption": "nodecryptor.io/v1alpha1 (k8s/crd-encryptionexemption.yaml)",
    "PrometheusRule": "monitoring.coreos.com/v1 (Prometheus Operator CRD)",
}


@dataclass(frozen=True)
class Doc:
    path: Path
    index: int
    body: dict

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(REPO)}#{self.index}:{self.body.get('kind')}"


def manifest_files() -> list[Path]:
    """Every YAML file under k8s/ except the kustomizations themselves."""
    return sorted(p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml")


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def load_docs(path: Path) -> list[Doc]:
    with path.open() as f:
        return [Doc(path, i, body) for i, body in enumerate(yaml.safe_load_all(f)) if body]


def all_docs() -> list[Doc]:
    return [doc for path in manifest_files() for doc in load_docs(path)]


def default_docs() -> list[Doc]:
    """The objects `kubectl apply -k k8s/` creates."""
    kust = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [doc for res in kust["resources"] for doc in load_docs(K8S / res)]


def find(docs: list[Doc], kind: str, name: str | None = None) -> dict:
    found = [
        d.body
        for d in docs
        if d.body.get("kind") == kind and name in (None, d.body["metadata"]["name"])
    ]
    assert len(found) == 1, f"expected one {kind} {name or ''} in k8s/, found {len(found)}"
    return found[0]


def agent_daemonset() -> dict:
    return find(default_docs(), "DaemonSet", "nodecryptor")


def agent_container() -> dict:
    containers = agent_daemonset()["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "nodecryptor")


def agent_capabilities() -> list[str]:
    """The capabilities the DaemonSet adds, as Kubernetes spells them (NET_ADMIN, ...)."""
    return list(agent_container()["securityContext"]["capabilities"]["add"])


def expand_env(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion of container args (only the variables given)."""
    for key, value in env.items():
        arg = arg.replace(f"$({key})", value)
    return arg
