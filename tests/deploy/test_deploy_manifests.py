"""Offline checks of k8s/: every object against the Kubernetes
OpenAPI schema, and the properties the deployment promises (see docs/operator-guide.md)."""

from __future__ import annotations

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy_manifests import (
    CRD_KINDS,
    K8S,
    REPO,
    agent_container,
    agent_daemonset,
    all_docs,
    default_docs,
    expand_env,
    find,
    kustomizations,
    load_docs,
    manifest_files,
)
from nodecryptor import __version__
from nodecryptor.policy import exemptions
from nodecryptor.cli import build_parser
from nodecryptor.commands.common import settings_from_args
from nodecryptor.core.settings import Settings
from nodecryptor.observe.health import parse_bind

# The newest Kubernetes release whose schema kubernetes-validate ships (pyproject pins >=1.37).
K8S_VERSION = "1.37.0"
DOCS = all_docs()
IMAGE_NAME = "nodecryptor"

# Taints a node-level agent must tolerate: kubeadm's control-plane taints (the old and the new
# label), and the node-lifecycle taints, so that a not-ready node keeps its agent.
TAINTS = [
    ("node-role.kubernetes.io/control-plane", "", "NoSchedule"),
    ("node-role.kubernetes.io/master", "", "NoSchedule"),
    ("node.kubernetes.io/not-ready", "", "NoExecute"),
    ("node.kubernetes.io/unreachable", "", "NoExecute"),
    ("node.kubernetes.io/unschedulable", "", "NoSchedule"),
    ("node.kubernetes.io/network-unavailable", "", "NoSchedule"),
]


# ---- schema ---------------------------------------------------------------------------------


@pytest.mark.parametrize("doc", DOCS, ids=lambda d: d.id)
def test_manifest_valid(doc):
    body = doc.body
    assert {"apiVersion", "kind", "metadata"} <= body.keys()
    assert body["metadata"].get("name")
    if body["kind"] == "EncryptionExemption":
        # Our own resource: the CRD's schema, and the agent's parser, must both accept it.
        validate_exemption(body)
        return
    if body["kind"] in CRD_KINDS:
        # No OpenAPI schema for custom resources in kubernetes-validate: structural checks only.
        assert body["apiVersion"] == "monitoring.coreos.com/v1"
        if body["kind"] == "PrometheusRule":
            for group in body["spec"]["groups"]:
                assert group["name"] and group["rules"]
                for rule in group["rules"]:
                    assert set(rule) <= {"alert", "expr", "for", "labels", "annotations"}
                    assert rule["alert"] and rule["expr"]
            return
        assert body["spec"]["endpoints"] and body["spec"]["selector"]["matchLabels"]
        return
    kubernetes_validate.validate(body, K8S_VERSION, strict=True)


def test_schema_validation_catches_mistakes():
    """The validator is strict: an unknown field and a wrong type are both rejected."""
    body = agent_daemonset()
    body["spec"]["template"]["spec"]["hostNetwrok"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(body, K8S_VERSION, strict=True)


def test_alert_rules_use_only_metrics_the_agent_exports():
    """Every metric an alert expression names exists, and no rule groups by a per-peer
    label (there is none: the series count must not grow with the cluster)."""
    import re

    from prometheus_client import CollectorRegistry

    from nodecryptor.observe.metrics import Metrics

    from nodecryptor.core.settings import Settings
    from nodecryptor.datapath.bpf.collector import DatapathCollector

    exported = {m.name for m in Metrics(CollectorRegistry()).registry.collect()}
    # The BPF counters' families (declared even when no map can be read).
    exported |= {m.name for m in DatapathCollector(Settings(bpffs="/nonexistent")).collect()}
    exported |= {f"{n}_total" for n in exported}
    rule = find(DOCS, "PrometheusRule")
    for group in rule["spec"]["groups"]:
        for r in group["rules"]:
            for name in re.findall(r"\bnodecryptor_[a-z0-9_]+", r["expr"]):
                assert name in exported, f"{r['alert']}: {name} is not an agent metric"
            assert "peer=" not in r["expr"] and "node=" not in r["expr"]
    states = re.findall(r'state="([a-z-]+)"', str(rule))
    from nodecryptor.policy.peerhealth import STATES

    assert set(states) <= set(STATES) and states


def test_servicemonitor_selects_the_metrics_service():
    monitor = find(DOCS, "ServiceMonitor")
    service = find(DOCS, "Service", "nodecryptor-metrics")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    port_names = {p["name"] for p in service["spec"]["ports"]}
    assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
    pod_labels = agent_daemonset()["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


# ---- the EncryptionExemption CRD -------------------------------------------------------------


def crd_schema() -> dict:
    crd = find(default_docs(), "CustomResourceDefinition", "encryptionexemptions.nodecryptor.io")
    [version] = crd["spec"]["versions"]
    return version["schema"]["openAPIV3Schema"]


def validate_exemption(body: dict) -> None:
    """The CRD's structural schema (jsonschema ignores the x-kubernetes-* keys), its CEL
    rules as the agent checks them, and the agent's own parser."""
    jsonschema.validate(body, crd_schema())
    policy, rejections = exemptions.parse_exemption(body)
    assert policy is not None, rejections


def test_crd_matches_the_contract():
    crd = find(default_docs(), "CustomResourceDefinition", "encryptionexemptions.nodecryptor.io")
    spec = crd["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"], spec["names"]["plural"]) == (
        "nodecryptor.io",
        "Cluster",
        "EncryptionExemption",
        "encryptionexemptions",
    )
    [version] = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert {c["name"] for c in version["additionalPrinterColumns"]} >= {"Nodes", "Port", "Age"}
    props = crd_schema()["properties"]["spec"]
    assert props["required"] == ["nodeSelector", "ports"]
    ports = props["properties"]["ports"]
    assert ports["maxItems"] == exemptions.MAX_RANGES_PER_POLICY
    assert ports["items"]["properties"]["protocol"]["enum"] == ["TCP", "UDP", "SCTP"]
    assert any(
        "endPort >= self.port" in v["rule"] for v in ports["items"]["x-kubernetes-validations"]
    )
    expr = props["properties"]["nodeSelector"]["properties"]["matchExpressions"]["items"]
    assert expr["properties"]["operator"]["enum"] == list(exemptions.OPERATORS)

    def described(schema: dict, path: str) -> None:
        # kubectl explain shows these; every field under spec has one.
        assert schema.get("description"), f"{path} has no description"
        for name, sub in (schema.get("properties") or {}).items():
            described(sub, f"{path}.{name}")
        if "items" in schema and schema["items"].get("properties"):
            for name, sub in schema["items"]["properties"].items():
                described(sub, f"{path}[].{name}")

    described(props, "spec")


@pytest.mark.parametrize(
    "body",
    [
        {"spec": {"ports": [{"port": 1}]}},  # no nodeSelector
        {"spec": {"nodeSelector": {}, "ports": []}},  # no ports
        {"spec": {"nodeSelector": {}, "ports": [{"port": 0}]}},
        {"spec": {"nodeSelector": {}, "ports": [{"port": 1, "protocol": "ICMP"}]}},
        {
            "spec": {
                "nodeSelector": {"matchExpressions": [{"key": "a", "operator": "Gt"}]},
                "ports": [{"port": 1}],
            }
        },
    ],
)
def test_crd_schema_refuses_mistakes(body):
    body = {
        "apiVersion": "nodecryptor.io/v1alpha1",
        "kind": "EncryptionExemption",
        "metadata": {"name": "x"},
        **body,
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(body, crd_schema())


def test_every_distribution_has_an_example():
    examples = {
        d.path.parent.name: d.body for d in all_docs() if d.body["kind"] == "EncryptionExemption"
    }
    assert set(examples) == {"kubeadm", "rke2", "k3s-embedded-etcd"}
    ports = {
        d.path.parent.name: set() for d in all_docs() if d.body["kind"] == "EncryptionExemption"
    }
    for d in all_docs():
        if d.body["kind"] == "EncryptionExemption":
            policy, _ = exemptions.parse_exemption(d.body)
            ports[d.path.parent.name] |= {str(r) for r in policy.ports}
    # The distributions' documented bootstrap ports (see each file's comment).
    assert ports == {
        "kubeadm": {"6443", "2379-2380"},
        "rke2": {"9345", "6443", "2379-2380"},
        "k3s-embedded-etcd": {"6443", "2379-2380"},
    }


# ---- kustomizations ----------------------------------------------------------------------------


@pytest.mark.parametrize("kustomization", kustomizations(), ids=lambda p: str(p.relative_to(REPO)))
def test_kustomization_lists_every_file(kustomization):
    kust = yaml.safe_load(kustomization.read_text())
    assert kust["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert kust["kind"] == "Kustomization"
    listed = kust["resources"]
    assert len(listed) == len(set(listed)), "a resource is listed twice"
    here = kustomization.parent
    files = {p.name for p in here.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert set(listed) == files, (
        f"{kustomization.relative_to(REPO)}: not listed "
        f"{sorted(files - set(listed))}, "
        f"missing {sorted(set(listed) - files)}"
    )


def test_every_manifest_belongs_to_one_kustomization():
    covered = {
        k.parent / r for k in kustomizations() for r in yaml.safe_load(k.read_text())["resources"]
    }
    assert set(manifest_files()) == covered


def test_default_installation_has_no_optional_pieces():
    kinds = sorted(d.body["kind"] for d in default_docs())
    assert kinds == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "DaemonSet",
        "Role",
        "Role",
        "RoleBinding",
        "RoleBinding",
        "ServiceAccount",
        "ValidatingAdmissionPolicy",
        "ValidatingAdmissionPolicyBinding",
    ]


# ---- the agent DaemonSet -----------------------------------------------------------------------


def _tolerates(tolerations: list[dict], key: str, value: str, effect: str) -> bool:
    """Kubernetes' matching of a toleration against a taint."""
    for t in tolerations:
        if t.get("effect") and t["effect"] != effect:
            continue
        operator = t.get("operator", "Equal")
        if not t.get("key"):
            if operator == "Exists":
                return True
            continue
        if t["key"] != key:
            continue
        if operator == "Exists" or t.get("value", "") == value:
            return True
    return False


@pytest.mark.parametrize("taint", TAINTS, ids=lambda t: t[0])
def test_agent_runs_on_tainted_nodes(taint):
    tolerations = agent_daemonset()["spec"]["template"]["spec"]["tolerations"]
    assert _tolerates(tolerations, *taint)


def test_toleration_matcher_rejects_unrelated_toleration():
    only_gpu = [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert not _tolerates(only_gpu, "node-role.kubernetes.io/control-plane", "", "NoSchedule")


def test_agent_pod_shape():
    ds = agent_daemonset()
    pod = ds["spec"]["template"]["spec"]
    assert ds["metadata"]["namespace"] == "kube-system"
    assert pod["hostNetwork"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["serviceAccountName"] == "nodecryptor"
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"] == {"maxUnavailable": 1, "maxSurge": 0}
    # The agent's shutdown joins two threads for at most 5 s each and removes nothing.
    assert 10 < pod["terminationGracePeriodSeconds"] <= 30


def test_node_name_from_downward_api():
    container = agent_container()
    env = {e["name"]: e for e in container["env"]}
    assert env["NODE_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"
    assert "--node-name=$(NODE_NAME)" in container["args"]


def _parsed_agent_args():
    container = agent_container()
    assert "command" not in container, "the image's entry point must stay in charge"
    argv = [expand_env(a, {"NODE_NAME": "worker-1"}) for a in container["args"]]
    args = build_parser().parse_args(argv)
    return args, settings_from_args(args)


def test_agent_args_parse_with_the_real_cli():
    args, settings = _parsed_agent_args()
    assert args.command == "run"
    assert settings.node_name == "worker-1"
    assert settings.bpffs == "/sys/fs/bpf"
    assert settings.fail_mode in ("open", "closed")


def _mount(container: dict, volumes: dict, path: str) -> tuple[dict, dict]:
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == path)
    return mount, volumes[mount["name"]]


def test_host_mounts():
    container = agent_container()
    pod = agent_daemonset()["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    _, settings = _parsed_agent_args()

    bpffs, vol = _mount(container, volumes, settings.bpffs)
    assert vol["hostPath"]["path"] == "/sys/fs/bpf"
    propagation = bpffs.get("mountPropagation")
    assert propagation in ("HostToContainer", "Bidirectional")
    if propagation == "Bidirectional":
        assert container["securityContext"].get("privileged") is True, (
            "Kubernetes allows Bidirectional propagation only in privileged containers"
        )
    assert not bpffs.get("readOnly")
    for path in ("/lib/modules", "/usr/src"):
        mount, vol = _mount(container, volumes, path)
        assert mount["readOnly"] is True
        assert vol["hostPath"]["path"] == path
    if container["securityContext"].get("readOnlyRootFilesystem"):
        # Where the agent writes: BCC's kheaders unpacking, and the datapath choice record.
        for path in ("/tmp", Settings.run_dir):
            _, vol = _mount(container, volumes, path)
            assert "emptyDir" in vol, path


def test_probes_use_the_agent_health_port():
    container = agent_container()
    _, settings = _parsed_agent_args()
    _host, health_port = parse_bind(settings.health_bind)
    for probe, path in (
        ("livenessProbe", "/healthz"),
        ("readinessProbe", "/readyz"),
        ("startupProbe", "/healthz"),
    ):
        get = container[probe]["httpGet"]
        assert (get["path"], get["port"]) == (path, health_port), probe
    startup = container["startupProbe"]
    # The BCC compile took ~21 s in an emulated VM (vm-tests/README.md): allow five times that.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 105
    ports = {p["containerPort"] for p in container["ports"]}
    assert health_port in ports


def test_scrape_annotations_point_at_metrics_port():
    annotations = agent_daemonset()["spec"]["template"]["metadata"]["annotations"]
    _, settings = _parsed_agent_args()
    _host, metrics_port = parse_bind(settings.metrics_bind)
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port) == "8084"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert metrics_port in {p["containerPort"] for p in agent_container()["ports"]}


def test_security_context_is_capabilities_not_privileged():
    sc = agent_container()["securityContext"]
    assert not sc.get("privileged")
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sorted(sc["capabilities"]["add"]) == ["BPF", "NET_ADMIN", "PERFMON"]
    # Kubernetes rejects allowPrivilegeEscalation: false together with SYS_ADMIN.
    assert "SYS_ADMIN" not in sc["capabilities"]["add"]
    assert sc["allowPrivilegeEscalation"] is False


def test_resources_cover_the_measured_compile():
    resources = agent_container()["resources"]
    mib = {"Mi": 1, "Gi": 1024}

    def to_mib(q: str) -> int:
        return int(q[:-2]) * mib[q[-2:]]

    # 180 MiB peak RSS measured by tests/deploy/measure_startup.py.
    assert to_mib(resources["requests"]["memory"]) >= 180
    assert to_mib(resources["limits"]["memory"]) >= 2 * 180


def test_image_tag_is_the_package_version():
    for doc in DOCS:
        spec = doc.body.get("spec", {}).get("template", {}).get("spec", {})
        for c in spec.get("containers", []) + spec.get("initContainers", []):
            name, _, tag = c["image"].rpartition(":")
            if name == IMAGE_NAME:
                assert tag == __version__, f"{doc.id}: {c['image']}"


def test_cleanup_daemonset_runs_the_cleanup_command():
    ds = find(DOCS, "DaemonSet", "nodecryptor-cleanup")
    init = ds["spec"]["template"]["spec"]["initContainers"][0]
    args = build_parser().parse_args(init["args"])
    assert args.command == "cleanup"
    assert args.bpffs == "/sys/fs/bpf"
    assert sorted(init["securityContext"]["capabilities"]["add"]) == sorted(
        agent_container()["securityContext"]["capabilities"]["add"]
    )


# ---- RBAC ----------------------------------------------------------------------------------


def test_rbac_reads_ciliumnodes_nodes_and_exemptions_writes_only_node_status_and_events():
    docs = default_docs()
    role = find(docs, "ClusterRole", "nodecryptor")
    # The only write on Nodes is `patch` on the status subresource (NodeEncryptionReady):
    # never `patch nodes`, which would let the agent rewrite the role labels.
    assert role["rules"] == [
        {
            "apiGroups": ["cilium.io"],
            "resources": ["ciliumnodes"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "list", "watch"]},
        {
            "apiGroups": ["cilium.io"],
            "resources": ["ciliumpodippools"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["nodecryptor.io"],
            "resources": ["encryptionexemptions"],
            "verbs": ["get", "list", "watch"],
        },
        {"apiGroups": [""], "resources": ["nodes/status"], "verbs": ["patch"]},
    ]
    # Cilium's configuration: the one ConfigMap, read only, in Cilium's namespace.
    config = find(docs, "Role", "nodecryptor-cilium-config")
    assert config["metadata"]["namespace"] == "kube-system"
    assert config["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["cilium-config"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    config_binding = find(docs, "RoleBinding", "nodecryptor-cilium-config")
    assert config_binding["roleRef"]["name"] == "nodecryptor-cilium-config"
    # Events: create only, in "default" (where Node events live), through a Role.
    events = find(docs, "Role", "nodecryptor-events")
    assert events["metadata"]["namespace"] == "default"
    assert events["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    events_binding = find(docs, "RoleBinding", "nodecryptor-events")
    assert events_binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "Role",
        "name": events["metadata"]["name"],
    }
    assert events_binding["metadata"]["namespace"] == "default"
    binding = find(docs, "ClusterRoleBinding", "nodecryptor")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "nodecryptor",
    }
    account = find(docs, "ServiceAccount", "nodecryptor")
    ds = agent_daemonset()
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": ds["spec"]["template"]["spec"]["serviceAccountName"],
            "namespace": ds["metadata"]["namespace"],
        }
    ]
    assert events_binding["subjects"] == binding["subjects"]
    assert account["metadata"]["namespace"] == ds["metadata"]["namespace"]


def test_manifests_parse_as_yaml_documents():
    for path in manifest_files():
        assert load_docs(path), f"{path} holds no object"
    assert K8S.joinpath("kustomization.yaml").exists()
