/* SPDX-License-Identifier: Apache-2.0 */
/* Turning a reason into an action. Pass-through returns TC_ACT_UNSPEC, which tcx reads as
 * TCX_NEXT: the next program on the hook (Cilium's) still runs. TC_ACT_OK would end the chain
 * and starve Cilium, so it is never returned. Encrypt-class reasons go through the fail mode
 * and then redirect into the WireGuard device. */
#ifndef NC_LIB_VERDICT_H
#define NC_LIB_VERDICT_H

#include "counters.h"
#include "mss.h"
#include "parse.h"

static __always_inline int nc_pass(struct __sk_buff *skb, __u32 reason, const int dry)
{
	nc_record(skb, reason, 0, dry);
	return TC_ACT_UNSPEC;
}

static __always_inline int nc_drop(struct __sk_buff *skb, __u32 reason, const int dry)
{
	nc_record(skb, reason, 0, dry);
	return TC_ACT_SHOT;
}

/* ``reason`` is ENCRYPT, FRAG_ENCRYPT, FRAG_UNKNOWN or MALFORMED. */
static __always_inline int nc_encrypt(struct __sk_buff *skb, const struct nc_pkt *p,
				      const struct nc_dst_info *dst,
				      const struct nc_config *cfg, __u32 reason, const int dry)
{
	int closed = cfg->fail_mode == NC_FAIL_CLOSED;
	__u32 ifindex = cfg->wg_ifindex;
	__u32 max_packet;

	/* A redirect to a down or missing device drops silently: decide explicitly instead. */
	if (!cfg->wg_up || !ifindex)
		return closed ? nc_drop(skb, NC_R_WG_DOWN_DROP, dry) :
				nc_pass(skb, NC_R_WG_DOWN_OPEN, dry);
	/* WireGuard drops what no peer's allowed-IPs cover, with an ICMP error. */
	if (dst->flags & NC_DST_F_UNCOVERED)
		return closed ? nc_drop(skb, NC_R_UNCOVERED_DROP, dry) :
				nc_pass(skb, NC_R_UNCOVERED_OPEN, dry);

	if (p->l4_ok && p->frag != NC_FRAG_LATER && p->proto == NC_IPPROTO_TCP) {
		if (nc_clamp_mss(skb, p, p->family == 4 ? cfg->mss_v4 : cfg->mss_v6))
			nc_count(skb, NC_EV_MSS_CLAMPED, dry);
	} else {
		max_packet = p->family == 4 ? cfg->max_packet_v4 : cfg->max_packet_v6;
		if (max_packet && skb->len > p->l3_off + max_packet)
			nc_count(skb, NC_EV_OVERSIZE, dry);
	}
	/* WireGuard is an L3 device: the kernel strips the Ethernet header on redirect, but an
	 * inline VLAN tag would stay in front of the IP header. */
	if (p->vlan)
		nc_skb_vlan_pop(skb);
	nc_record(skb, reason, ifindex, dry);
	return nc_redirect(ifindex, 0);
}

#endif /* NC_LIB_VERDICT_H */
