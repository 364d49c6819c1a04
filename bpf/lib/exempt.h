/* SPDX-License-Identifier: Apache-2.0 */
/* The narrow exemptions of the policies (EncryptionExemption, the built-in control-plane
 * bootstrap included): flows to a serving node's own address on one of its policies' ports
 * (the local node a client), and replies from the local serving node's own address on one of
 * its policies' ports to a client node. Everything else to a cluster destination is
 * encrypted. */
#ifndef NC_LIB_EXEMPT_H
#define NC_LIB_EXEMPT_H

#include "lookup.h"

static __always_inline int nc_has_ports(__u8 proto)
{
	return proto == NC_IPPROTO_TCP || proto == NC_IPPROTO_UDP || proto == NC_IPPROTO_SCTP;
}

/* Returns NC_R_EXEMPT_DPORT, NC_R_EXEMPT_SPORT, or NC_R_ENCRYPT. */
static __always_inline __u32 nc_exempt_reason(const struct nc_pkt *p,
					      const struct nc_dst_info *dst,
					      const struct nc_config *cfg)
{
	if (!nc_has_ports(p->proto))
		return NC_R_ENCRYPT;
	/* Only the node's own address: a pod on a serving node listening on an exempt port is
	 * ordinary pod traffic and stays encrypted. */
	if (dst->serves && dst->kind == NC_KIND_NODE_IP &&
	    (nc_port_policies(p->proto, p->dport, NC_EXEMPT_DPORT) & dst->serves))
		return NC_R_EXEMPT_DPORT;
	/* Never on the source port alone: a pod's reply from an exempt port would leak. */
	if (dst->clients &&
	    (nc_port_policies(p->proto, p->sport, NC_EXEMPT_SPORT) & dst->clients) &&
	    nc_is_local_addr(p->family, p->src))
		return NC_R_EXEMPT_SPORT;
	return NC_R_ENCRYPT;
}

#endif /* NC_LIB_EXEMPT_H */
