/* SPDX-License-Identifier: Apache-2.0 */
/* The ingress decision (nc_ingress, attached to the underlay devices' ingress, and its dry-run
 * twin nc_explain_ingress): clear text arriving from a cluster peer. A packet is a peer's when
 * its source is a remote node address or remote pod CIDR (a hit in the destination maps) and
 * its destination is a local node address (nc_local) or a local pod CIDR (nc_pods_*).
 * Everything else (the internet, the underlay's own services, non-IP) is never touched.
 *
 * Decision order (first match wins; the mirror of egress.h): no config or disabled; not IP;
 * source not a cluster peer; destination not local; later fragment (follows its first
 * fragment); truncated L4 or an IPv6 extension-header chain longer than NC_IPV6_EXT_MAX (the
 * limit egress parses: neither side can see such a packet's ports, so both fail closed); ICMP
 * error quoting an exempt flow (icmp.h); ICMPv6 neighbour discovery; UDP to the WireGuard port
 * of a local node address; request to an exempt port the local control-plane node serves
 * (remembers the flow); reply of an exempt flow a local source opened, the node or a local
 * pod; else a leak, which the ingress mode passes uncounted (off), passes and meters
 * (audit) or drops and meters (enforce). SYN and SYN-ACK that pass in the clear get their MSS
 * clamped: the replies this node sends to such a peer go through WireGuard. The same program
 * on cilium_wg0's ingress (skb->ifindex is the WireGuard device) only clamps the MSS
 * (nc_in_tunnel). */
#ifndef NC_LIB_INGRESS_H
#define NC_LIB_INGRESS_H

#include "maps.h"
#include "counters.h"
#include "parse.h"
#include "lookup.h"
#include "exempt.h"
#include "flows.h"
#include "mss.h"
#include "frag.h"
#include "verdict.h"
#include "icmp.h"

/* What the peer's source is (kind, control-plane flag): the destination maps looked up with
 * the source address. 0 when it is not a remote cluster prefix. */
static __always_inline int nc_lookup_src(const struct nc_pkt *p, const struct nc_config *cfg,
					 struct nc_dst_info *out)
{
	struct nc_pkt q = {};

	q.family = p->family;
	__builtin_memcpy(q.dst, p->src, 16);
	return nc_lookup_dst(&q, cfg, out);
}

static __always_inline int nc_in_reason_passes(__u32 reason)
{
	return reason == NC_R_IN_ND || reason == NC_R_IN_WG_PORT ||
	       reason == NC_R_IN_EXEMPT_REQUEST || reason == NC_R_IN_EXEMPT_REPLY;
}

/* The leak meter: (source, destination port, protocol) with last-seen time and count. */
static __always_inline void nc_leak_note(const struct nc_pkt *p, const int dry)
{
	struct nc_leak_key key;
	struct nc_leak_val val = {}, *have;
	__u64 now;

	if (dry)
		return;
	__builtin_memset(&key, 0, sizeof(key));
	key.family = p->family;
	key.protocol = p->proto;
	key.dport = p->l4_ok && p->frag != NC_FRAG_LATER && nc_has_ports(p->proto) ? p->dport : 0;
	__builtin_memcpy(key.src, p->src, 16);
	now = bpf_ktime_get_ns();
	have = nc_leaks.lookup(&key);
	if (have) {
		have->last_ns = now;
		__sync_fetch_and_add(&have->packets, 1);
		return;
	}
	val.last_ns = now;
	val.packets = 1;
	nc_leaks.update(&key, &val);
}

/* ``maybe_tcp`` is a constant: 0 where the caller knows the packet is no TCP segment, which
 * keeps the verifier from walking the MSS clamp on that path. */
static __always_inline int nc_in_leak(struct __sk_buff *skb, struct nc_pkt *p,
				      const struct nc_config *cfg, const int maybe_tcp,
				      const int dry)
{
	if (cfg->ingress_mode == NC_INGRESS_ENFORCE) {
		nc_leak_note(p, dry);
		return nc_drop(skb, NC_R_IN_LEAK_DROP, dry);
	}
	/* Passed in the clear: this node's replies go through WireGuard, so the MSS the peer
	 * advertised must leave room for the tunnel. */
	if (maybe_tcp && p->l4_ok && p->frag != NC_FRAG_LATER && p->proto == NC_IPPROTO_TCP &&
	    nc_clamp_mss(skb, p, p->family == 4 ? cfg->mss_v4 : cfg->mss_v6))
		nc_count(skb, NC_EV_IN_MSS_CLAMPED, dry);
	if (cfg->ingress_mode == NC_INGRESS_AUDIT) {
		nc_leak_note(p, dry);
		return nc_pass(skb, NC_R_IN_LEAK_AUDIT, dry);
	}
	return nc_pass(skb, NC_R_IN_LEAK_OFF, dry);
}

/* On cilium_wg0's ingress: what a peer sent through the tunnel, decrypted (no link-layer
 * header). Encrypted by definition, so nothing is classified or counted as a reason; only the
 * MSS of a peer's SYN or SYN-ACK is clamped: this node's segments to a peer that does not
 * clamp (no nodecryptor, or an ip-rule node) would otherwise be sized for the underlay and
 * fragment after WireGuard. The underlay's ingress never sees these handshakes in the clear. */
static __always_inline int nc_in_tunnel(struct __sk_buff *skb, const struct nc_config *cfg,
					const int dry)
{
	struct nc_dst_info src_info = {};
	struct nc_pkt p = {};

	if (nc_parse_l3_raw(skb, &p) < 0 || !nc_lookup_src(&p, cfg, &src_info))
		return TC_ACT_UNSPEC;
	if (p.family == 6)
		nc_parse_ipv6_ext(skb, &p);
	nc_parse_l4(skb, &p);
	if (p.l4_ok && p.frag != NC_FRAG_LATER && p.proto == NC_IPPROTO_TCP &&
	    nc_clamp_mss(skb, &p, p.family == 4 ? cfg->mss_v4 : cfg->mss_v6))
		nc_count(skb, NC_EV_IN_MSS_CLAMPED, dry);
	return TC_ACT_UNSPEC;
}

static __always_inline int nc_ingress_decide(struct __sk_buff *skb, const int dry)
{
	__u32 zero = 0, reason;
	struct nc_config *cfg = nc_config_map.lookup(&zero);
	struct nc_dst_info src_info = {};
	struct nc_frag_key fkey;
	struct nc_frag_val *fval;
	struct nc_pkt p = {};
	int to_node;

	if (!cfg || !cfg->enabled)
		return nc_pass(skb, NC_R_IN_DISABLED, dry);
	if (cfg->wg_ifindex && skb->ifindex == cfg->wg_ifindex)
		return nc_in_tunnel(skb, cfg, dry);
	if (nc_parse_l3(skb, &p) < 0)
		return nc_pass(skb, NC_R_IN_NOT_CLUSTER, dry);
	if (!nc_lookup_src(&p, cfg, &src_info))
		return nc_pass(skb, NC_R_IN_NOT_CLUSTER, dry);
	to_node = nc_is_local_addr(p.family, p.dst);
	if (!to_node && !nc_in_local_pods(p.family, p.dst))
		return nc_pass(skb, NC_R_IN_NOT_CLUSTER, dry);
	if (p.family == 6)
		nc_parse_ipv6_ext(skb, &p);
	nc_parse_l4(skb, &p);

	if (p.frag == NC_FRAG_LATER) {
		nc_frag_key_of(&p, &fkey);
		fval = nc_frags.lookup(&fkey);
		if (fval && nc_in_reason_passes(fval->reason))
			return nc_pass(skb, NC_R_IN_FRAG_EXEMPT, dry);
		return nc_in_leak(skb, &p, cfg, 1, dry);
	}
	if (!p.l4_ok)
		return nc_in_leak(skb, &p, cfg, 1, dry);
	/* An ICMP error about an exempt flow in either direction: path-MTU discovery and failure
	 * reports of the bootstrap connections work under enforce; counted as their reply. Errors
	 * have no ports, so no later rule could match; deciding them apart also keeps the
	 * verifier from walking the rest (and the MSS clamp) once more per path through the
	 * quote. */
	if (nc_icmp_is_error(&p)) {
		reason = nc_icmp_quotes_flow(skb, &p) ? NC_R_IN_EXEMPT_REPLY : NC_R_IN_LEAK_AUDIT;
		if (p.frag == NC_FRAG_FIRST && !dry)
			nc_frag_remember(&p, reason);
		if (reason == NC_R_IN_EXEMPT_REPLY)
			return nc_pass(skb, reason, dry);
		return nc_in_leak(skb, &p, cfg, 0, dry);
	}
	reason = NC_R_IN_LEAK_AUDIT; /* placeholder: "not passed" */
	if (p.proto == NC_IPPROTO_ICMPV6 && p.icmp_type >= 133 && p.icmp_type <= 137)
		reason = NC_R_IN_ND;
	/* WireGuard listens on the node's addresses; clear UDP to a pod's port of that number
	 * is a pod's traffic like any other. */
	else if (p.proto == NC_IPPROTO_UDP && p.dport == cfg->wg_port && to_node)
		reason = NC_R_IN_WG_PORT;
	/* A request from a client of a policy the local node serves, to one of that policy's
	 * ports on a local node address: the ports whose replies egress may exempt. */
	else if (nc_has_ports(p.proto) && to_node && src_info.clients &&
		 (nc_port_policies(p.proto, p.dport, NC_EXEMPT_SPORT) & src_info.clients))
		reason = NC_R_IN_EXEMPT_REQUEST;
	/* A reply from a serving node's own address on one of its policies' ports, for a
	 * connection a local source opened (remembered by egress, whatever that source: the node
	 * or a local pod). The flow entry is exact, so the destination needs no other check. */
	else if (nc_has_ports(p.proto) && src_info.kind == NC_KIND_NODE_IP && src_info.serves &&
		 (nc_port_policies(p.proto, p.sport, NC_EXEMPT_DPORT) & src_info.serves) &&
		 nc_flow_is(&p, 0, NC_FLOW_OUTBOUND))
		reason = NC_R_IN_EXEMPT_REPLY;
	if (reason == NC_R_IN_EXEMPT_REQUEST)
		nc_flow_remember(skb, &p, 0, NC_FLOW_INBOUND, dry);
	if (p.frag == NC_FRAG_FIRST && !dry)
		nc_frag_remember(&p, reason);
	if (nc_in_reason_passes(reason))
		return nc_pass(skb, reason, dry);
	return nc_in_leak(skb, &p, cfg, 1, dry);
}

#endif /* NC_LIB_INGRESS_H */
