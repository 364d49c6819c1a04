/* SPDX-License-Identifier: Apache-2.0 */
/* ICMP and ICMPv6 errors about exempt bootstrap flows. A peer that cannot forward or deliver
 * a packet of a bootstrap flow (fragmentation needed / packet too big, port unreachable, time
 * exceeded, parameter problem) answers with an error quoting that packet's headers. The flow
 * itself passes in the clear, so its errors must too, or path-MTU discovery breaks for exactly
 * the connections that bring a node up.
 *
 * An error matches when the packet it quotes was sent by the error's destination (the local
 * end) and the quoted connection is in nc_flows, opened by either side. A quote with IPv6
 * extension headers, a quoted later fragment or a quote cut short match nothing and stay
 * clear text (fail closed). Any cluster peer may send such an error, as it may any packet
 * through the tunnel: passing it in the clear gives the sender nothing the tunnel would not. */
#ifndef NC_LIB_ICMP_H
#define NC_LIB_ICMP_H

#include "exempt.h"
#include "flows.h"
#include "parse.h"

#define NC_ICMP_HLEN 8 /* type, code, checksum and 4 bytes before the quote, in both ICMPs */

/* Error messages, the only ones that quote a packet: ICMP destination unreachable (3), time
 * exceeded (11), parameter problem (12); ICMPv6 destination unreachable (1), packet too big
 * (2), time exceeded (3), parameter problem (4). */
static __always_inline int nc_icmp_is_error(const struct nc_pkt *p)
{
	if (p->proto == NC_IPPROTO_ICMP)
		return p->icmp_type == 3 || p->icmp_type == 11 || p->icmp_type == 12;
	if (p->proto == NC_IPPROTO_ICMPV6)
		return p->icmp_type >= 1 && p->icmp_type <= 4;
	return 0;
}

/* Whether two 16-byte addresses are equal (IPv4 uses the first 4 bytes, the rest zero). */
static __always_inline int nc_addr_eq(const __u8 *a, const __u8 *b)
{
	__u32 a0, a1, a2, a3, b0, b1, b2, b3;

	__builtin_memcpy(&a0, a, 4);
	__builtin_memcpy(&a1, a + 4, 4);
	__builtin_memcpy(&a2, a + 8, 4);
	__builtin_memcpy(&a3, a + 12, 4);
	__builtin_memcpy(&b0, b, 4);
	__builtin_memcpy(&b1, b + 4, 4);
	__builtin_memcpy(&b2, b + 8, 4);
	__builtin_memcpy(&b3, b + 12, 4);
	return ((a0 ^ b0) | (a1 ^ b1) | (a2 ^ b2) | (a3 ^ b3)) == 0;
}

/* Whether ``p`` (arriving, its L4 header parsed) is an ICMP error about a connection in
 * nc_flows that the local end of ``p`` takes part in.
 *
 * The quote is read with bpf_skb_load_bytes only, not nc_load's direct-access fast path, and
 * without nc_parse_ip: errors are rare, and every branch here is one more path the verifier
 * walks for each state reaching it (the general parser made nc_ingress a third more work to
 * verify, this reader a few percent). */
static __always_inline int nc_icmp_quotes_flow(struct __sk_buff *skb, const struct nc_pkt *p)
{
	__u8 hdr[40] __attribute__((aligned(4)));
	__u8 ports[4] __attribute__((aligned(4)));
	__u32 off = p->l4_off + NC_ICMP_HLEN;
	struct nc_pkt q = {};

	if (!nc_icmp_is_error(p))
		return 0;
	/* ICMP quotes IPv4, ICMPv6 quotes IPv6: the family of the quote is the packet's. */
	if (p->family == 4) {
		if (nc_skb_load_bytes(skb, off, hdr, 20) < 0 || (hdr[0] >> 4) != 4 ||
		    (hdr[0] & 0xF) < 5)
			return 0;
		/* A later fragment quotes payload, not ports. */
		if ((((__u16)hdr[6] << 8) | hdr[7]) & 0x1FFF)
			return 0;
		q.proto = hdr[9];
		__builtin_memcpy(q.src, &hdr[12], 4);
		__builtin_memcpy(q.dst, &hdr[16], 4);
		off += (hdr[0] & 0xF) * 4;
	} else {
		/* Only a quote whose next header is the transport: extension headers in the quote
		 * are not walked, and such an error stays clear text. */
		if (nc_skb_load_bytes(skb, off, hdr, 40) < 0 || (hdr[0] >> 4) != 6)
			return 0;
		q.proto = hdr[6];
		__builtin_memcpy(q.src, &hdr[8], 16);
		__builtin_memcpy(q.dst, &hdr[24], 16);
		off += 40;
	}
	q.family = p->family;
	/* The quoted packet left the local end: its source is where the error is going. */
	if (!nc_has_ports(q.proto) || !nc_addr_eq(q.src, p->dst))
		return 0;
	if (nc_skb_load_bytes(skb, off, ports, sizeof(ports)) < 0)
		return 0;
	q.sport = ((__u16)ports[0] << 8) | ports[1];
	q.dport = ((__u16)ports[2] << 8) | ports[3];
	return nc_flow_origin(&q, 1) != 0;
}

#endif /* NC_LIB_ICMP_H */
