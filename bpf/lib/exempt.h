/* SPDX-License-Identifier: Apache-2.0 */
/* The narrow bootstrap exemption: flows to a control-plane node's own address on an exempt
 * destination port, and replies from the local control-plane node's own address on an exempt
 * source port. Everything else to a cluster destination is encrypted. */
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
	/* Only the node's own address: a pod on a control-plane node listening on an exempt
	 * port is ordinary pod traffic and stays encrypted. */
	if ((dst->flags & NC_DST_F_CONTROL_PLANE) && dst->kind == NC_KIND_NODE_IP &&
	    (nc_port_flags(p->proto, p->dport) & NC_EXEMPT_DPORT))
		return NC_R_EXEMPT_DPORT;
	/* Never on the source port alone: a pod's reply from an exempt port would leak. */
	if (cfg->local_role == NC_ROLE_CONTROL_PLANE &&
	    (nc_port_flags(p->proto, p->sport) & NC_EXEMPT_SPORT) && nc_src_is_local(p))
		return NC_R_EXEMPT_SPORT;
	return NC_R_ENCRYPT;
}

#endif /* NC_LIB_EXEMPT_H */
