import ipaddress

import pytest

from nodecryptor.policy.ciliumnode import parse_ciliumnode

from tests.cilium_objects import KUBEADM_CP, W1, copy_of


def test_extracts_only_what_the_policy_needs():
    info, rejections = parse_ciliumnode(KUBEADM_CP)
    assert rejections == []
    assert info.name == "cp1"
    assert dict(info.labels)["node-role.kubernetes.io/control-plane"] == ""
    assert ("InternalIP", ipaddress.ip_address("192.168.50.10")) in info.addresses
    assert ("CiliumInternalIP", ipaddress.ip_address("10.244.0.5")) in info.addresses
    assert info.pod_cidrs == (
        ipaddress.ip_network("10.244.0.0/24"),
        ipaddress.ip_network("fd00:10:244::/64"),
    )
    assert info.wg_public_key.endswith("=")


def test_partly_invalid_object_keeps_valid_entries():
    obj = copy_of(W1)
    obj["spec"]["addresses"].insert(0, {"ip": "300.1.2.3", "type": "InternalIP"})
    obj["spec"]["addresses"].append({"ip": 42, "type": "InternalIP"})
    obj["spec"]["addresses"].append("not-a-map")
    obj["spec"]["addresses"].append({"ip": "0.0.0.0", "type": "InternalIP"})
    obj["spec"]["ipam"]["podCIDRs"] += ["10.244.300.0/24", None, "0.0.0.0/0"]
    obj["metadata"]["annotations"]["network.cilium.io/wg-pub-key"] = "short"
    info, rejections = parse_ciliumnode(obj)
    fields = sorted(r.field for r in rejections)
    assert fields == sorted(
        [
            "spec.addresses[0].ip",
            "spec.addresses[4].ip",
            "spec.addresses[5]",
            "spec.addresses[6].ip",
            "spec.ipam.podCIDRs[2]",
            "spec.ipam.podCIDRs[3]",
            "spec.ipam.podCIDRs[4]",
            "metadata.annotations[network.cilium.io/wg-pub-key]",
        ]
    )
    assert [str(a) for _, a in info.addresses] == ["192.168.50.21", "fd50::21", "10.244.1.9"]
    assert [str(c) for c in info.pod_cidrs] == ["10.244.1.0/24", "fd00:10:244:1::/64"]
    assert info.wg_public_key is None
    assert all("w1" in str(r) for r in rejections)


@pytest.mark.parametrize(
    "mutate,field",
    [
        (lambda o: o.__setitem__("spec", "oops"), "spec"),
        (lambda o: o["spec"].__setitem__("addresses", {"ip": "1.2.3.4"}), "spec.addresses"),
        (lambda o: o["spec"]["ipam"].__setitem__("podCIDRs", "10.0.0.0/8"), "spec.ipam.podCIDRs"),
        (lambda o: o["metadata"].__setitem__("labels", ["a"]), "metadata.labels"),
        (
            lambda o: o["spec"]["addresses"].extend(
                [{"ip": f"10.9.{i // 250}.{i % 250 + 1}", "type": "InternalIP"} for i in range(100)]
            ),
            "spec.addresses",
        ),
    ],
)
def test_wrong_types_and_absurd_sizes_are_rejected_not_raised(mutate, field):
    obj = copy_of(W1)
    mutate(obj)
    info, rejections = parse_ciliumnode(obj)
    assert info is not None and info.name == "w1"
    assert field in {r.field for r in rejections}


@pytest.mark.parametrize("obj", [None, [], "x", {}, {"metadata": {}}, {"metadata": {"name": 5}}])
def test_objects_without_a_name_are_rejected_whole(obj):
    info, rejections = parse_ciliumnode(obj)
    assert info is None and len(rejections) == 1


def test_missing_spec_is_a_node_without_destinations():
    info, rejections = parse_ciliumnode({"metadata": {"name": "bare"}})
    assert rejections == [] and info.addresses == () and info.pod_cidrs == ()
