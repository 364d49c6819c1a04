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

#include "lookup.h"
#include "parse.h"

/* Whether Cilium encrypts this packet itself: local pod source, remote pod CIDR destination.
 * Source and destination are the same in every fragment of a datagram, so all of its
 * fragments get the same answer without fragment tracking. */
static __always_inline int nc_cilium_owns(const struct nc_pkt *p, const struct nc_dst_info *dst)
{
	return dst->kind == NC_KIND_POD_CIDR && nc_in_local_pods(p->family, p->src);
}

#endif /* NC_LIB_CILIUM_H */
