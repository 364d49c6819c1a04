/* SPDX-License-Identifier: Apache-2.0 */
/* Map lookups keyed by parsed packet fields: the destination prefix, the local node's own
 * addresses and pod CIDRs, exempt (protocol, port) pairs. */
#ifndef NC_LIB_LOOKUP_H
#define NC_LIB_LOOKUP_H

#include "maps.h"
#include "parse.h"

/* Whether the summary bit of the destination is set (see nc_abi.h): when it is clear, no
 * destination prefix overlaps the address and the hash lookups are skipped. */
static __always_inline int nc_summary_maybe(const struct nc_pkt *p)
{
	__u32 index = ((__u32)p->dst[0] << 8) | p->dst[1], key;
	__u64 *word;

	if (p->family == 6)
		index ^= ((__u32)p->dst[2] << 8) | p->dst[3];
	key = (index >> 6) + (p->family == 6 ? NC_SUMMARY_V6_BASE : 0);
	word = nc_summary.lookup(&key);
	return word && ((*word >> (index & 63)) & 1);
}

/* Whether bit ``hash`` of a family's bloom filter (``base``) is set. */
static __always_inline int nc_bloom_bit(__u32 hash, __u32 base)
{
	__u32 key = base + (hash >> 6);
	__u64 *word = nc_summary.lookup(&key);

	return word && ((*word >> (hash & 63)) & 1);
}

/* Both bloom bits of an entry (two hashes of the mixed key): with 100,000 entries in 2^22
 * bits, one bit alone let 2.4 % of the addresses pay for a useless lookup, two let 0.2 %. */
static __always_inline int nc_bloom_maybe(__u32 mixed, __u32 base)
{
	return nc_bloom_bit((mixed * NC_HASH_K0) >> (32 - NC_BLOOM_BITS), base) &&
	       nc_bloom_bit((mixed * NC_HASH_K2) >> (32 - NC_BLOOM_BITS), base);
}

/* Host-order mask of the first ``bits`` bits of a 32-bit word (bits may be <= 0 or >= 32). */
static __always_inline __u32 nc_mask32(int bits)
{
	if (bits <= 0)
		return 0;
	if (bits >= 32)
		return 0xFFFFFFFF;
	return 0xFFFFFFFF << (32 - bits);
}

/* Prefix-length slot loops: the index the verifier sees bounded right before it is used. Left
 * alone, clang folds ``i < n`` and ``i < NC_PLEN_SLOTS`` into one down-counter of
 * min(n, NC_PLEN_SLOTS) iterations and reads the map value through a pointer that advances
 * beside it. Linux 6.1's verifier cannot relate the two (it does not narrow the counter on
 * ``!= 0`` while 0 lies inside its range), walks the pointer past the end of nc_config and
 * rejects the program with EACCES; newer verifiers narrow it and accepted. The empty asm makes
 * clang forget what it knows about ``slot``, so the test against the constant after it is
 * emitted as written and the access is indexed by a register bounded on every kernel. */
#define NC_SLOT_OR_BREAK(slot, i, n)                                                        \
	__u32 slot = (i);                                                                   \
	if (slot >= (n))                                                                    \
		break;                                                                      \
	asm volatile("" : "+r"(slot));                                                      \
	if (slot >= NC_PLEN_SLOTS)                                                          \
		break

static __always_inline int nc_lookup_v4(const struct nc_pkt *p, const struct nc_config *cfg,
					struct nc_dst_info *out)
{
	struct nc_lpm_v4 key = {};
	struct nc_dst_info *info;
	__u32 addr, n = cfg->n_plen_v4;

	__builtin_memcpy(&addr, p->dst, 4);
	addr = bpf_ntohl(addr);
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < NC_PLEN_SLOTS; i++) {
		NC_SLOT_OR_BREAK(slot, i, n);
		__u32 plen = cfg->plen_v4[slot];
		__u32 host = addr & nc_mask32(plen);
		__u32 masked = bpf_htonl(host);

		/* The key is written on both paths of the bloom test: the verifier then sees one
		 * stack state per iteration and prunes, instead of walking 2^n paths. */
		key.prefixlen = plen;
		__builtin_memcpy(key.addr, &masked, 4);
		if (!nc_bloom_maybe(host + plen, NC_BLOOM_V4_BASE))
			continue;
		info = nc_dst_v4.lookup(&key);
		if (info) {
			*out = *info;
			return 1;
		}
	}
	if (!cfg->lpm_v4)
		return 0;
	key.prefixlen = 32;
	__builtin_memcpy(key.addr, p->dst, 4);
	info = nc_dst_lpm_v4.lookup(&key);
	if (!info)
		return 0;
	*out = *info;
	return 1;
}

static __always_inline int nc_lookup_v6(const struct nc_pkt *p, const struct nc_config *cfg,
					struct nc_dst_info *out)
{
	struct nc_lpm_v6 key = {};
	struct nc_dst_info *info;
	__u32 w0, w1, w2, w3, n = cfg->n_plen_v6;

	/* Masked in network order with the netmasks the agent precomputed: no byte swaps or
	 * branches per slot. The bloom hash mixes the words as loaded (maps.bloom_bits does the
	 * same in the machine's byte order). */
	__builtin_memcpy(&w0, p->dst, 4);
	__builtin_memcpy(&w1, p->dst + 4, 4);
	__builtin_memcpy(&w2, p->dst + 8, 4);
	__builtin_memcpy(&w3, p->dst + 12, 4);
#pragma clang loop unroll(disable)
	for (__u32 i = 0; i < NC_PLEN_SLOTS; i++) {
		NC_SLOT_OR_BREAK(slot, i, n);
		__u32 plen = cfg->plen_v6[slot];
		__u32 m0 = w0 & cfg->mask_v6[4 * slot], m1 = w1 & cfg->mask_v6[4 * slot + 1];
		__u32 m2 = w2 & cfg->mask_v6[4 * slot + 2], m3 = w3 & cfg->mask_v6[4 * slot + 3];
		__u32 mixed = (m0 * NC_HASH_K0) ^ (m1 * NC_HASH_K1) ^ (m2 * NC_HASH_K2) ^
			      (m3 * NC_HASH_K3) ^ plen;

		key.prefixlen = plen;
		__builtin_memcpy(key.addr, &m0, 4);
		__builtin_memcpy(key.addr + 4, &m1, 4);
		__builtin_memcpy(key.addr + 8, &m2, 4);
		__builtin_memcpy(key.addr + 12, &m3, 4);
		if (!nc_bloom_maybe(mixed, NC_BLOOM_V6_BASE))
			continue;
		info = nc_dst_v6.lookup(&key);
		if (info) {
			*out = *info;
			return 1;
		}
	}
	if (!cfg->lpm_v6)
		return 0;
	key.prefixlen = 128;
	__builtin_memcpy(key.addr, p->dst, 16);
	info = nc_dst_lpm_v6.lookup(&key);
	if (!info)
		return 0;
	*out = *info;
	return 1;
}

/* Longest-prefix match of the destination into ``out``; 0 when it is not a remote cluster
 * prefix. The value is copied out of the map: a map value pointer from a different lookup in
 * every loop iteration would keep the verifier from merging the states after the loop, and it
 * would walk the rest of the program once per iteration (12 times the instructions). */
static __always_inline int nc_lookup_dst(const struct nc_pkt *p, const struct nc_config *cfg,
					 struct nc_dst_info *out)
{
	if (!nc_summary_maybe(p))
		return 0;
	if (p->family == 4)
		return nc_lookup_v4(p, cfg, out);
	return nc_lookup_v6(p, cfg, out);
}

/* Whether ``addr`` (family 4 or 6, network order) is one of the local node's own addresses.
 * Egress asks it of the source, ingress of the destination. */
static __always_inline int nc_is_local_addr(__u8 family, const __u8 *addr)
{
	struct nc_addr_key key;

	__builtin_memset(&key, 0, sizeof(key));
	key.family = family;
	if (family == 4)
		__builtin_memcpy(key.addr, addr, 4);
	else
		__builtin_memcpy(key.addr, addr, 16);
	return nc_local.lookup(&key) != NULL;
}

/* Whether ``addr`` lies in a local pod CIDR (nc_pods_*). Egress asks it of the source (Cilium's
 * own pod-to-pod traffic, cilium.h), ingress of the destination. */
static __always_inline int nc_in_local_pods(__u8 family, const __u8 *addr)
{
	if (family == 4) {
		struct nc_lpm_v4 key = {.prefixlen = 32};

		__builtin_memcpy(key.addr, addr, 4);
		return nc_pods_v4.lookup(&key) != NULL;
	}
	struct nc_lpm_v6 key = {.prefixlen = 128};

	__builtin_memcpy(key.addr, addr, 16);
	return nc_pods_v6.lookup(&key) != NULL;
}

/* Policy bits of the exempt ranges holding (protocol, port) with ``flag`` (NC_EXEMPT_*). */
static __always_inline __u32 nc_port_policies(__u8 protocol, __u16 port, __u8 flag)
{
	__u32 zero = 0, policies = 0, n;
	struct nc_exempt_ranges *x = nc_exempt.lookup(&zero);

	if (!x)
		return 0;
	n = x->count;
	/* Fully unrolled, every index a constant: no variable offset into the map value. */
#pragma unroll
	for (int i = 0; i < NC_EXEMPT_RANGES_MAX; i++) {
		const struct nc_port_range *r = &x->r[i];

		if (i < n && r->protocol == protocol && (r->flags & flag) && port >= r->first &&
		    port <= r->last)
			policies |= 1U << (r->policy & (NC_POLICIES_MAX - 1));
	}
	return policies;
}

#endif /* NC_LIB_LOOKUP_H */
