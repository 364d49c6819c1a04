"""The ValidatingAdmissionPolicy that scopes the agent's Node status writes to its own Node's
NodeEncryptionReady condition (k8s/admissionpolicy-node-status.yaml): its CEL expressions, read
from the YAML file, evaluated with cel-python (see admission_requests.py for where it differs
from the API server's CEL) against admission requests shaped like the API server's, with the
agent's real condition patch applied the way the API server applies it."""

from __future__ import annotations

import copy
import json

import kubernetes_validate
import pytest
from kubernetes.client.exceptions import ApiException

import admission_requests
from admission_requests import (
    AGENT,
    NODE_NAME_KEY,
    Decision,
    agent_write,
    node,
    request,
    with_own_condition,
)
from deploy_manifests import agent_daemonset, default_docs, find
from nodecryptor.cluster.condition import NodeConditionWriter
from nodecryptor.cluster.k8s_errors import ApiForbidden
from nodecryptor.core.settings import Settings
from nodecryptor.policy.peerhealth import CONDITION_TYPE, Condition
from nodecryptor_testkit.fakeapi.nodestatus import MERGE

POLICY = find(default_docs(), "ValidatingAdmissionPolicy", "nodecryptor-node-status")
BINDING = find(default_docs(), "ValidatingAdmissionPolicyBinding", "nodecryptor-node-status")


def admit(req: dict, policy: dict = POLICY) -> Decision:
    return admission_requests.admit(req, policy)


def denied_by(decision: Decision, words: str) -> None:
    """Denied (not by an evaluation error), one of the messages containing ``words``."""
    assert decision.matched and not decision.allowed
    assert not decision.errors, decision.errors
    assert any(words in m for m in decision.denied), decision.denied


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


def test_json_patch_replacing_the_entry_in_place_is_allowed():
    """RFC 6902 `replace /status/conditions/<i>` (or `add .../-` the first time) yields the
    same Node as the strategic merge; the policy judges the result, not the patch."""
    old = with_own_condition(node("worker-1"), "False")
    new = copy.deepcopy(old)
    new["status"]["conditions"][-1] = {
        "type": CONDITION_TYPE,
        "status": "True",
        "reason": "EncryptionReady",
        "message": "",
    }
    assert admit(request(new, old)).allowed
    fresh = node("worker-1")
    new = copy.deepcopy(fresh)
    new["status"]["conditions"].append({"type": CONDITION_TYPE, "status": "True"})
    assert admit(request(new, fresh)).allowed


def test_a_json_merge_patch_of_the_conditions_is_denied():
    """A JSON merge patch replaces the whole list, dropping the kubelet's conditions: were
    the agent ever to send one, the policy refuses it instead of letting it wipe Ready."""
    old = with_own_condition(node("worker-1"))
    new = agent_write(old, content_type=MERGE)
    assert [c["type"] for c in new["status"]["conditions"]] == [CONDITION_TYPE]
    denied_by(admit(request(new, old)), "no condition but NodeEncryptionReady")


def test_node_without_conditions_gets_its_first():
    old = node("worker-1")
    del old["status"]["conditions"]
    decision = admit(request(agent_write(old), old))
    assert decision.allowed, decision


# ---- everything else the agent's token might try is denied -----------------------------------


def test_other_node_is_denied():
    old = with_own_condition(node("worker-2"))
    decision = admit(request(agent_write(old), old, bound_node="worker-1"))
    denied_by(decision, "nodecryptor on node worker-1 may not change the status of node worker-2")


@pytest.mark.parametrize(
    "change, words",
    [
        (
            lambda n: n["metadata"]["labels"].update({"node-role.kubernetes.io/control-plane": ""}),
            "labels, annotations or other metadata",
        ),
        (
            lambda n: n["metadata"]["labels"].pop("kubernetes.io/os"),
            "labels, annotations or other metadata",
        ),
        (
            lambda n: n["metadata"]["annotations"].update({"cilium.io/wg-pub-key": "forged"}),
            "labels, annotations or other metadata",
        ),
        (
            lambda n: n["metadata"].update({"finalizers": ["example.com/hold"]}),
            "labels, annotations or other metadata",
        ),
        (lambda n: n["spec"]["taints"].clear(), "a Node's spec"),
        (lambda n: n["spec"].update({"unschedulable": True}), "a Node's spec"),
        (
            lambda n: n["status"]["addresses"].__setitem__(
                0, {"type": "InternalIP", "address": "203.0.113.9"}
            ),
            "no status field but",
        ),
        (lambda n: n["status"].pop("addresses"), "no status field but"),
        (lambda n: n["status"]["capacity"].update({"pods": "1000"}), "no status field but"),
        (lambda n: n["status"].update({"phase": "Running"}), "no status field but"),
        (
            lambda n: n["status"]["conditions"][3].update({"status": "False", "reason": "Forged"}),
            "no condition but NodeEncryptionReady",
        ),
        (lambda n: n["status"]["conditions"].pop(0), "no condition but NodeEncryptionReady"),
        (
            lambda n: n["status"]["conditions"].append(
                {"type": "NetworkUnavailable", "status": "True"}
            ),
            "no condition but NodeEncryptionReady",
        ),
        (lambda n: n["status"]["conditions"].reverse(), "no condition but NodeEncryptionReady"),
        (
            lambda n: n["status"]["conditions"].append({"type": CONDITION_TYPE, "status": "True"}),
            "at most once",
        ),
        (lambda n: n["status"]["conditions"][-1].update({"status": "Yes"}), "at most once"),
    ],
    ids=[
        "label-added",
        "label-removed",
        "annotation",
        "finalizer",
        "taints",
        "unschedulable",
        "address",
        "addresses-removed",
        "capacity",
        "new-status-field",
        "ready-condition",
        "condition-removed",
        "condition-added",
        "conditions-reordered",
        "own-condition-twice",
        "own-condition-bad-status",
    ],
)
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


@pytest.mark.parametrize(
    "operation, sub_resource, has_obj, has_old",
    [
        ("UPDATE", None, True, True),  # PATCH/PUT of the Node itself
        ("CREATE", None, True, False),
        ("DELETE", None, False, True),
    ],
)
def test_anything_but_a_status_update_is_denied(operation, sub_resource, has_obj, has_old):
    old = with_own_condition(node("worker-1"))
    req = request(
        agent_write(old) if has_obj else None,
        old if has_old else None,
        operation=operation,
        sub_resource=sub_resource,
    )
    denied_by(admit(req), "only update the status subresource")


# ---- who is judged ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "username",
    [
        "system:serviceaccount:kube-system:cilium",
        "system:serviceaccount:default:nodecryptor",
        "system:node:worker-2",
        "kubernetes-admin",
    ],
)
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
    policy["spec"]["validations"] = [
        {"expression": "object.metadata.name == 'elsewhere'", "message": "false"},
        {"expression": "object.nosuchfield == 1"},
    ]
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


# ---- the manifest -----------------------------------------------------------------------


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
    account = f"system:serviceaccount:{ds['metadata']['namespace']}:{pod['serviceAccountName']}"
    assert account == AGENT
    [cond] = spec["matchConditions"]
    assert f"'{account}'" in cond["expression"]
    # The condition the policy protects is the one the agent writes.
    assert f"'{CONDITION_TYPE}'" in " ".join(v["expression"] for v in spec["variables"])


# ---- what an operator sees when the policy refuses the agent ---------------------------------


class _Response:
    def __init__(self, body: dict):
        self.data = json.dumps(body).encode()

    def release_conn(self) -> None:
        pass


class _RefusingCore:
    """CoreV1Api as an API server answers a write the policy denies (403, the policy's
    message in the Status body), e.g. on a cluster whose tokens carry no node name."""

    def __init__(self, message: str):
        self.message = message
        self.patches = 0

    def read_node(self, name, **_kw):
        return _Response(with_own_condition(node(name)))

    def patch_node_status(self, name, body, **_kw):
        self.patches += 1
        err = ApiException(status=403, reason="Forbidden")
        err.body = json.dumps(
            {
                "kind": "Status",
                "status": "Failure",
                "reason": "Forbidden",
                "code": 403,
                "message": self.message,
            }
        )
        raise err


def test_a_refused_write_is_reported_with_the_policys_reason_and_retried():
    old = with_own_condition(node("worker-1"))
    decision = admit(request(agent_write(old), old, bound_node=None))
    message = (
        f"ValidatingAdmissionPolicy '{POLICY['metadata']['name']}' with binding "
        f"'{BINDING['metadata']['name']}' denied request: {decision.denied[0]}"
    )
    core = _RefusingCore(message)
    writer = NodeConditionWriter(Settings(node_name="worker-1"), CONDITION_TYPE)
    writer.submit(Condition("True", "EncryptionReady", "all good"))
    with pytest.raises(ApiForbidden) as refused:
        writer.step(core)
    # The agent's warning ("node condition write failed; will retry") carries this text.
    assert "names no node" in str(refused.value) and "403" in str(refused.value)
    assert core.patches == 1 and writer.writes == 0


@pytest.mark.parametrize("body", [POLICY, BINDING], ids=lambda b: b["kind"])
def test_policy_objects_exist_from_kubernetes_1_30(body):
    """admissionregistration.k8s.io/v1 policies are in the 1.30 schema (and later ones, see
    test_deploy_manifests.py), not in 1.29's: what the operator guide says."""
    kubernetes_validate.validate(body, "1.30.0", strict=True)
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(body, "1.29.0", strict=True)


def test_every_node_write_the_agent_is_granted_is_judged_by_the_policy():
    """RBAC grants `patch nodes/status` on every Node; each write on Nodes that the
    ClusterRole grants (today that one) falls under the policy's match."""
    role = find(default_docs(), "ClusterRole", "nodecryptor")
    writes = {"create", "update", "patch", "delete", "deletecollection", "*"}
    granted = [
        (res, verb)
        for rule in role["rules"]
        if "" in rule["apiGroups"]
        for res in rule["resources"]
        for verb in rule["verbs"]
        if verb in writes and (res == "nodes" or res.startswith("nodes/"))
    ]
    assert granted == [("nodes/status", "patch")]
    [match] = POLICY["spec"]["matchConstraints"]["resourceRules"]
    for res, _verb in granted:
        assert res in match["resources"] or (
            res.startswith("nodes/") and "nodes/*" in match["resources"]
        )
