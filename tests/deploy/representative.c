/* SPDX-License-Identifier: Apache-2.0 */
/* A stand-in with the kernel-facing shape of bpf/nodecryptor.c, used by the capability test so it
 * does not depend on the real program's state: the same map types (LPM trie without
 * preallocation, hash, array, per-CPU array, LRU hash), a variable-offset walk over the IP
 * header (which the verifier only accepts with CAP_PERFMON), pass-through as TC_ACT_UNSPEC and
 * a redirect. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/tcp.h>

struct rep_lpm_v4 {
	u32 prefixlen;
	u8 addr[4];
};
struct rep_port_key {
	u8 protocol;
	u8 pad;
	u16 port;
};
struct rep_counter {
	u64 packets;
	u64 bytes;
};

BPF_F_TABLE("lpm_trie", struct rep_lpm_v4, u32, rep_dst, 1024, BPF_F_NO_PREALLOC);
BPF_HASH(rep_exempt, struct rep_port_key, u32, 256);
BPF_ARRAY(rep_config, u32, 1);
BPF_PERCPU_ARRAY(rep_counters, struct rep_counter, 8);
BPF_TABLE("lru_hash", u64, u32, rep_frags, 128);

static __always_inline int count(u32 reason, u32 len, int verdict)
{
	struct rep_counter *c = rep_counters.lookup(&reason);

	if (c) {
		c->packets++;
		c->bytes += len;
	}
	return verdict;
}

int rep_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;
	struct iphdr *ip;
	struct tcphdr *tcp;
	u32 zero = 0, *wg_ifindex;

	if ((void *)(eth + 1) > end || eth->h_proto != htons(ETH_P_IP))
		return count(0, skb->len, TC_ACT_UNSPEC);
	ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end)
		return count(0, skb->len, TC_ACT_UNSPEC);
	struct rep_lpm_v4 key = {.prefixlen = 32};
	__builtin_memcpy(key.addr, &ip->daddr, 4);
	if (!rep_dst.lookup(&key))
		return count(1, skb->len, TC_ACT_UNSPEC);
	if (ip->protocol == IPPROTO_TCP) {
		/* The header length is only known at run time: a variable packet offset. */
		tcp = (void *)ip + ip->ihl * 4;
		if ((void *)(tcp + 1) > end)
			return count(2, skb->len, TC_ACT_UNSPEC);
		struct rep_port_key pk = {.protocol = IPPROTO_TCP, .port = ntohs(tcp->dest)};
		if (rep_exempt.lookup(&pk))
			return count(3, skb->len, TC_ACT_UNSPEC);
	}
	u64 frag_key = ip->id;
	u32 reason = 4;
	rep_frags.update(&frag_key, &reason);
	wg_ifindex = rep_config.lookup(&zero);
	if (!wg_ifindex || !*wg_ifindex)
		return count(5, skb->len, TC_ACT_UNSPEC);
	return count(4, skb->len, bpf_redirect(*wg_ifindex, 0));
}
