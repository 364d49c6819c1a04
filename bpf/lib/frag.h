/* SPDX-License-Identifier: Apache-2.0 */
/* Fragments: only the first fragment carries ports, so it records its reason in an LRU keyed
 * by (family, protocol, id, src, dst) and later fragments of the same datagram follow it.
 * A later fragment whose first fragment was not seen is encrypted (fail closed). */
#ifndef NC_LIB_FRAG_H
#define NC_LIB_FRAG_H

#include "maps.h"
#include "parse.h"

static __always_inline void nc_frag_key_of(const struct nc_pkt *p, struct nc_frag_key *key)
{
	__builtin_memset(key, 0, sizeof(*key));
	key->family = p->family;
	key->protocol = p->proto;
	key->id = p->frag_id;
	if (p->family == 4) {
		__builtin_memcpy(key->src, p->src, 4);
		__builtin_memcpy(key->dst, p->dst, 4);
	} else {
		__builtin_memcpy(key->src, p->src, 16);
		__builtin_memcpy(key->dst, p->dst, 16);
	}
}

static __always_inline void nc_frag_remember(const struct nc_pkt *p, __u32 reason)
{
	struct nc_frag_key key;
	struct nc_frag_val val = {.reason = reason};

	nc_frag_key_of(p, &key);
	nc_frags.update(&key, &val);
}

static __always_inline int nc_reason_passes(__u32 reason)
{
	return reason != NC_R_ENCRYPT && reason != NC_R_FRAG_ENCRYPT &&
	       reason != NC_R_FRAG_UNKNOWN && reason != NC_R_MALFORMED &&
	       reason != NC_R_WG_DOWN_DROP && reason != NC_R_UNCOVERED_DROP;
}

/* Reason of a later fragment: FRAG_EXEMPT, FRAG_ENCRYPT or FRAG_UNKNOWN. */
static __always_inline __u32 nc_frag_reason(const struct nc_pkt *p)
{
	struct nc_frag_key key;
	struct nc_frag_val *val;

	nc_frag_key_of(p, &key);
	val = nc_frags.lookup(&key);
	if (!val)
		return NC_R_FRAG_UNKNOWN;
	return nc_reason_passes(val->reason) ? NC_R_FRAG_EXEMPT : NC_R_FRAG_ENCRYPT;
}

#endif /* NC_LIB_FRAG_H */
