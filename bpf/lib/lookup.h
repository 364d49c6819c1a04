/* SPDX-License-Identifier: Apache-2.0 */
/* Map lookups keyed by parsed packet fields: the destination prefix, the local node's own
 * addresses, exempt (protocol, port) pairs. */
#ifndef NC_LIB_LOOKUP_H
#define NC_LIB_LOOKUP_H

#include "maps.h"
#include "parse.h"

/* Longest-prefix match of the destination; NULL when it is not a remote cluster prefix. */
static __always_inline struct nc_dst_info *nc_lookup_dst(const struct nc_pkt *p)
{
	if (p->family == 4) {
		struct nc_lpm_v4 key = {.prefixlen = 32};

		__builtin_memcpy(key.addr, p->dst, 4);
		return nc_dst_v4.lookup(&key);
	}
	struct nc_lpm_v6 key = {.prefixlen = 128};

	__builtin_memcpy(key.addr, p->dst, 16);
	return nc_dst_v6.lookup(&key);
}

/* Whether the source address is one of the local node's own addresses. */
static __always_inline int nc_src_is_local(const struct nc_pkt *p)
{
	struct nc_addr_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.family = p->family;
	if (p->family == 4)
		__builtin_memcpy(key.addr, p->src, 4);
	else
		__builtin_memcpy(key.addr, p->src, 16);
	return nc_local.lookup(&key) != NULL;
}

/* NC_EXEMPT_* bits of (protocol, port), 0 when the port is not exempt. */
static __always_inline __u32 nc_port_flags(__u8 protocol, __u16 port)
{
	struct nc_port_key key = {.protocol = protocol, .pad = 0, .port = port};
	__u32 *flags = nc_exempt.lookup(&key);

	return flags ? *flags : 0;
}

#endif /* NC_LIB_LOOKUP_H */
