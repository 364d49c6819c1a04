/* SPDX-License-Identifier: Apache-2.0 */
/* MSS clamping on redirected TCP SYN and SYN-ACK. Locally generated TCP picks its MSS from the
 * underlay route (1460 on a 1500-byte link); once redirected into WireGuard every full segment
 * would be fragmented outside. Rewriting the option to the agent's computed value on the
 * handshake avoids that, as a router's TCPMSS clamp does. */
#ifndef NC_LIB_MSS_H
#define NC_LIB_MSS_H

#include "parse.h"

#define NC_TCP_OPT_MAX 40
#define NC_TCPOPT_EOL 0
#define NC_TCPOPT_NOP 1
#define NC_TCPOPT_MSS 2

/* Copies the options' 32-bit word ``w`` (when the header has it) into opts[]. */
#define NC_OPT_WORD(w)                                                                  \
	if (words > (w) &&                                                              \
	    nc_skb_load_bytes(skb, p->l4_off + 20 + 4 * (w), &opts[4 * (w)], 4) < 0)     \
		return 0;

/* Returns 1 when the MSS option was lowered to ``limit``. Invalidates packet pointers. */
static __always_inline int nc_clamp_mss(struct __sk_buff *skb, const struct nc_pkt *p,
					__u16 limit)
{
	__u8 opts[NC_TCP_OPT_MAX] = {};
	__u32 words = p->tcp_doff / 4;
	int next = 0, found = -1;
	__u16 old_mss = 0;

	if (!limit || !(p->tcp_flags & NC_TCP_FLAG_SYN) || words <= 5)
		return 0;
	words -= 5; /* 32-bit words of options after the 20-byte header */
	/* Word by word, each load of constant size at a constant stack offset, written out
	 * rather than as a loop: a single load of variable length needs bounds tracking that the
	 * 6.1 verifier loses across a spill, and clang does not unroll a loop with early exits. */
	NC_OPT_WORD(0) NC_OPT_WORD(1) NC_OPT_WORD(2) NC_OPT_WORD(3) NC_OPT_WORD(4)
	NC_OPT_WORD(5) NC_OPT_WORD(6) NC_OPT_WORD(7) NC_OPT_WORD(8) NC_OPT_WORD(9)
	/* A state machine over constant offsets (the loop is unrolled): ``next`` is where the
	 * next option starts; bytes past the options are zero, which reads as end-of-list. */
#pragma unroll
	for (int i = 0; i < NC_TCP_OPT_MAX - 1; i++) {
		if (i == next) {
			__u8 kind = opts[i];

			if (kind == NC_TCPOPT_EOL) {
				next = -1;
			} else if (kind == NC_TCPOPT_NOP) {
				next = i + 1;
			} else if (kind == NC_TCPOPT_MSS && opts[i + 1] == 4 &&
				   i + 3 < NC_TCP_OPT_MAX) {
				found = i + 2;
				old_mss = ((__u16)opts[(i + 2) % NC_TCP_OPT_MAX] << 8) |
					  opts[(i + 3) % NC_TCP_OPT_MAX];
				next = -1;
			} else if (opts[i + 1] < 2) {
				next = -1; /* malformed length: stop rather than loop */
			} else {
				next = i + opts[i + 1];
			}
		}
	}
	if (found < 0 || old_mss <= limit)
		return 0;
	__be16 old_be = bpf_htons(old_mss), new_be = bpf_htons(limit);
	__u32 check_off = p->l4_off + 16; /* offsetof(struct tcphdr, check) */

	/* Store first: it makes the skb writable, after which the checksum update cannot fail
	 * for lack of room. */
	if (nc_skb_store_bytes(skb, p->l4_off + 20 + found, &new_be, sizeof(new_be), 0) < 0)
		return 0;
	return nc_l4_csum_replace(skb, check_off, old_be, new_be, sizeof(new_be)) == 0;
}

#endif /* NC_LIB_MSS_H */
