"""Admission of a request under a ValidatingAdmissionPolicy, evaluated with cel-python, and
admission requests for Node writes shaped like the API server's, for the tests in this
directory. No test logic here.

cel-python is not the API server's CEL (cel-go with Kubernetes' libraries). Differences that
matter here, and how the policy stays within what both agree on:
- cel-python does no type checking: Kubernetes declares ``request`` with a schema and
  ``object``/``oldObject``/``variables`` as dyn, and rejects a badly typed expression only when
  the policy is created. The expressions therefore use only map and list operations on the dyn
  objects, and on ``request`` only fields the AdmissionRequest type declares.
- Kubernetes refuses list literals of mixed types (homogeneous aggregate literals); cel-python
  accepts them. The policy has no list literals at all.
- cel-python evaluates both operands of ``||`` (as CEL's error rules allow) and then fails
  with a Python TypeError, not a CEL error, when a macro such as ``all`` is applied to null
  (``oldObject`` of a create). The policy never applies a macro to ``object`` or
  ``oldObject`` directly: it goes through variables that are empty maps unless the request is
  a status update.
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
from celpy import celtypes

from nodecryptor.cluster.condition import STRATEGIC_MERGE, condition_patch
from nodecryptor.policy.peerhealth import CONDITION_TYPE
from nodecryptor_testkit.fakeapi.nodestatus import patch_status

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


def admit(request: dict, policy: dict) -> Decision:
    """What the API server decides for ``request`` under ``policy`` (one binding, Deny)."""
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    activation = {
        "request": celpy.json_to_cel(request),
        "object": celpy.json_to_cel(request.get("object")),
        "oldObject": celpy.json_to_cel(request.get("oldObject")),
    }
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
                var["expression"], {**activation, "variables": variables}
            )
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
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "uid": f"uid-{name}",
            "resourceVersion": "4711",
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"},
            "annotations": {"node.alpha.kubernetes.io/ttl": "0"},
            "managedFields": [
                {
                    "manager": "kubelet",
                    "operation": "Update",
                    "apiVersion": "v1",
                    "time": "2026-01-01T00:00:00Z",
                    "subresource": "status",
                    "fieldsType": "FieldsV1",
                    "fieldsV1": {"f:status": {}},
                }
            ],
        },
        "spec": {
            "podCIDR": "10.244.1.0/24",
            "podCIDRs": ["10.244.1.0/24"],
            "taints": [{"key": "dedicated", "value": "db", "effect": "NoSchedule"}],
        },
        "status": {
            "addresses": [
                {"type": "InternalIP", "address": "192.0.2.11"},
                {"type": "Hostname", "address": name},
            ],
            "capacity": {"cpu": "2", "memory": "4005400Ki", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "3903000Ki", "pods": "110"},
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": "",
                    "lastHeartbeatTime": "2026-01-01T00:05:00Z",
                    "lastTransitionTime": "2026-01-01T00:00:00Z",
                }
                for t, s, r in (
                    ("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                    ("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                    ("PIDPressure", "False", "KubeletHasSufficientPID"),
                    ("Ready", "True", "KubeletReady"),
                )
            ],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {"kubeletVersion": "v1.33.1", "osImage": "Debian GNU/Linux 12"},
        },
    }


def with_own_condition(obj: dict, status: str = "False") -> dict:
    obj = copy.deepcopy(obj)
    obj["status"]["conditions"].append(
        {
            "type": CONDITION_TYPE,
            "status": status,
            "reason": "Starting",
            "message": "",
            "lastHeartbeatTime": "2026-01-01T00:05:00Z",
            "lastTransitionTime": "2026-01-01T00:05:00Z",
        }
    )
    return obj


def agent_write(
    old: dict, status: str = "True", reason: str = "Ready", content_type: str = STRATEGIC_MERGE
) -> dict:
    """The Node after the agent's real patch body (cluster.condition.condition_patch),
    sent with the agent's patch type and merged by the fake API server's nodes/status PATCH
    (strategic merge: status.conditions merges by ``type``), plus the entry the API server's
    field manager adds to managedFields for the writer."""
    patch = condition_patch(
        CONDITION_TYPE,
        status,
        reason,
        "WireGuard up",
        "2026-01-01T01:00:00Z",
        "2026-01-01T01:00:00Z",
    )
    assert set(patch) == {"status"} and set(patch["status"]) == {"conditions"}
    new = patch_status(old, content_type, patch)
    # The fake keeps the stored metadata whole; the real server lets it through the status
    # subresource (the policy's business) and records the writer here.
    new["metadata"]["managedFields"] = old["metadata"]["managedFields"] + [
        {
            "manager": "nodecryptor",
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-01-01T01:00:00Z",
            "subresource": "status",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:conditions": {}}},
        }
    ]
    return new


def request(
    obj: dict | None,
    old: dict | None,
    *,
    operation: str = "UPDATE",
    sub_resource: str | None = "status",
    username: str = AGENT,
    bound_node: str | None = "worker-1",
) -> dict:
    """An AdmissionRequest as the API server hands it to CEL: fields that are empty in Go
    (``omitempty``) are absent, and the user's extra values are lists of strings."""
    name = (obj or old)["metadata"]["name"]
    extra = {
        "authentication.kubernetes.io/pod-name": ["nodecryptor-abcde"],
        "authentication.kubernetes.io/pod-uid": ["0f3c9c3e-0000-4000-8000-000000000001"],
        "authentication.kubernetes.io/credential-id": ["JTI=1b2c"],
    }
    if bound_node is not None:
        extra[NODE_NAME_KEY] = [bound_node]
        extra["authentication.kubernetes.io/node-uid"] = [f"uid-{bound_node}"]
    req = {
        "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
        "kind": {"group": "", "version": "v1", "kind": "Node"},
        "resource": {"group": "", "version": "v1", "resource": "nodes"},
        "requestKind": {"group": "", "version": "v1", "kind": "Node"},
        "requestResource": {"group": "", "version": "v1", "resource": "nodes"},
        "name": name,
        "operation": operation,
        "userInfo": {
            "username": username,
            "uid": "sa-uid",
            "groups": [
                "system:serviceaccounts",
                "system:serviceaccounts:kube-system",
                "system:authenticated",
            ],
            "extra": extra,
        },
        "object": obj,
        "oldObject": old,
        "dryRun": False,
    }
    if sub_resource:
        req["subResource"] = req["requestSubResource"] = sub_resource
    return req
