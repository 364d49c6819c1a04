/* SPDX-License-Identifier: Apache-2.0 */
/* Per-CPU counters by reason, and the verdict record in skb->cb[] that BPF_PROG_TEST_RUN (and
 * so `nodecryptor explain` and the packet-table tests) reads back from ctx_out. */
#ifndef NC_LIB_COUNTERS_H
#define NC_LIB_COUNTERS_H

#include "maps.h"

/* ``dry`` is a compile-time constant at every call site (0 in nc_egress, 1 in nc_explain), so
 * each entry point is its own straight-line program: no packet field decides whether a packet
 * is counted. */
static __always_inline void nc_count(struct __sk_buff *skb, __u32 index, const int dry)
{
	struct nc_counter *c;

	if (dry)
		return;
	c = nc_counters.lookup(&index);
	if (c) {
		/* Per-CPU values: no other CPU writes this slot, plain adds are enough. */
		c->packets += 1;
		c->bytes += skb->len;
	}
}

static __always_inline void nc_record(struct __sk_buff *skb, __u32 reason, __u32 target,
				      const int dry)
{
	nc_count(skb, reason, dry);
	skb->cb[NC_CB_REASON] = NC_CB_MAGIC | reason;
	skb->cb[NC_CB_TARGET] = target;
}

#endif /* NC_LIB_COUNTERS_H */
