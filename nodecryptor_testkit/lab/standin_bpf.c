/* SPDX-License-Identifier: Apache-2.0 */
/* The lab's stand-in for Cilium's datapath programs, only as far as nodecryptor can tell them
 * apart from the real ones:
 *
 * cil_from_container, on the pod's veth (tcx ingress: packets from the pod): pod traffic to a
 *   remote pod CIDR is sent straight to the underlay (FIB lookup, then bpf_redirect), as bpf_lxc
 *   does in native routing with BPF host routing, leaving cb[0..4] dirty (bpf_lxc's ctx_store_meta values reach the underlay's
 *   chain; the IP stack would have overwritten them, the redirect does not).
 * cil_to_netdev, at the TAIL of the underlay's tcx egress chain: clears cb[0..4] on entry like
 *   bpf_clear_meta, redirects local-pod to remote-pod traffic into cilium_wg0 with an identity
 *   mark (Cilium encrypts its own pod-to-pod traffic), and returns TC_ACT_OK for everything
 *   else, which ends the chain.
 *
 * In tunnel mode neither redirects: pod traffic goes through the VXLAN device. Counters (per-CPU,
 * by SD_C_*) let the lab check what Cilium saw. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

struct sd_lpm4 {
	u32 prefixlen;
	u8 addr[4];
};

struct sd_lpm6 {
	u32 prefixlen;
	u8 addr[16];
};

struct sd_config {
	u32 wg_ifindex;
	u32 underlay_ifindex;
	u32 mark;      /* identity mark put on pod-to-pod packets redirected into cilium_wg0 */
	u32 redirect;  /* 1: native routing (redirect pod-to-pod); 0: tunnel mode */
};

#define SD_C_LXC_REDIRECT 0   /* pod packets sent to the underlay with dirty cb[] */
#define SD_C_NETDEV_SEEN 1    /* packets cil_to_netdev ran on */
#define SD_C_NETDEV_WG 2      /* pod-to-pod packets it redirected into cilium_wg0 */
#define SD_C_MAX 3


BPF_F_TABLE("lpm_trie", struct sd_lpm4, u32, sd_local4, 64, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct sd_lpm6, u32, sd_local6, 64, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct sd_lpm4, u32, sd_remote4, 1024, BPF_F_NO_PREALLOC);
BPF_F_TABLE("lpm_trie", struct sd_lpm6, u32, sd_remote6, 1024, BPF_F_NO_PREALLOC);
BPF_ARRAY(sd_config, struct sd_config, 1);
BPF_PERCPU_ARRAY(sd_counts, u64, SD_C_MAX);

static __always_inline void sd_count(u32 index)
{
	u64 *c = sd_counts.lookup(&index);

	if (c)
		*c += 1;
}

struct sd_addrs {
	u8 family;
	u8 src[16];
	u8 dst[16];
};

/* Reads the addresses; returns 1 when the packet goes from a local pod CIDR to a remote pod
 * CIDR. */
static __always_inline int sd_pod_to_pod(struct __sk_buff *skb, struct sd_addrs *a)
{
	u16 proto;

	if (bpf_skb_load_bytes(skb, 12, &proto, sizeof(proto)) < 0)
		return 0;
	if (proto == bpf_htons(ETH_P_IP)) {
		struct sd_lpm4 src = {.prefixlen = 32}, dst = {.prefixlen = 32};

		if (bpf_skb_load_bytes(skb, ETH_HLEN + 12, a->src, 4) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 16, a->dst, 4) < 0)
			return 0;
		a->family = 4;
		__builtin_memcpy(src.addr, a->src, 4);
		__builtin_memcpy(dst.addr, a->dst, 4);
		return sd_local4.lookup(&src) && sd_remote4.lookup(&dst);
	}
	if (proto == bpf_htons(ETH_P_IPV6)) {
		struct sd_lpm6 src = {.prefixlen = 128}, dst = {.prefixlen = 128};

		if (bpf_skb_load_bytes(skb, ETH_HLEN + 8, a->src, 16) < 0 ||
		    bpf_skb_load_bytes(skb, ETH_HLEN + 24, a->dst, 16) < 0)
			return 0;
		a->family = 6;
		__builtin_memcpy(src.addr, a->src, 16);
		__builtin_memcpy(dst.addr, a->dst, 16);
		return sd_local6.lookup(&src) && sd_remote6.lookup(&dst);
	}
	return 0;
}

int cil_from_container(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct sd_config *cfg = sd_config.lookup(&zero);
	struct bpf_fib_lookup fib = {};
	struct sd_addrs a = {};

	if (!cfg || !cfg->redirect || !sd_pod_to_pod(skb, &a))
		return TC_ACT_OK;
	/* As bpf_lxc with BPF host routing: a FIB lookup (which honours ip rules), then the
	 * packet goes straight to the egress device; the stack handles what the lookup cannot. */
	fib.ifindex = skb->ingress_ifindex;
	if (a.family == 4) {
		fib.family = 2; /* AF_INET */
		__builtin_memcpy(&fib.ipv4_src, a.src, 4);
		__builtin_memcpy(&fib.ipv4_dst, a.dst, 4);
	} else {
		fib.family = 10; /* AF_INET6 */
		__builtin_memcpy(fib.ipv6_src, a.src, 16);
		__builtin_memcpy(fib.ipv6_dst, a.dst, 16);
	}
	if (bpf_fib_lookup(skb, &fib, sizeof(fib), 0) != BPF_FIB_LKUP_RET_SUCCESS ||
	    fib.ifindex != cfg->underlay_ifindex)
		return TC_ACT_OK;
	if (bpf_skb_store_bytes(skb, 0, fib.dmac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, fib.smac, 6, 0) < 0)
		return TC_ACT_SHOT;
	/* What bpf_lxc leaves behind: its ctx_store_meta slots, non-zero. */
	skb->cb[0] = 0x00010f00;
	skb->cb[1] = 0x0a0b0c0d;
	skb->cb[2] = 0xfd000001;
	skb->cb[3] = 0x00000050;
	skb->cb[4] = 0x12345678;
	sd_count(SD_C_LXC_REDIRECT);
	return bpf_redirect(fib.ifindex, 0);
}

int cil_to_netdev(struct __sk_buff *skb)
{
	u32 zero = 0;
	struct sd_config *cfg = sd_config.lookup(&zero);

	/* bpf_clear_meta */
	skb->cb[0] = 0;
	skb->cb[1] = 0;
	skb->cb[2] = 0;
	skb->cb[3] = 0;
	skb->cb[4] = 0;
	sd_count(SD_C_NETDEV_SEEN);
	struct sd_addrs a = {};

	if (cfg && cfg->redirect && cfg->wg_ifindex && sd_pod_to_pod(skb, &a)) {
		skb->mark = cfg->mark;
		sd_count(SD_C_NETDEV_WG);
		return bpf_redirect(cfg->wg_ifindex, 0);
	}
	return TC_ACT_OK;
}
