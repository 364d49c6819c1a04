/* SPDX-License-Identifier: Apache-2.0 */
/* The egress decision (nc_egress, attached to the underlay devices' egress, and its dry-run
 * twin nc_explain): node-bound cluster traffic is redirected into Cilium's WireGuard device;
 * bootstrap flows to and from control-plane nodes and everything that is not cluster traffic
 * continue to the next program (Cilium's).
 *
 * Decision order (first match wins; every packet gets one reason, counted in nc_counters):
 * no config or disabled; WireGuard's own mark; not IPv4/IPv6; destination not a remote
 * cluster prefix; local pod to remote pod CIDR (Cilium's own, unless taken over); later
 * fragment (follows its first fragment); truncated L4 or an IPv6 extension-header chain longer
 * than NC_IPV6_EXT_MAX (encrypt); ICMPv6 neighbour discovery; UDP WireGuard port both ways;
 * exempt destination port to a control-plane node address, from any local source (the flow is
 * remembered, flows.h); exempt source port from the local control-plane node's own address,
 * for a flow a peer opened; else encrypt, subject to the fail mode when WireGuard is down or
 * no peer covers the destination. The ingress decision is its mirror in ingress.h. */
#ifndef NC_LIB_EGRESS_H
#define NC_LIB_EGRESS_H

#include "maps.h"
#include "counters.h"
#include "parse.h"
#include "lookup.h"
#include "exempt.h"
#include "frag.h"
#include "mss.h"
#include "verdict.h"
#include "cilium.h"
#include "flows.h"

/* ``dry`` is a constant at both call sites (nc_egress, nc_explain): each is its own program. */
static __always_inline int nc_egress_decide(struct __sk_buff *skb, const int dry)
{
	__u32 zero = 0, reason;
	struct nc_config *cfg = nc_config_map.lookup(&zero);
	struct nc_dst_info dst_info = {}, *dst = &dst_info;
	struct nc_pkt p = {};

	if (!cfg || !cfg->enabled)
		return nc_pass(skb, NC_R_DISABLED, dry);
	if ((skb->mark & cfg->wg_mark_mask) == cfg->wg_mark)
		return nc_pass(skb, NC_R_WG_MARK, dry);
	if (nc_parse_l3(skb, &p) < 0)
		return nc_pass(skb, NC_R_NOT_IP, dry);
	if (!nc_lookup_dst(&p, cfg, dst))
		return nc_pass(skb, NC_R_NOT_CLUSTER, dry);
	if (nc_cilium_owns(&p, dst))
		return nc_pass(skb, NC_R_CILIUM_POD, dry); /* Cilium encrypts it, with its identity */
	if (p.family == 6)
		nc_parse_ipv6_ext(skb, &p);
	nc_parse_l4(skb, &p);

	if (p.frag == NC_FRAG_LATER) {
		reason = nc_frag_reason(&p);
		if (reason == NC_R_FRAG_EXEMPT)
			return nc_pass(skb, reason, dry);
		return nc_encrypt(skb, &p, dst, cfg, reason, dry);
	}
	if (!p.l4_ok)
		return nc_encrypt(skb, &p, dst, cfg, NC_R_MALFORMED, dry);
	if (p.proto == NC_IPPROTO_ICMPV6 && p.icmp_type >= 133 && p.icmp_type <= 137)
		reason = NC_R_ND; /* redirecting neighbour discovery breaks IPv6 resolution */
	else if (p.proto == NC_IPPROTO_UDP && p.sport == cfg->wg_port && p.dport == cfg->wg_port)
		reason = NC_R_WG_PORT;
	else
		reason = nc_flow_egress(skb, &p, nc_exempt_reason(&p, dst, cfg), dry);
	if (p.frag == NC_FRAG_FIRST && !dry)
		nc_frag_remember(&p, reason);
	if (reason != NC_R_ENCRYPT)
		return nc_pass(skb, reason, dry);
	return nc_encrypt(skb, &p, dst, cfg, reason, dry);
}

#endif /* NC_LIB_EGRESS_H */
