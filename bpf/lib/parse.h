/* SPDX-License-Identifier: Apache-2.0 */
/* Header parsing into struct nc_pkt: Ethernet (one optional 802.1Q/802.1ad tag), IPv4 or
 * IPv6 with up to NC_IPV6_EXT_MAX extension headers, then the first bytes of L4. Every read
 * copies a fixed-size header into the stack (nc_load), so the decision code never holds packet
 * pointers and the verifier's job stays simple on old and new kernels alike. */
#ifndef NC_LIB_PARSE_H
#define NC_LIB_PARSE_H

#include "helpers.h"

#define NC_ETH_P_IP 0x0800
#define NC_ETH_P_IPV6 0x86DD
#define NC_ETH_P_8021Q 0x8100
#define NC_ETH_P_8021AD 0x88A8
#define NC_ETH_HLEN 14
#define NC_VLAN_HLEN 4
/* Extension headers walked before L4, by egress and ingress alike: RFC 8200's recommended
 * order has at most six before the upper layer (hop-by-hop, destination, routing, fragment,
 * AH, destination). A longer chain leaves ext_ok 0: egress encrypts it as malformed, ingress
 * treats it as clear text, so neither exempts ports it did not see. */
#define NC_IPV6_EXT_MAX 6

#define NC_IPPROTO_HOPOPTS 0
#define NC_IPPROTO_ICMP 1
#define NC_IPPROTO_TCP 6
#define NC_IPPROTO_UDP 17
#define NC_IPPROTO_ROUTING 43
#define NC_IPPROTO_FRAGMENT 44
#define NC_IPPROTO_AH 51
#define NC_IPPROTO_ICMPV6 58
#define NC_IPPROTO_DSTOPTS 60
#define NC_IPPROTO_SCTP 132

#define NC_FRAG_NONE 0
#define NC_FRAG_FIRST 1 /* offset 0, more fragments follow: carries the L4 header */
#define NC_FRAG_LATER 2 /* offset > 0: no L4 header */

#define NC_TCP_FLAG_SYN 0x02

/* Headers are copied straight from the linear packet data when they lie there (a bounds check
 * and a copy) and through bpf_skb_load_bytes otherwise (paged data, or beyond the first
 * NC_DIRECT_MAX_OFF bytes). The helper call costs ~14 ns here, three of them a third of the
 * program's cost; ``len`` is a constant at every call site, so the copy is inlined. */
#define NC_DIRECT_MAX_OFF 256
static __always_inline int nc_load(struct __sk_buff *skb, __u32 off, void *to, const __u32 len)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;

	if (off < NC_DIRECT_MAX_OFF) {
		void *from = data + off;

		if (from + len <= end) {
			/* The casts tell clang it may copy in 4-byte words (an IP header is 4-byte
			 * aligned in practice; x86-64 and arm64 load unaligned words anyway, and the
			 * verifier allows unaligned packet loads there). Byte-wise, an IPv6 header
			 * took some 120 instructions. Destinations are 4-byte aligned buffers. */
			__builtin_memcpy((__u32 *)to, (const __u32 *)from, len);
			return 0;
		}
	}
	return nc_skb_load_bytes(skb, off, to, len);
}

/* Parse outcome: what the decision needs, in host byte order except addresses. */
struct nc_pkt {
	__u32 l3_off;
	__u32 l4_off;
	__u32 frag_id;  /* network byte order, as stored in nc_frag_key */
	__u16 sport;
	__u16 dport;
	__u8 family;    /* 4, 6, or 0 when not IP */
	__u8 vlan;      /* an inline VLAN tag precedes the IP header */
	__u8 proto;     /* L4 protocol after any extension headers */
	__u8 frag;      /* NC_FRAG_* */
	__u8 l4_ok;     /* the L4 header is present in full */
	__u8 ext_ok;    /* IPv6 extension headers were walked to the end */
	__u8 tcp_flags;
	__u8 tcp_doff;  /* TCP header length in bytes */
	__u8 icmp_type;
	__u8 pad[3];
	__u8 src[16];
	__u8 dst[16];
};

/* Reads the IP header of ethertype ``proto`` at ``off``. Returns 0 when the packet is
 * IPv4/IPv6 with a complete fixed header, -1 otherwise. */
static __always_inline int nc_parse_ip(struct __sk_buff *skb, struct nc_pkt *p, __u16 proto,
				       __u32 off)
{
	p->l3_off = off;
	if (proto == NC_ETH_P_IP) {
		struct iphdr ip;
		__u16 frag;

		if (nc_load(skb, off, &ip, sizeof(ip)) < 0 || ip.ihl < 5 ||
		    ip.version != 4)
			return -1;
		p->family = 4;
		p->proto = ip.protocol;
		__builtin_memcpy(p->src, &ip.saddr, 4);
		__builtin_memcpy(p->dst, &ip.daddr, 4);
		p->l4_off = off + ip.ihl * 4;
		frag = bpf_ntohs(ip.frag_off);
		if (frag & 0x1FFF)
			p->frag = NC_FRAG_LATER;
		else if (frag & 0x2000)
			p->frag = NC_FRAG_FIRST;
		p->frag_id = (__u32)ip.id;
		p->ext_ok = 1;
		return 0;
	}
	if (proto == NC_ETH_P_IPV6) {
		struct ipv6hdr ip6;

		if (nc_load(skb, off, &ip6, sizeof(ip6)) < 0 || ip6.version != 6)
			return -1;
		p->family = 6;
		p->proto = ip6.nexthdr;
		__builtin_memcpy(p->src, &ip6.saddr, 16);
		__builtin_memcpy(p->dst, &ip6.daddr, 16);
		p->l4_off = off + sizeof(ip6);
		return 0;
	}
	return -1;
}

/* Reads Ethernet and the IP header. Returns 0 when the packet is IPv4/IPv6 with a complete
 * fixed header, -1 otherwise (not IP, or too short to know the destination). */
static __always_inline int nc_parse_l3(struct __sk_buff *skb, struct nc_pkt *p)
{
	__u16 proto;
	__u32 off = NC_ETH_HLEN;

	if (nc_load(skb, 12, &proto, sizeof(proto)) < 0)
		return -1;
	proto = bpf_ntohs(proto);
	if (proto == NC_ETH_P_8021Q || proto == NC_ETH_P_8021AD) {
		if (nc_load(skb, 16, &proto, sizeof(proto)) < 0)
			return -1;
		proto = bpf_ntohs(proto);
		off += NC_VLAN_HLEN;
		p->vlan = 1;
	}
	return nc_parse_ip(skb, p, proto, off);
}

/* The same on an L3 device without a link-layer header (WireGuard): the packet starts with
 * the IP header and skb->protocol names it. */
static __always_inline int nc_parse_l3_raw(struct __sk_buff *skb, struct nc_pkt *p)
{
	return nc_parse_ip(skb, p, bpf_ntohs(skb->protocol), 0);
}

/* Walks IPv6 extension headers up to the L4 header (or a non-first fragment's payload).
 * Leaves ext_ok at 0 when a header is truncated or there are more than NC_IPV6_EXT_MAX. */
static __always_inline void nc_parse_ipv6_ext(struct __sk_buff *skb, struct nc_pkt *p)
{
	__u8 nh = p->proto;
	__u32 off = p->l4_off;

#pragma unroll
	for (int i = 0; i < NC_IPV6_EXT_MAX; i++) {
		__u8 hdr[8] __attribute__((aligned(4)));

		if (nh != NC_IPPROTO_HOPOPTS && nh != NC_IPPROTO_ROUTING &&
		    nh != NC_IPPROTO_DSTOPTS && nh != NC_IPPROTO_FRAGMENT && nh != NC_IPPROTO_AH)
			break;
		if (nc_load(skb, off, hdr, sizeof(hdr)) < 0)
			return;
		if (nh == NC_IPPROTO_FRAGMENT) {
			__u16 frag = ((__u16)hdr[2] << 8) | hdr[3];

			__builtin_memcpy(&p->frag_id, &hdr[4], 4);
			nh = hdr[0];
			off += 8;
			if (frag & 0xFFF8) {
				/* A later fragment: what follows is payload, not a header. */
				p->frag = NC_FRAG_LATER;
				p->proto = nh;
				p->l4_off = off;
				p->ext_ok = 1;
				return;
			}
			if (frag & 1)
				p->frag = NC_FRAG_FIRST;
		} else if (nh == NC_IPPROTO_AH) {
			nh = hdr[0];
			off += ((__u32)hdr[1] + 2) * 4; /* AH counts 32-bit words, minus 2 */
		} else {
			nh = hdr[0];
			off += ((__u32)hdr[1] + 1) * 8; /* the others count 8-octet units, minus 1 */
		}
	}
	p->proto = nh;
	p->l4_off = off;
	p->ext_ok = nh != NC_IPPROTO_HOPOPTS && nh != NC_IPPROTO_ROUTING &&
		    nh != NC_IPPROTO_DSTOPTS && nh != NC_IPPROTO_FRAGMENT && nh != NC_IPPROTO_AH;
}

/* Reads ports (TCP/UDP/SCTP), TCP flags and header length, or the ICMP/ICMPv6 type. Sets
 * l4_ok only when the protocol's whole fixed header is present. */
static __always_inline void nc_parse_l4(struct __sk_buff *skb, struct nc_pkt *p)
{
	__u8 hdr[20] __attribute__((aligned(4)));

	if (p->frag == NC_FRAG_LATER || !p->ext_ok)
		return;
	switch (p->proto) {
	case NC_IPPROTO_TCP:
		if (nc_load(skb, p->l4_off, hdr, 20) < 0)
			return;
		p->tcp_flags = hdr[13];
		p->tcp_doff = (hdr[12] >> 4) * 4;
		if (p->tcp_doff < 20)
			return;
		break;
	case NC_IPPROTO_UDP:
		if (nc_load(skb, p->l4_off, hdr, 8) < 0)
			return;
		break;
	case NC_IPPROTO_SCTP:
		if (nc_load(skb, p->l4_off, hdr, 12) < 0)
			return;
		break;
	case NC_IPPROTO_ICMP:
	case NC_IPPROTO_ICMPV6:
		if (nc_load(skb, p->l4_off, hdr, 4) < 0)
			return;
		p->icmp_type = hdr[0];
		p->l4_ok = 1;
		return;
	default:
		/* Other protocols have no ports; the header is not needed. */
		p->l4_ok = 1;
		return;
	}
	p->sport = ((__u16)hdr[0] << 8) | hdr[1];
	p->dport = ((__u16)hdr[2] << 8) | hdr[3];
	p->l4_ok = 1;
}

#endif /* NC_LIB_PARSE_H */
