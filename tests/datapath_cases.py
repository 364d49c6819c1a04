"""The datapath case table shared by both datapaths' tests.

One small cluster (``CLUSTER``: CiliumNode objects as Cilium writes them) and a table of packets
(``CASES``) with the verdict and reason every datapath must give them. The BPF packet tests run
every case through BPF_PROG_TEST_RUN; the ip-rule tests run the ``routable`` ones through the
kernel's route lookup. A new behaviour is one new row.

Helpers turn a case into the inputs a datapath needs (``snapshot``, ``settings_for``,
``wg_state_for``, ``desired_for``, ``source_address``), so every test builds them the same way.

``Case.extra`` carries what a PacketQuery cannot describe. Keys understood by the builders:

- ``ipv6_ext``: tuple of IPv6 extension header names before L4, in order
  (``"hop"``, ``"routing"``, ``"dest"``, ``"frag"``, ``"ah"``).
- ``frag``: dict(offset=<bytes, multiple of 8>, more=<bool>, id=<int>) — the packet is a
  fragment; offset 0 with more=True is a first fragment.
- ``first_fragment_seen``: True — the test first sends the first fragment of the same datagram
  (same src, dst, id, protocol; same ports) so a non-first fragment can follow its verdict.
- ``tcp_mss``: MSS option value put into a TCP SYN/SYN-ACK; ``expect_mss``: the MSS option
  value the packet must carry after the program (checksum valid).
- ``wg_down``: True — the WireGuard device is present but down.
- ``fail_mode``: ``"open"`` or ``"closed"`` (default closed).
- ``uncovered``: True — no WireGuard peer's allowed-IPs cover the destination.
- ``ethertype``: send a non-IP frame of this EtherType instead of an IP packet.
- ``truncate_l4``: True — the L4 header is cut after its first 4 bytes.
- ``disabled``: True — the configuration says disabled (nothing written yet).
- ``payload_len``: bytes of L4 payload (default 16).
- ``vlan``: the frame carries an inline 802.1Q tag with this VLAN id.
- ``take_over``: True — ``--take-over-pod-to-pod``: nodecryptor redirects local-pod to
  remote-pod traffic itself instead of leaving it to Cilium.
- ``tunnel``: True — Cilium runs in tunnel mode: peers' allowed-IPs hold node addresses only
  and ``cilium_vxlan`` exists.
- ``wg_mtu``: the MTU of cilium_wg0 (default WG_MTU).
- ``inbound_flow``: True — the peer opened this connection to the local control-plane node's
  exempt port (the BPF tests seed nc_flows with it, as nc_ingress would on the request).
- ``cb``: the frame arrives with skb->cb[0..4] holding these words, as Cilium's ``bpf_lxc``
  leaves them on pod packets it redirects to the underlay (a first fragment sent for
  ``first_fragment_seen`` carries them too). The verdict must not depend on them.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass, field

from nodecryptor.policy import cilium
from nodecryptor.policy.ciliumnode import parse_ciliumnode
from nodecryptor.policy.exemptions import parse_exemption
from nodecryptor.datapath.base import (
    VERDICT_DROP,
    VERDICT_ENCRYPT,
    VERDICT_EXEMPT,
    VERDICT_PASS,
    PacketQuery,
)
from nodecryptor.core.model import DesiredState, Device, NodeInfo, WgPeer, WgState
from nodecryptor.policy.plan import admission_limits, compute_desired, compute_plan
from nodecryptor.core.settings import Settings

CP_LABEL = "node-role.kubernetes.io/control-plane"
STORAGE_LABEL = "storage.example.com/iscsi"
STORAGE_PORT = 3260
# An EncryptionExemption (exemptions.py): w2 (the labelled worker) serves TCP 3260 to the
# workers; control-plane nodes are no clients. Every case's plan includes it.
POLICIES_OBJ = [
    {
        "apiVersion": "nodecryptor.io/v1alpha1",
        "kind": "EncryptionExemption",
        "metadata": {"name": "storage"},
        "spec": {
            "nodeSelector": {"matchLabels": {STORAGE_LABEL: "yes"}},
            "clientNodeSelector": {
                "matchExpressions": [{"key": CP_LABEL, "operator": "DoesNotExist"}]
            },
            "ports": [{"port": STORAGE_PORT}],
        },
    }
]
WG_PORT = 51871
WG_IFNAME = "cilium_wg0"
WG_MTU = 1420
UNDERLAY = Device(name="eth0", ifindex=2, mtu=1500)
# With WG_MTU 1420 on a 1500-byte underlay: payload min(1420, 1500 - 60 - 15) = 1420.
MSS_V4 = 1380
MSS_V6 = 1360
# Cilium since cilium/cilium#45940 sizes cilium_wg0 as the device MTU - 95: 1405 on 1500.
# Payload min(1405, 1500 - 60 - 15 = 1425) = 1405: MSS 1405 - 40 and 1405 - 60.
WG_MTU_95 = 1405
MSS_V4_95 = 1365
MSS_V6_95 = 1345
VXLAN_PORT = 8472
# The longest IPv6 extension-header chain both programs walk (NC_IPV6_EXT_MAX in
# bpf/lib/parse.h): as many headers as RFC 8200's recommended order has before the upper layer
# (hop-by-hop, destination, routing, fragment, AH, destination). One more hides the ports.
SIX_EXT = ("hop", "dest", "routing", "ah", "dest", "dest")

# Reason names (abi.REASON_NAMES values), spelled out so this table does not depend on the
# BPF package and the ip-rule tests can import it on machines without BCC.
R_DISABLED = "disabled"
R_WG_MARK = "wireguard-output"
R_NOT_IP = "not-ip"
R_NOT_CLUSTER = "not-cluster-destination"
R_ND = "ipv6-neighbour-discovery"
R_WG_PORT = "wireguard-port"
R_EXEMPT_DPORT = "exempt-control-plane-port"
R_EXEMPT_SPORT = "exempt-control-plane-reply"
R_ENCRYPT = "cluster-destination"
R_FRAG_EXEMPT = "fragment-of-exempt"
R_FRAG_ENCRYPT = "fragment-of-encrypted"
R_FRAG_UNKNOWN = "fragment-first-unseen"
R_WG_DOWN_DROP = "wireguard-down-fail-closed"
R_UNCOVERED_DROP = "no-peer-covers-fail-closed"
R_WG_DOWN_OPEN = "wireguard-down-fail-open"
R_UNCOVERED_OPEN = "no-peer-covers-fail-open"
R_MALFORMED = "malformed-cluster-packet"
R_CILIUM_POD = "cilium-pod-to-pod"

# Public keys as Cilium publishes them (base64 of 32 bytes); their values do not matter here.
_KEYS = {
    "cp1": "Y3AxLXB1YmxpYy1rZXktLS0tLS0tLS0tLS0tLS0tLS0=",
    "w1": "dzEtcHVibGljLWtleS0tLS0tLS0tLS0tLS0tLS0tLS0=",
    "w2": "dzItcHVibGljLWtleS0tLS0tLS0tLS0tLS0tLS0tLS0=",
}


def _ciliumnode(
    name: str,
    ipv4: str,
    ipv6: str,
    internal_ip: str,
    pod_v4: str,
    pod_v6: str,
    control_plane: bool,
    **extra_labels: str,
) -> dict:
    labels = {
        "kubernetes.io/arch": "amd64",
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
    }
    if control_plane:
        labels[CP_LABEL] = ""  # kubeadm sets the label with an empty value
        labels["node.kubernetes.io/exclude-from-external-load-balancers"] = ""
    labels.update(extra_labels)
    return {
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": {"network.cilium.io/wg-pub-key": _KEYS[name]},
            "ownerReferences": [
                {
                    "apiVersion": "v1",
                    "kind": "Node",
                    "name": name,
                    "uid": f"9d0c6f1e-0000-4000-8000-0000000000{len(name):02d}",
                }
            ],
            "resourceVersion": "4711",
        },
        "spec": {
            "addresses": [
                {"ip": ipv4, "type": "InternalIP"},
                {"ip": ipv6, "type": "InternalIP"},
                {"ip": internal_ip, "type": "CiliumInternalIP"},
            ],
            "encryption": {},
            "health": {
                "ipv4": internal_ip.replace(".1", ".2", 1) if "." in internal_ip else internal_ip
            },
            "ipam": {"podCIDRs": [pod_v4, pod_v6], "pools": {}},
        },
        "status": {"ipam": {"operator-status": {}}},
    }


CLUSTER = [
    _ciliumnode(
        "cp1",
        "192.168.50.10",
        "fd00:50::10",
        "10.244.0.1",
        "10.244.0.0/24",
        "fd00:244::/64",
        control_plane=True,
    ),
    _ciliumnode(
        "w1",
        "192.168.50.21",
        "fd00:50::21",
        "10.244.1.1",
        "10.244.1.0/24",
        "fd00:244:1::/64",
        control_plane=False,
    ),
    _ciliumnode(
        "w2",
        "192.168.50.22",
        "fd00:50::22",
        "10.244.2.1",
        "10.244.2.0/24",
        "fd00:244:2::/64",
        control_plane=False,
        **{STORAGE_LABEL: "yes"},
    ),
]

# Addresses used by the cases, named for readability.
CP1_V4, CP1_V6 = "192.168.50.10", "fd00:50::10"
W1_V4, W1_V6 = "192.168.50.21", "fd00:50::21"
W2_V4, W2_V6 = "192.168.50.22", "fd00:50::22"
CP1_POD_V4 = "10.244.0.5"
W1_POD_V4, W1_POD_V6 = "10.244.1.5", "fd00:244:1::5"
W2_POD_V4, W2_POD_V6 = "10.244.2.7", "fd00:244:2::7"
OUTSIDE_V4, OUTSIDE_V6 = "198.51.100.7", "2001:db8:77::7"


@dataclass(frozen=True)
class Case:
    id: str
    local_node: str
    query: PacketQuery
    expected_verdict: str
    expected_reason: str
    routable: bool = True
    """False when policy routing cannot express the case (non-first fragments, ND, marks...)."""
    why_not_routable: str = ""
    extra: dict = field(default_factory=dict)


def _c(id, local, verdict, reason, routable=True, why="", **q_and_extra):
    extra = q_and_extra.pop("extra", {})
    return Case(
        id=id,
        local_node=local,
        query=PacketQuery(**q_and_extra),
        expected_verdict=verdict,
        expected_reason=reason,
        routable=routable,
        why_not_routable=why,
        extra=extra,
    )


_E, _X, _P, _D = VERDICT_ENCRYPT, VERDICT_EXEMPT, VERDICT_PASS, VERDICT_DROP
_MARK_WHY = "a mark-only difference: WireGuard's own output is recognised by its fwmark"
_FRAG_WHY = "a non-first fragment carries no ports; routing decided on the whole datagram"
_ND_WHY = "ip rules cannot match ICMPv6 types"
_FLOW_WHY = (
    "ip rules have no connection state: the ip-rule datapath exempts replies by source "
    "port alone (documented)"
)

# skb->cb[0..4] as a pod packet may reach the head of the underlay's chain: words Cilium's
# bpf_lxc stored with ctx_store_meta (an identity, an ifindex, IPv6 address words), with the
# value nodecryptor once took for its dry-run marker in cb[2] ("NCDR") and, in cb[0], a word that
# looks like nodecryptor's own verdict record (magic | not-cluster-destination).
LXC_CB = (0x4E430003, 0x00003E8D, 0x4E434452, 0xFD000244, 0x00000007)
LXC_CB_RANDOM = (0x9F3A51C2, 0x00000002, 0x4E434452, 0x7D2E0C11, 0xFFFFFFFF)

CASES: list[Case] = [
    # --- IPv4 from a worker ------------------------------------------------------------------
    _c("v4-node-to-remote-node", "w1", _E, R_ENCRYPT, dst=W2_V4, dport=22),
    _c("v4-node-to-remote-pod", "w1", _E, R_ENCRYPT, dst=W2_POD_V4, dport=8080),
    _c("v4-pod-to-remote-node", "w1", _E, R_ENCRYPT, dst=W2_V4, src=W1_POD_V4, dport=10250),
    _c("v4-worker-to-cp-6443", "w1", _X, R_EXEMPT_DPORT, dst=CP1_V4, dport=6443),
    _c("v4-worker-to-cp-2378", "w1", _E, R_ENCRYPT, dst=CP1_V4, dport=2378),
    _c("v4-worker-to-cp-2379", "w1", _X, R_EXEMPT_DPORT, dst=CP1_V4, dport=2379),
    _c("v4-worker-to-cp-2380", "w1", _X, R_EXEMPT_DPORT, dst=CP1_V4, dport=2380),
    _c("v4-worker-to-cp-2381", "w1", _E, R_ENCRYPT, dst=CP1_V4, dport=2381),
    _c("v4-worker-to-cp-udp-6443", "w1", _E, R_ENCRYPT, dst=CP1_V4, proto="udp", dport=6443),
    _c("v4-worker-to-cp-sctp-2379", "w1", _E, R_ENCRYPT, dst=CP1_V4, proto="sctp", dport=2379),
    _c("v4-worker-to-cp-pod-6443", "w1", _E, R_ENCRYPT, dst=CP1_POD_V4, dport=6443),
    _c(
        "v4-worker-sport-6443-to-cp",
        "w1",
        _E,
        R_ENCRYPT,
        dst=CP1_V4,
        sport=6443,
        dport=40000,
        tcp_flags="SA",
    ),
    _c("v4-not-cluster", "w1", _P, R_NOT_CLUSTER, dst=OUTSIDE_V4, dport=443),
    _c("v4-not-cluster-underlay-neighbour", "w1", _P, R_NOT_CLUSTER, dst="192.168.50.99", dport=22),
    _c(
        "v4-wireguard-port",
        "w1",
        _P,
        R_WG_PORT,
        dst=W2_V4,
        proto="udp",
        sport=WG_PORT,
        dport=WG_PORT,
    ),
    _c(
        "v4-wireguard-sport-only",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        proto="udp",
        sport=WG_PORT,
        dport=40000,
    ),
    _c(
        "v4-mark-0x1e00",
        "w1",
        _P,
        R_WG_MARK,
        False,
        _MARK_WHY,
        dst=W2_V4,
        proto="udp",
        sport=40001,
        dport=40002,
        mark=0x1E00,
    ),
    _c(
        "v4-mark-0x0e00",
        "w1",
        _P,
        R_WG_MARK,
        False,
        _MARK_WHY,
        dst=W2_V4,
        proto="udp",
        sport=40001,
        dport=40002,
        mark=0x0E00,
    ),
    _c(
        "v4-mark-other",
        "w1",
        _E,
        R_ENCRYPT,
        False,
        _MARK_WHY,
        dst=W2_V4,
        proto="udp",
        sport=40001,
        dport=40002,
        mark=0x0200,
    ),
    _c("v4-icmp-echo", "w1", _E, R_ENCRYPT, dst=W2_V4, proto="icmp", icmp_type=8),
    _c("v4-sctp", "w1", _E, R_ENCRYPT, dst=W2_V4, proto="sctp", sport=5000, dport=5001),
    # --- IPv4 from the control-plane node ----------------------------------------------------
    _c(
        "v4-cp-reply-6443-from-node-ip",
        "cp1",
        _X,
        R_EXEMPT_SPORT,
        dst=W1_V4,
        src=CP1_V4,
        sport=6443,
        dport=40000,
        tcp_flags="SA",
        extra={"inbound_flow": True},
    ),
    _c(
        "v4-cp-reply-6443-to-worker-pod",
        "cp1",
        _X,
        R_EXEMPT_SPORT,
        dst=W1_POD_V4,
        src=CP1_V4,
        sport=6443,
        dport=40000,
        tcp_flags="A",
        extra={"inbound_flow": True},
    ),
    _c(
        "v4-cp-reply-6443-from-pod-ip",
        "cp1",
        _E,
        R_ENCRYPT,
        dst=W1_V4,
        src=CP1_POD_V4,
        sport=6443,
        dport=40000,
        tcp_flags="SA",
    ),
    _c(
        "v4-cp-reply-2380-from-node-ip",
        "cp1",
        _X,
        R_EXEMPT_SPORT,
        dst=W2_V4,
        src=CP1_V4,
        sport=2380,
        dport=40000,
        tcp_flags="A",
        extra={"inbound_flow": True},
    ),
    _c(
        "v4-cp-reply-2381-from-node-ip",
        "cp1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        src=CP1_V4,
        sport=2381,
        dport=40000,
        tcp_flags="A",
    ),
    _c(
        "v4-cp-reply-udp-6443",
        "cp1",
        _E,
        R_ENCRYPT,
        dst=W1_V4,
        src=CP1_V4,
        proto="udp",
        sport=6443,
        dport=40000,
    ),
    # A local process using source port 6443 towards any cluster destination is not
    # a reply to a flow a peer opened: encrypted (ip rules have no connection state).
    _c(
        "v4-cp-sport-6443-without-flow",
        "cp1",
        _E,
        R_ENCRYPT,
        False,
        _FLOW_WHY,
        dst=W1_V4,
        src=CP1_V4,
        sport=6443,
        dport=22,
    ),
    _c(
        "v4-cp-sport-2379-to-worker-pod-without-flow",
        "cp1",
        _E,
        R_ENCRYPT,
        False,
        _FLOW_WHY,
        dst=W1_POD_V4,
        src=CP1_V4,
        sport=2379,
        dport=8080,
    ),
    _c("v4-cp-to-worker-dport-6443", "cp1", _E, R_ENCRYPT, dst=W1_V4, src=CP1_V4, dport=6443),
    _c("v4-cp-to-worker", "cp1", _E, R_ENCRYPT, dst=W2_V4, src=CP1_V4, dport=10250),
    # --- IPv6 --------------------------------------------------------------------------------
    _c("v6-node-to-remote-node", "w1", _E, R_ENCRYPT, dst=W2_V6, dport=22),
    _c("v6-node-to-remote-pod", "w1", _E, R_ENCRYPT, dst=W2_POD_V6, dport=8080),
    _c("v6-worker-to-cp-6443", "w1", _X, R_EXEMPT_DPORT, dst=CP1_V6, dport=6443),
    _c("v6-worker-to-cp-2381", "w1", _E, R_ENCRYPT, dst=CP1_V6, dport=2381),
    _c(
        "v6-ext-hop-dest-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V6,
        dport=6443,
        extra={"ipv6_ext": ("hop", "dest")},
    ),
    _c(
        "v6-ext-routing-to-node",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V6,
        dport=22,
        extra={"ipv6_ext": ("hop", "routing", "dest")},
    ),
    _c(
        "v6-ext-ah-to-cp-2379",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V6,
        dport=2379,
        extra={"ipv6_ext": ("ah",)},
    ),
    _c(
        "v6-six-ext-headers-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V6,
        dport=6443,
        extra={"ipv6_ext": SIX_EXT},
    ),
    _c(
        "v6-cp-reply-6443-ext-from-node-ip",
        "cp1",
        _X,
        R_EXEMPT_SPORT,
        dst=W1_V6,
        src=CP1_V6,
        sport=6443,
        dport=40000,
        tcp_flags="SA",
        extra={"ipv6_ext": ("dest",), "inbound_flow": True},
    ),
    _c(
        "v6-cp-reply-6443-from-pod-ip",
        "cp1",
        _E,
        R_ENCRYPT,
        dst=W1_V6,
        src="fd00:244::5",
        sport=6443,
        dport=40000,
        tcp_flags="SA",
    ),
    _c(
        "v6-nd-133-router-solicitation",
        "w1",
        _P,
        R_ND,
        False,
        _ND_WHY,
        dst=W2_V6,
        proto="icmpv6",
        icmp_type=133,
    ),
    _c(
        "v6-nd-134-router-advertisement",
        "w1",
        _P,
        R_ND,
        False,
        _ND_WHY,
        dst=W2_V6,
        proto="icmpv6",
        icmp_type=134,
    ),
    _c(
        "v6-nd-135-neighbour-solicitation",
        "w1",
        _P,
        R_ND,
        False,
        _ND_WHY,
        dst=W2_V6,
        proto="icmpv6",
        icmp_type=135,
    ),
    _c(
        "v6-nd-136-neighbour-advertisement",
        "w1",
        _P,
        R_ND,
        False,
        _ND_WHY,
        dst=W2_V6,
        proto="icmpv6",
        icmp_type=136,
    ),
    _c(
        "v6-nd-137-redirect",
        "w1",
        _P,
        R_ND,
        False,
        _ND_WHY,
        dst=W2_V6,
        proto="icmpv6",
        icmp_type=137,
    ),
    _c(
        "v6-nd-136-after-hop-by-hop",
        "w1",
        _P,
        R_ND,
        False,
        _ND_WHY,
        dst=W2_V6,
        proto="icmpv6",
        icmp_type=136,
        extra={"ipv6_ext": ("hop",)},
    ),
    _c("v6-icmpv6-echo", "w1", _E, R_ENCRYPT, dst=W2_V6, proto="icmpv6", icmp_type=128),
    # --- EncryptionExemption "storage": w2 serves TCP 3260 to the workers -------------------
    _c(
        "v4-policy-worker-to-labelled-worker",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=W2_V4,
        dport=STORAGE_PORT,
    ),
    _c(
        "v6-policy-worker-to-labelled-worker",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=W2_V6,
        dport=STORAGE_PORT,
    ),
    _c(
        "v4-policy-pod-to-labelled-worker",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=W2_V4,
        src=W1_POD_V4,
        dport=STORAGE_PORT,
    ),
    _c(
        "v4-policy-port-to-unlabelled-worker",
        "w2",
        _E,
        R_ENCRYPT,
        dst=W1_V4,
        src=W2_V4,
        dport=STORAGE_PORT,
    ),
    _c("v4-policy-port-to-cp", "w1", _E, R_ENCRYPT, dst=CP1_V4, dport=STORAGE_PORT),
    _c("v4-policy-to-labelled-workers-pod", "w1", _E, R_ENCRYPT, dst=W2_POD_V4, dport=STORAGE_PORT),
    _c("v4-policy-udp-not-exempt", "w1", _E, R_ENCRYPT, dst=W2_V4, proto="udp", dport=STORAGE_PORT),
    _c(
        "v4-policy-non-client-cp-to-labelled-worker",
        "cp1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        src=CP1_V4,
        dport=STORAGE_PORT,
    ),
    _c(
        "v4-policy-reply-to-client",
        "w2",
        _X,
        R_EXEMPT_SPORT,
        dst=W1_V4,
        src=W2_V4,
        sport=STORAGE_PORT,
        dport=40000,
        tcp_flags="SA",
        extra={"inbound_flow": True},
    ),
    _c(
        "v6-policy-reply-to-client",
        "w2",
        _X,
        R_EXEMPT_SPORT,
        dst=W1_V6,
        src=W2_V6,
        sport=STORAGE_PORT,
        dport=40000,
        tcp_flags="SA",
        extra={"inbound_flow": True},
    ),
    _c(
        "v4-policy-reply-to-client-pod",
        "w2",
        _X,
        R_EXEMPT_SPORT,
        dst=W1_POD_V4,
        src=W2_V4,
        sport=STORAGE_PORT,
        dport=40000,
        tcp_flags="A",
        extra={"inbound_flow": True},
    ),
    _c(
        "v4-policy-reply-to-non-client",
        "w2",
        _E,
        R_ENCRYPT,
        dst=CP1_V4,
        src=W2_V4,
        sport=STORAGE_PORT,
        dport=40000,
        tcp_flags="SA",
    ),
    _c(
        "v4-policy-reply-from-pod",
        "w2",
        _E,
        R_ENCRYPT,
        dst=W1_V4,
        src=W2_POD_V4,
        sport=STORAGE_PORT,
        dport=40000,
        tcp_flags="SA",
    ),
    _c(
        "v4-policy-client-sport-not-exempt",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        src=W1_V4,
        sport=STORAGE_PORT,
        dport=40000,
        tcp_flags="SA",
    ),
    _c(
        "v4-policy-builtin-still-exempt-on-serving-node",
        "w2",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V4,
        src=W2_V4,
        dport=6443,
    ),
    _c("v6-not-cluster", "w1", _P, R_NOT_CLUSTER, dst=OUTSIDE_V6, dport=443),
    _c(
        "v6-wireguard-port",
        "w1",
        _P,
        R_WG_PORT,
        dst=W2_V6,
        proto="udp",
        sport=WG_PORT,
        dport=WG_PORT,
    ),
    _c(
        "v6-mark-0x1e00",
        "w1",
        _P,
        R_WG_MARK,
        False,
        _MARK_WHY,
        dst=W2_V6,
        proto="udp",
        sport=40001,
        dport=40002,
        mark=0x1E00,
    ),
    _c("v6-sctp-to-pod", "w1", _E, R_ENCRYPT, dst=W2_POD_V6, proto="sctp", sport=5000, dport=5001),
    # --- fragments ---------------------------------------------------------------------------
    _c(
        "v4-first-fragment-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V4,
        dport=6443,
        extra={"frag": {"offset": 0, "more": True, "id": 0x1111}},
    ),
    _c(
        "v4-later-fragment-of-exempt",
        "w1",
        _X,
        R_FRAG_EXEMPT,
        False,
        _FRAG_WHY,
        dst=CP1_V4,
        dport=6443,
        extra={"frag": {"offset": 1480, "more": False, "id": 0x1112}, "first_fragment_seen": True},
    ),
    _c(
        "v4-later-fragment-of-encrypted",
        "w1",
        _E,
        R_FRAG_ENCRYPT,
        False,
        _FRAG_WHY,
        dst=W2_V4,
        proto="udp",
        sport=40001,
        dport=9000,
        extra={"frag": {"offset": 1480, "more": True, "id": 0x1113}, "first_fragment_seen": True},
    ),
    _c(
        "v4-later-fragment-unseen",
        "w1",
        _E,
        R_FRAG_UNKNOWN,
        False,
        _FRAG_WHY,
        dst=CP1_V4,
        dport=6443,
        extra={"frag": {"offset": 2960, "more": False, "id": 0x1114}},
    ),
    _c(
        "v4-later-fragment-not-cluster",
        "w1",
        _P,
        R_NOT_CLUSTER,
        False,
        _FRAG_WHY,
        dst=OUTSIDE_V4,
        proto="udp",
        extra={"frag": {"offset": 1480, "more": False, "id": 0x1115}},
    ),
    _c(
        "v6-first-fragment-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V6,
        dport=6443,
        extra={"frag": {"offset": 0, "more": True, "id": 0x22220001}},
    ),
    _c(
        "v6-later-fragment-of-exempt",
        "w1",
        _X,
        R_FRAG_EXEMPT,
        False,
        _FRAG_WHY,
        dst=CP1_V6,
        dport=6443,
        extra={
            "frag": {"offset": 1448, "more": False, "id": 0x22220002},
            "first_fragment_seen": True,
        },
    ),
    _c(
        "v6-later-fragment-of-encrypted",
        "w1",
        _E,
        R_FRAG_ENCRYPT,
        False,
        _FRAG_WHY,
        dst=W2_V6,
        proto="udp",
        sport=40001,
        dport=9000,
        extra={
            "frag": {"offset": 1448, "more": False, "id": 0x22220003},
            "first_fragment_seen": True,
        },
    ),
    _c(
        "v6-later-fragment-unseen",
        "w1",
        _E,
        R_FRAG_UNKNOWN,
        False,
        _FRAG_WHY,
        dst=W2_V6,
        proto="udp",
        extra={"frag": {"offset": 1448, "more": False, "id": 0x22220004}},
    ),
    # --- MSS clamping on redirected SYN / SYN-ACK -------------------------------------------
    _c(
        "v4-syn-mss-clamped",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        dport=8080,
        extra={"tcp_mss": 1460, "expect_mss": MSS_V4},
    ),
    _c(
        "v4-syn-ack-mss-clamped",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_POD_V4,
        sport=8080,
        dport=40000,
        tcp_flags="SA",
        extra={"tcp_mss": 1460, "expect_mss": MSS_V4},
    ),
    _c(
        "v4-syn-small-mss-kept",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        dport=8080,
        extra={"tcp_mss": 1200, "expect_mss": 1200},
    ),
    _c(
        "v4-ack-mss-not-touched",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        dport=8080,
        tcp_flags="A",
        extra={"tcp_mss": 1460, "expect_mss": 1460},
    ),
    _c(
        "v4-syn-exempt-mss-kept",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V4,
        dport=6443,
        extra={"tcp_mss": 1460, "expect_mss": 1460},
    ),
    _c(
        "v6-syn-mss-clamped",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V6,
        dport=8080,
        extra={"tcp_mss": 1440, "expect_mss": MSS_V6},
    ),
    # --- fail modes --------------------------------------------------------------------------
    _c(
        "v4-wg-down-fail-closed",
        "w1",
        _D,
        R_WG_DOWN_DROP,
        dst=W2_V4,
        dport=22,
        extra={"wg_down": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-wg-down-fail-open",
        "w1",
        _P,
        R_WG_DOWN_OPEN,
        dst=W2_V4,
        dport=22,
        extra={"wg_down": True, "fail_mode": "open"},
    ),
    _c(
        "v4-wg-down-exempt-still-exempt",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V4,
        dport=6443,
        extra={"wg_down": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-wg-down-not-cluster",
        "w1",
        _P,
        R_NOT_CLUSTER,
        dst=OUTSIDE_V4,
        dport=443,
        extra={"wg_down": True, "fail_mode": "closed"},
    ),
    _c(
        "v6-wg-down-fail-closed",
        "w1",
        _D,
        R_WG_DOWN_DROP,
        dst=W2_POD_V6,
        dport=22,
        extra={"wg_down": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-uncovered-fail-closed",
        "w1",
        _D,
        R_UNCOVERED_DROP,
        dst=W2_POD_V4,
        dport=8080,
        extra={"uncovered": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-uncovered-fail-open",
        "w1",
        _P,
        R_UNCOVERED_OPEN,
        dst=W2_POD_V4,
        dport=8080,
        extra={"uncovered": True, "fail_mode": "open"},
    ),
    _c(
        "v6-uncovered-fail-closed",
        "w1",
        _D,
        R_UNCOVERED_DROP,
        dst=W2_V6,
        dport=22,
        extra={"uncovered": True, "fail_mode": "closed"},
    ),
    # --- what only a packet parser sees ------------------------------------------------------
    _c(
        "arp-not-ip",
        "w1",
        _P,
        R_NOT_IP,
        False,
        "not an IP packet",
        dst=W2_V4,
        extra={"ethertype": 0x0806},
    ),
    _c(
        "v4-truncated-tcp-header",
        "w1",
        _E,
        R_MALFORMED,
        False,
        "a malformed packet",
        dst=W2_V4,
        dport=22,
        extra={"truncate_l4": True},
    ),
    _c(
        "v6-truncated-udp-header",
        "w1",
        _E,
        R_MALFORMED,
        False,
        "a malformed packet",
        dst=W2_POD_V6,
        proto="udp",
        extra={"truncate_l4": True},
    ),
    _c("v4-vlan-tagged-to-node", "w1", _E, R_ENCRYPT, dst=W2_V4, dport=22, extra={"vlan": 100}),
    _c(
        "v6-vlan-tagged-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V6,
        dport=6443,
        extra={"vlan": 100},
    ),
    _c(
        "disabled-config",
        "w1",
        _P,
        R_DISABLED,
        False,
        "only the BPF config map can be disabled",
        dst=W2_V4,
        dport=22,
        extra={"disabled": True},
    ),
    # --- Cilium's own traffic: local pod to remote pod CIDR stays Cilium's -----------------
    _c(
        "v4-pod-to-remote-pod-cilium",
        "w1",
        _P,
        R_CILIUM_POD,
        src=W1_POD_V4,
        dst=W2_POD_V4,
        dport=8080,
    ),
    _c(
        "v6-pod-to-remote-pod-cilium",
        "w1",
        _P,
        R_CILIUM_POD,
        src=W1_POD_V6,
        dst=W2_POD_V6,
        dport=8080,
    ),
    _c(
        "v4-pod-to-cp-pod-6443-cilium",
        "w1",
        _P,
        R_CILIUM_POD,
        src=W1_POD_V4,
        dst=CP1_POD_V4,
        dport=6443,
    ),
    _c(
        "v4-pod-to-remote-pod-wg-down-cilium",
        "w1",
        _P,
        R_CILIUM_POD,
        src=W1_POD_V4,
        dst=W2_POD_V4,
        dport=8080,
        extra={"wg_down": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-pod-to-remote-pod-later-fragment-cilium",
        "w1",
        _P,
        R_CILIUM_POD,
        False,
        _FRAG_WHY,
        src=W1_POD_V4,
        dst=W2_POD_V4,
        proto="udp",
        extra={"frag": {"offset": 1480, "more": False, "id": 0x1116}},
    ),
    _c(
        "v4-pod-to-remote-pod-taken-over",
        "w1",
        _E,
        R_ENCRYPT,
        src=W1_POD_V4,
        dst=W2_POD_V4,
        dport=8080,
        extra={"take_over": True},
    ),
    _c(
        "v6-pod-to-remote-pod-taken-over",
        "w1",
        _E,
        R_ENCRYPT,
        src=W1_POD_V6,
        dst=W2_POD_V6,
        dport=8080,
        extra={"take_over": True},
    ),
    _c(
        "v4-pod-to-remote-node-with-pod-rule",
        "w1",
        _E,
        R_ENCRYPT,
        src=W1_POD_V4,
        dst=W2_V4,
        dport=22,
    ),
    _c(
        "v6-pod-to-remote-node-with-pod-rule",
        "w1",
        _E,
        R_ENCRYPT,
        src=W1_POD_V6,
        dst=W2_V6,
        dport=22,
    ),
    _c(
        "v4-pod-to-cp-6443-exempt-with-pod-rule",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        src=W1_POD_V4,
        dst=CP1_V4,
        dport=6443,
    ),
    _c(
        "v4-pod-to-outside-with-pod-rule",
        "w1",
        _P,
        R_NOT_CLUSTER,
        src=W1_POD_V4,
        dst=OUTSIDE_V4,
        dport=443,
    ),
    # --- tunnel mode: pod CIDRs are reached through Cilium's tunnel, node IPs encrypted ------
    _c(
        "v4-tunnel-vxlan-to-remote-node",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        proto="udp",
        sport=41000,
        dport=VXLAN_PORT,
        extra={"tunnel": True},
    ),
    _c(
        "v6-tunnel-node-to-remote-node",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V6,
        dport=22,
        extra={"tunnel": True},
    ),
    _c(
        "v4-tunnel-pod-cidr-not-dropped",
        "w1",
        _P,
        R_NOT_CLUSTER,
        dst=W2_POD_V4,
        dport=8080,
        extra={"tunnel": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-tunnel-pod-to-pod-not-dropped",
        "w1",
        _P,
        R_NOT_CLUSTER,
        src=W1_POD_V4,
        dst=W2_POD_V4,
        dport=8080,
        extra={"tunnel": True, "fail_mode": "closed"},
    ),
    _c(
        "v4-tunnel-worker-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V4,
        dport=6443,
        extra={"tunnel": True},
    ),
    # --- MSS with cilium_wg0 at device MTU - 95 (1405 on a 1500-byte underlay) --------------
    _c(
        "v4-syn-mss-clamped-wg-mtu-1405",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        dport=8080,
        extra={"tcp_mss": 1460, "expect_mss": MSS_V4_95, "wg_mtu": WG_MTU_95},
    ),
    _c(
        "v6-syn-mss-clamped-wg-mtu-1405",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V6,
        dport=8080,
        extra={"tcp_mss": 1440, "expect_mss": MSS_V6_95, "wg_mtu": WG_MTU_95},
    ),
    _c(
        "v4-syn-ack-mss-clamped-wg-mtu-1405",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_POD_V4,
        sport=8080,
        dport=40000,
        tcp_flags="SA",
        extra={"tcp_mss": 1460, "expect_mss": MSS_V4_95, "wg_mtu": WG_MTU_95},
    ),
    # --- skb->cb[] left dirty by an earlier program: counted, fragments remembered ----------
    _c(
        "v4-dirty-cb-pod-to-remote-node",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_V4,
        src=W1_POD_V4,
        dport=10250,
        extra={"cb": LXC_CB},
    ),
    _c(
        "v6-dirty-cb-to-remote-pod",
        "w1",
        _E,
        R_ENCRYPT,
        dst=W2_POD_V6,
        dport=8080,
        extra={"cb": LXC_CB_RANDOM},
    ),
    _c(
        "v4-dirty-cb-not-cluster",
        "w1",
        _P,
        R_NOT_CLUSTER,
        dst=OUTSIDE_V4,
        dport=443,
        extra={"cb": LXC_CB},
    ),
    _c(
        "v4-dirty-cb-first-fragment-to-cp-6443",
        "w1",
        _X,
        R_EXEMPT_DPORT,
        dst=CP1_V4,
        dport=6443,
        extra={"frag": {"offset": 0, "more": True, "id": 0x1116}, "cb": LXC_CB},
    ),
    _c(
        "v4-dirty-cb-later-fragment-of-exempt",
        "w1",
        _X,
        R_FRAG_EXEMPT,
        False,
        _FRAG_WHY,
        dst=CP1_V4,
        dport=6443,
        extra={
            "frag": {"offset": 1480, "more": False, "id": 0x1117},
            "first_fragment_seen": True,
            "cb": LXC_CB,
        },
    ),
    _c(
        "v6-dirty-cb-later-fragment-of-exempt",
        "w1",
        _X,
        R_FRAG_EXEMPT,
        False,
        _FRAG_WHY,
        dst=CP1_V6,
        dport=6443,
        extra={
            "frag": {"offset": 1448, "more": False, "id": 0x22220005},
            "first_fragment_seen": True,
            "cb": LXC_CB_RANDOM,
        },
    ),
]

CASES_BY_ID = {c.id: c for c in CASES}
assert len(CASES_BY_ID) == len(CASES), "case ids must be unique"


def snapshot() -> dict[str, NodeInfo]:
    """CLUSTER parsed the way the agent parses it; each node's v1 Node (the trusted role
    source) carries the same labels as its CiliumNode."""
    out = {}
    for obj in CLUSTER:
        info, rejections = parse_ciliumnode(obj)
        assert info is not None and not rejections, rejections
        out[info.name] = dataclasses.replace(
            info, node_labels=info.labels, node_addresses=info.addresses
        )
    return out


def policies(objs: list | None = None) -> list:
    """The parsed policies of ``objs`` (default POLICIES_OBJ)."""
    out = []
    for obj in POLICIES_OBJ if objs is None else objs:
        policy, rejections = parse_exemption(obj)
        assert policy is not None, rejections
        out.append(policy)
    return out


def settings_for(case: Case) -> Settings:
    return Settings(
        node_name=case.local_node,
        wg_interface=WG_IFNAME,
        fail_mode=case.extra.get("fail_mode", "closed"),
        take_over_pod_to_pod=bool(case.extra.get("take_over")),
    )


def _node_prefixes(node: NodeInfo):
    nets = [ipaddress.ip_network(addr) for kind, addr in node.addresses if kind == "InternalIP"]
    return tuple(nets) + tuple(node.pod_cidrs)


def wg_state_for(case: Case, ifindex: int = 7) -> WgState:
    """The WireGuard device as Cilium configures it: one peer per remote node whose allowed-IPs
    are its node addresses and pod CIDRs. With ``uncovered`` the peer owning the case's
    destination is missing; with ``wg_down`` the device is present but down."""
    dst = ipaddress.ip_address(case.query.dst)
    peers = []
    for name, node in sorted(snapshot().items()):
        if name == case.local_node:
            continue
        allowed = _node_prefixes(node)
        if case.extra.get("tunnel"):
            # Cilium >= 1.17 in tunnel mode: node addresses only.
            allowed = tuple(a for a in allowed if a not in node.pod_cidrs)
        if case.extra.get("uncovered") and any(dst in net for net in allowed):
            continue
        peers.append(
            WgPeer(
                public_key=node.wg_public_key or "",
                allowed_ips=allowed,
                endpoint=f"{node.addresses[0][1]}:{WG_PORT}",
            )
        )
    up = not case.extra.get("wg_down", False)
    return WgState(
        ifname=WG_IFNAME,
        ifindex=ifindex,
        present=True,
        up=up,
        mtu=case.extra.get("wg_mtu", WG_MTU),
        listen_port=WG_PORT,
        fwmark=0x0E00,
        peers=tuple(peers),
    )


def desired_for(
    case: Case,
    wg_ifindex: int = 7,
    devices: tuple[Device, ...] = (UNDERLAY,),
    policy_objs: list | None = None,
) -> DesiredState:
    """The DesiredState the agent computes for the case's local node (with the policies of
    ``policy_objs`` instead of POLICIES_OBJ when given)."""
    settings = settings_for(case)
    plan = compute_plan(snapshot(), case.local_node, settings, policies=policies(policy_objs))
    wg = wg_state_for(case, wg_ifindex)
    desired = compute_desired(plan, wg, devices, settings)
    # As the reconciler does: Cilium's routing mode and own pod-to-pod traffic.
    snap = snapshot()
    node_ips, pod_cidrs = cilium.remote_inventory(snap, case.local_node, settings.address_types)
    tunnel = ("cilium_vxlan",) if case.extra.get("tunnel") else ()
    facts = cilium.detect(wg, tunnel, node_ips, pod_cidrs)
    desired = cilium.apply(
        desired, facts, settings.take_over_pod_to_pod, admission_limits(settings)
    )
    if case.extra.get("disabled"):
        desired = dataclasses.replace(desired, enabled=False)
    return desired


def source_address(case: Case) -> str:
    """The query's source, or the local node's InternalIP of the destination's family."""
    if case.query.src:
        return case.query.src
    version = ipaddress.ip_address(case.query.dst).version
    node = snapshot()[case.local_node]
    for kind, addr in node.addresses:
        if kind == "InternalIP" and addr.version == version:
            return str(addr)
    raise LookupError(f"node {case.local_node} has no IPv{version} InternalIP")
