"""The ValidatingAdmissionPolicy that scopes the agent's Node status writes to its own Node's
NodeEncryptionReady condition (k8s/admissionpolicy-node-status.yaml): its CEL expressions, read
from the YAML file, evaluated with cel-python against admission requests shaped like the API
server's, and the agent's real condition patch applied the way the API server applies it.

cel-python is not the API server's CEL (cel-go with Kubernetes' libraries). Differences that
matter here, and how the policy stays within what both agree on:
- cel-python does no type checking: Kubernetes declares ``request`` with a schema and
  ``object``/``oldObject``/``variables`` as dyn, and rejects a badly typed expression only when
  the policy is created. The expressions therefore use only map and list operations on the dyn
  objects, and on ``request`` only fields the AdmissionRequest type declares.
- Kubernetes refuses list literals of mixed types (homogeneous aggregate literals); cel-python
  accepts them. The policy has no list literals at all.
- Kubernetes evaluates variables lazily; this harness evaluates them all, in order, before the
  validations, and counts an error in any of them as a failed request (failurePolicy Fail).
  That is stricter than the API server, never laxer.
- Kubernetes' extension libraries (optional types, sets, regex, quantity) and cost limits are
  absent from cel-python; the policy uses none of the libraries.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import celpy
import pytest
from celpy import celtypes

from deploy_manifests import agent_daemonset, default_docs, find
from nodecryptor.cluster.k8s import condition_patch
from nodecryptor.policy.peerhealth import CONDITION_TYPE

POLICY = find(default_docs(), "ValidatingAdmissionPolicy", "nodecryptor-node-status")
BINDING = find(default_docs(), "ValidatingAdmissionPolicyBinding", "nodecryptor-node-status")
NODE_NAME_KEY = "authentication.kubernetes.io/node-name"
AGENT = "system:serviceaccount:kube-system:nodecryptor"
ENV = celpy.Environment()


# ---- the evaluator ---------------------------------------------------------------------------

@dataclass
class Decision:
    matched: bool
    denied: list[str] = field(default_factory=list)
    """The message of every validation that failed (messageExpression when it evaluates)."""
    errors: list[str] = field(default_factory=list)
    """Expressions that could not be evaluated: with failurePolicy Fail, each denies."""

    @property
    def allowed(self) -> bool:
        return not self.matched or not (self.denied or self.errors)


def _program(expression: str):
    return ENV.program(ENV.compile(expression))


def _run(expression: str, activation: dict):
    return _program(expression).evaluate(activation)


def admit(request: dict, policy: dict = POLICY) -> Decision:
    """What the API server decides for ``request`` under ``policy`` (one binding, Deny)."""
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    activation = {"request": celpy.json_to_cel(request),
                  "object": celpy.json_to_cel(request.get("object")),
                  "oldObject": celpy.json_to_cel(request.get("oldObject"))}
    for cond in spec.get("matchConditions", []):
        try:
            if not _run(cond["expression"], activation):
                return Decision(matched=False)
        except celpy.CELEvalError as e:
            return Decision(matched=True, errors=[f"matchCondition {cond['name']}: {e}"])
    decision = Decision(matched=True)
    variables = celtypes.MapType({})
    for var in spec.get("variables", []):
        try:
            variables[celtypes.StringType(var["name"])] = _run(
                var["expression"], {**activation, "variables": variables})
        except celpy.CELEvalError as e:
            decision.errors.append(f"variable {var['name']}: {e}")
            return decision
    activation["variables"] = variables
    for rule in spec["validations"]:
        try:
            ok = _run(rule["expression"], activation)
        except celpy.CELEvalError as e:
            decision.errors.append(f"{rule['expression']}: {e}")
            continue
        assert isinstance(ok, celtypes.BoolType), f"not a bool: {rule['expression']}"
        if not ok:
            message = rule.get("message", "")
            if "messageExpression" in rule:
                try:
                    message = str(_run(rule["messageExpression"], activation))
                except celpy.CELEvalError:
                    pass  # the API server falls back to the static message too
            decision.denied.append(message)
    return decision


# ---- admission requests as the API server builds them ---------------------------------------

def node(name: str) -> dict:
    """A Node as a kubeadm worker's kubelet keeps it (trimmed, but every kind of field)."""
    return {
        "apiVersion": "v1", "kind": "Node",
        "metadata": {
            "name": name, "uid": f"uid-{name}", "resourceVersion": "4711",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": [{"manager": "kubelet", "operation": "Update", "apiVersion": "v1",
                               "time": "2026-01-01T00:00:00Z", "subresource": "status",
                               "fieldsType": "FieldsV1", "fieldsV1": {"f:status": {}}}]},
        "spec": {"podCIDR": "10.244.1.0/24", "podCIDRs": ["10.244.1.0/24"],
                 "taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}]},
        "status": {
            "addresses": [{"type": "InternalIP", "address": "192.0.2.11"},
                          {"type": "Hostname", "address": name}],
            "capacity": {"cpu": "2", "memory": "4005400Ki", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "3903000Ki", "pods": "110"},
            "conditions": [
                {"type": t, "status": s, "reason": r, "message": "",
                 "lastHeartbeatTime": "2026-01-01T00:05:00Z",
                 "lastTransitionTime": "2026-01-01T00:00:00Z"}
                for t, s, r in (("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                                ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                                ("PIDPressure", "False", "KubeletHasSufficientPID"),
                                ("Ready", "True", "KubeletReady"))],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": "v1.33.1", "osImage": "Debian GNU/Linux 12"},
        },
    }


def with_own_condition(obj: dict, status: str = "False") -> dict:
    obj = copy.deepcopy(obj)
    obj["status"]["conditions"].append(
        {"type": CONDITION_TYPE, "status": status, "reason": "Starting", "message": "",
         "lastHeartbeatTime": "2026-01-01T00:05:00Z",
         "lastTransitionTime": "2026-01-01T00:05:00Z"})
    return obj


def agent_write(old: dict, status: str = "True", reason: str = "Ready") -> dict:
    """The Node after the agent's real patch (nodecryptor.cluster.k8s.condition_patch),
    applied as a strategic merge patch: status.conditions merges by ``type`` (an entry of
    the patch replaces the fields it names in the entry of that type, or is appended), and the
    API server's field manager records the writer in managedFields."""
    patch = condition_patch(CONDITION_TYPE, status, reason, "WireGuard up",
                            "2026-01-01T01:00:00Z", "2026-01-01T01:00:00Z")
    assert set(patch) == {"status"} and set(patch["status"]) == {"conditions"}
    new = copy.deepcopy(old)
    conditions = new["status"].setdefault("conditions", [])
    for entry in patch["status"]["conditions"]:
        same = [c for c in conditions if c.get("type") == entry["type"]]
        if same:
            same[0].update(entry)
        else:
            conditions.append(dict(entry))
    new["metadata"]["managedFields"] = old["metadata"]["managedFields"] + [
        {"manager": "nodecryptor", "operation": "Update", "apiVersion": "v1",
         "time": "2026-01-01T01:00:00Z", "subresource": "status", "fieldsType": "FieldsV1",
         "fieldsV1": {"f:status": {"f:conditions": {}}}}]
    return new


def request(obj: dict | None, old: dict | None, *, operation: str = "UPDATE",
            sub_resource: str | None = "status", username: str = AGENT,
            bound_node: str | None = "worker-1") -> dict:
    """An AdmissionRequest as the API server hands it to CEL: fields that are empty in Go
    (``omitempty``) are absent, and the user's extra values are lists of strings."""
    name = (obj or old)["metadata"]["name"]
    extra = {"authentication.kubernetes.io/pod-name": ["nodecryptor-abcde"],
             "authentication.kubernetes.io/pod-uid": ["0f3c9c3e-0000-4000-8000-000000000001"],
             "authentication.kubernetes.io/credential-id": ["JTI=1b2c"]}
    if bound_node is not None:
        extra[NODE_NAME_KEY] = [bound_node]
        extra["authentication.kubernetes.io/node-uid"] = [f"uid-{bound_node}"]
    req = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Node"},
        "resource": {"group": "", "version": "v1", "resource": "nodes"},
        "requestKind": {"group": "", "version": "v1", "kind": "Node"},
        "requestResource": {"group": "", "version": "v1", "resource": "nodes"},
        "name": name, "operation": operation,
        "userInfo": {"username": username, "uid": "sa-uid",
                     "groups": ["system:serviceaccounts", "system:serviceaccounts:kube-system",
                                "system:authenticated"],
                     "extra": extra},
        "object": obj, "oldObject": old, "dryRun": False,
    }
    if sub_resource:
        req["subResource"] = req["requestSubResource"] = sub_resource
    return req


# ---- the agent's own write is admitted ---------------------------------------------------------

def test_own_node_condition_update_is_allowed():
    old = with_own_condition(node("worker-1"), "False")
    decision = admit(request(agent_write(old, "True"), old))
    assert decision.matched and decision.allowed, decision


def test_condition_added_the_first_time_is_allowed():
    old = node("worker-1")
    new = agent_write(old)
    assert [c["type"] for c in new["status"]["conditions"]][-1] == CONDITION_TYPE
    decision = admit(request(new, old))
    assert decision.matched and decision.allowed, decision


def test_node_without_conditions_gets_its_first():
    old = node("worker-1")
    del old["status"]["conditions"]
    decision = admit(request(agent_write(old), old))
    assert decision.allowed, decision


# ---- everything else the agent's token might try is denied -----------------------------------

def denied_by(decision: Decision, words: str) -> None:
    assert decision.matched and not decision.allowed
    assert not decision.errors, decision.errors
    assert any(words in m for m in decision.denied), decision.denied


def test_other_node_is_denied():
    old = with_own_condition(node("worker-2"))
    decision = admit(request(agent_write(old), old, bound_node="worker-1"))
    denied_by(decision, "nodecryptor on node worker-1 may not change the status of node worker-2")


@pytest.mark.parametrize("change, words", [
    (lambda n: n["metadata"]["labels"].update({"node-role.kubernetes.io/control-plane": ""}),
     "labels, annotations or other metadata"),
    (lambda n: n["metadata"]["labels"].pop("kubernetes.io/os"),
     "labels, annotations or other metadata"),
    (lambda n: n["metadata"]["annotations"].update({"cilium.io/wg-pub-key": "forged"}),
     "labels, annotations or other metadata"),
    (lambda n: n["metadata"].update({"finalizers": ["example.com/hold"]}),
     "labels, annotations or other metadata"),
    (lambda n: n["spec"]["taints"].clear(), "spec"),
    (lambda n: n["spec"].update({"unschedulable": True}), "spec"),
    (lambda n: n["status"]["addresses"].__setitem__(0, {"type": "InternalIP",
                                                        "address": "203.0.113.9"}),
     "no status field but"),
    (lambda n: n["status"].pop("addresses"), "no status field but"),
    (lambda n: n["status"]["capacity"].update({"pods": "1000"}), "no status field but"),
    (lambda n: n["status"].update({"phase": "Running"}), "no status field but"),
    (lambda n: n["status"]["conditions"][3].update({"status": "False", "reason": "Forged"}),
     "no condition but NodeEncryptionReady"),
    (lambda n: n["status"]["conditions"].pop(0), "no condition but NodeEncryptionReady"),
    (lambda n: n["status"]["conditions"].append({"type": "NetworkUnavailable",
                                                 "status": "True"}),
     "no condition but NodeEncryptionReady"),
    (lambda n: n["status"]["conditions"].reverse(), "no condition but NodeEncryptionReady"),
    (lambda n: n["status"]["conditions"].append({"type": CONDITION_TYPE, "status": "True"}),
     "at most once"),
    (lambda n: n["status"]["conditions"][-1].update({"status": "Yes"}), "at most once"),
], ids=["label-added", "label-removed", "annotation", "finalizer", "taints", "unschedulable",
        "address", "addresses-removed", "capacity", "new-status-field", "ready-condition",
        "condition-removed", "condition-added", "conditions-reordered", "own-condition-twice",
        "own-condition-bad-status"])
def test_own_node_anything_but_the_condition_is_denied(change, words):
    """The agent's own write plus one more change, on its own Node."""
    old = with_own_condition(node("worker-1"))
    new = agent_write(old)
    change(new)
    denied_by(admit(request(new, old)), words)


def test_token_without_node_name_is_denied():
    old = with_own_condition(node("worker-1"))
    denied_by(admit(request(agent_write(old), old, bound_node=None)), "names no node")
    # A user info without any extra at all (the field is then absent, not empty).
    req = request(agent_write(old), old, bound_node=None)
    del req["userInfo"]["extra"]
    denied_by(admit(req), "names no node")


def test_token_with_several_node_names_is_denied():
    old = with_own_condition(node("worker-1"))
    req = request(agent_write(old), old)
    req["userInfo"]["extra"][NODE_NAME_KEY] = ["worker-1", "worker-2"]
    denied_by(admit(req), "names no node")


@pytest.mark.parametrize("operation, sub_resource, has_obj, has_old", [
    ("UPDATE", None, True, True),      # PATCH/PUT of the Node itself
    ("CREATE", None, True, False),
    ("DELETE", None, False, True),
])
def test_anything_but_a_status_update_is_denied(operation, sub_resource, has_obj, has_old):
    old = with_own_condition(node("worker-1"))
    req = request(agent_write(old) if has_obj else None, old if has_old else None,
                  operation=operation, sub_resource=sub_resource)
    denied_by(admit(req), "only update the status subresource")


# ---- who is judged ------------------------------------------------------------------------------

@pytest.mark.parametrize("username", [
    "system:serviceaccount:kube-system:cilium",
    "system:serviceaccount:default:nodecryptor",
    "system:node:worker-2",
    "kubernetes-admin",
])
def test_other_writers_are_not_matched(username):
    """The kubelet, Cilium and administrators are not judged by this policy, even for a
    write the agent would be refused (another Node's labels)."""
    old = node("worker-2")
    new = copy.deepcopy(old)
    new["metadata"]["labels"]["example.com/zone"] = "b"
    decision = admit(request(new, old, username=username, bound_node=None))
    assert not decision.matched and decision.allowed


def test_the_harness_can_deny_and_report_errors():
    """The evaluator is not vacuous: a validation that is false denies, and one that cannot
    be evaluated counts as an error (a denial under failurePolicy Fail)."""
    old = with_own_condition(node("worker-1"))
    req = request(agent_write(old), old)
    policy = copy.deepcopy(POLICY)
    policy["spec"]["validations"] = [{"expression": "object.metadata.name == 'elsewhere'",
                                      "message": "false"},
                                     {"expression": "object.nosuchfield == 1"}]
    decision = admit(req, policy)
    assert not decision.allowed
    assert decision.denied == ["false"] and len(decision.errors) == 1


def test_every_validation_denies_some_request():
    """No validation is dead weight: each one, evaluated alone, denies a request that the
    agent's own write would otherwise be (its case below), and the full policy reports it."""
    old = with_own_condition(node("worker-1"))

    def changed(fn):
        new = agent_write(old)
        fn(new)
        return request(new, old)

    other = with_own_condition(node("worker-2"))
    cases = [  # in the order of the validations in the YAML file
        request(agent_write(old), old, bound_node=None),
        request(agent_write(old), old, sub_resource=None),
        request(agent_write(other), other),
        changed(lambda n: n["spec"].update({"unschedulable": True})),
        changed(lambda n: n["metadata"]["labels"].update({"a": "b"})),
        changed(lambda n: n["status"].update({"phase": "x"})),
        changed(lambda n: n["status"]["conditions"].pop(0)),
        changed(lambda n: n["status"]["conditions"][-1].update({"status": "x"})),
    ]
    rules = POLICY["spec"]["validations"]
    assert len(cases) == len(rules)
    for rule, req in zip(rules, cases):
        alone = admit(req, _only(rule))
        assert not alone.allowed and not alone.errors, (rule["expression"], alone)
        full = admit(req)
        assert alone.denied[0] in full.denied, (alone, full)


def _only(rule: dict) -> dict:
    policy = copy.deepcopy(POLICY)
    policy["spec"]["validations"] = [rule]
    return policy


# ---- the manifest ---------------------------------------------------------------------------------

def test_policy_is_bound_denies_and_judges_only_the_agents_account():
    spec = POLICY["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert BINDING["spec"]["policyName"] == POLICY["metadata"]["name"]
    assert BINDING["spec"]["validationActions"] == ["Deny"]
    assert "matchResources" not in BINDING["spec"] and "paramRef" not in BINDING["spec"]
    [rule] = spec["matchConstraints"]["resourceRules"]
    assert rule["apiGroups"] == [""] and set(rule["resources"]) == {"nodes", "nodes/*"}
    assert set(rule["operations"]) == {"CREATE", "UPDATE", "DELETE"}
    # The matched username is the DaemonSet's service account, wherever it is deployed.
    ds = agent_daemonset()
    pod = ds["spec"]["template"]["spec"]
    account = (f"system:serviceaccount:{ds['metadata']['namespace']}:"
               f"{pod['serviceAccountName']}")
    assert account == AGENT
    [cond] = spec["matchConditions"]
    assert f"'{account}'" in cond["expression"]
    # The condition the policy protects is the one the agent writes.
    assert f"'{CONDITION_TYPE}'" in " ".join(v["expression"] for v in spec["variables"])
