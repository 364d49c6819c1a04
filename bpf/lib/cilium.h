/* SPDX-License-Identifier: Apache-2.0 */
/* Cilium's own traffic. Cilium encrypts pod-to-remote-pod traffic itself: cil_to_netdev
 * redirects it into cilium_wg0 with a mark carrying the source identity, which its WireGuard
 * program, network policy, host firewall and Hubble rely on. nodecryptor runs first on the
 * hook, so it leaves a packet from a local pod CIDR to a remote pod CIDR to Cilium unless the
 * operator asked it to take that traffic over (the agent then leaves nc_pods_* empty).
 *
 * The check runs only after the destination lookup hit a pod CIDR: traffic to non-cluster
 * destinations never reaches it, so its miss path costs nothing more. */
#ifndef NC_LIB_CILIUM_H
#define NC_LIB_CILIUM_H

#include "maps.h"
#include "parse.h"

/* Local pod CIDRs (value unused, 1). Empty: nodecryptor redirects pod-to-pod traffic too. */
NC_MAP("lpm_trie", struct nc_lpm_v4, __u32, nc_pods_v4, NC_PODS_MAX, BPF_F_NO_PREALLOC);
NC_MAP("lpm_trie", struct nc_lpm_v6, __u32, nc_pods_v6, NC_PODS_MAX, BPF_F_NO_PREALLOC);

/* Whether Cilium encrypts this packet itself: local pod source, remote pod CIDR destination.
 * Source and destination are the same in every fragment of a datagram, so all of its
 * fragments get the same answer without fragment tracking. */
static __always_inline int nc_cilium_owns(const struct nc_pkt *p, const struct nc_dst_info *dst)
{
	if (dst->kind != NC_KIND_POD_CIDR)
		return 0;
	if (p->family == 4) {
		struct nc_lpm_v4 key = {.prefixlen = 32};

		__builtin_memcpy(key.addr, p->src, 4);
		return nc_pods_v4.lookup(&key) != NULL;
	}
	struct nc_lpm_v6 key = {.prefixlen = 128};

	__builtin_memcpy(key.addr, p->src, 16);
	return nc_pods_v6.lookup(&key) != NULL;
}

#endif /* NC_LIB_CILIUM_H */
