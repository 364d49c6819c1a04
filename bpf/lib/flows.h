/* SPDX-License-Identifier: Apache-2.0 */
/* Flow-exact bootstrap exemption. A reply from an exempt source port leaves in the clear only
 * when nc_flows holds its connection as INBOUND: nc_ingress saw the peer open it to an exempt
 * port this control-plane node serves. A local process that merely uses source port 6443 to
 * reach another cluster destination has no such entry and is encrypted. Symmetrically, the
 * egress program remembers the exempt flows opened from this node to a control-plane node
 * (OUTBOUND) whatever the local source (a node address or a local pod), and nc_ingress accepts
 * their clear-text replies, and ICMP errors quoting either kind of flow (icmp.h), only for
 * those.
 *
 * Entries are refreshed (re-inserted when missing) by every packet of the flow in the
 * direction that created it, so an entry lost to LRU pressure or to an agent restart (a new
 * map generation) comes back with the next packet the peer or the local client sends; until
 * then replies are encrypted (or, on ingress, counted as a leak), never leaked. */
#ifndef NC_LIB_FLOWS_H
#define NC_LIB_FLOWS_H

#include "maps.h"
#include "counters.h"
#include "parse.h"

/* The key of a packet's flow in the local node's orientation: ``outgoing`` says whether the
 * packet's source is the local end. */
static __always_inline void nc_flow_key_of(const struct nc_pkt *p, int outgoing,
					   struct nc_flow_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = p->family;
	key->protocol = p->proto;
	if (outgoing) {
		key->local_port = p->sport;
		key->remote_port = p->dport;
		__builtin_memcpy(key->local, p->src, 16);
		__builtin_memcpy(key->remote, p->dst, 16);
	} else {
		key->local_port = p->dport;
		key->remote_port = p->sport;
		__builtin_memcpy(key->local, p->dst, 16);
		__builtin_memcpy(key->remote, p->src, 16);
	}
}

/* The origin (NC_FLOW_*) the flow is remembered with; 0 when it is not remembered. */
static __always_inline __u32 nc_flow_origin(const struct nc_pkt *p, int outgoing)
{
	struct nc_flow_key key;
	struct nc_flow_val *val;

	nc_flow_key_of(p, outgoing, &key);
	val = nc_flows.lookup(&key);
	return val ? val->origin : 0;
}

/* Whether the flow is remembered with ``origin``. */
static __always_inline int nc_flow_is(const struct nc_pkt *p, int outgoing, __u32 origin)
{
	return nc_flow_origin(p, outgoing) == origin;
}

/* Remembers the flow (a lookup first: an existing entry is only marked recently used). */
static __always_inline void nc_flow_remember(struct __sk_buff *skb, const struct nc_pkt *p,
					     int outgoing, __u32 origin, const int dry)
{
	struct nc_flow_key key;
	struct nc_flow_val val = {.origin = origin}, *have;

	if (dry)
		return;
	nc_flow_key_of(p, outgoing, &key);
	have = nc_flows.lookup(&key);
	if (have && have->origin == origin)
		return;
	nc_flows.update(&key, &val);
	nc_count(skb, NC_EV_FLOW_ADDED, dry);
}

/* Egress hook after nc_exempt_reason: an exempt destination port remembers the outbound flow;
 * an exempt source port stays exempt only for a flow a peer opened. */
static __always_inline __u32 nc_flow_egress(struct __sk_buff *skb, const struct nc_pkt *p,
					    __u32 reason, const int dry)
{
	if (reason == NC_R_EXEMPT_DPORT) {
		nc_flow_remember(skb, p, 1, NC_FLOW_OUTBOUND, dry);
		return reason;
	}
	if (reason == NC_R_EXEMPT_SPORT && !nc_flow_is(p, 1, NC_FLOW_INBOUND)) {
		nc_count(skb, NC_EV_REPLY_NO_FLOW, dry);
		return NC_R_ENCRYPT;
	}
	return reason;
}

#endif /* NC_LIB_FLOWS_H */
