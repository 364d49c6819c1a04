/* SPDX-License-Identifier: Apache-2.0 */
/* The BPF helpers the program calls, declared as constant function pointers. BCC 0.26 declares
 * them as non-const pointers; with many call sites (the unrolled loops) clang then keeps the
 * helper id in a register and emits an indirect call (opcode 0x8d), which the kernel rejects.
 * A const pointer makes every call a direct helper call. */
#ifndef NC_LIB_HELPERS_H
#define NC_LIB_HELPERS_H

static long (*const nc_skb_load_bytes)(const void *skb, __u32 offset, void *to, __u32 len) =
	(void *)BPF_FUNC_skb_load_bytes;
static long (*const nc_skb_store_bytes)(void *skb, __u32 offset, const void *from, __u32 len,
					__u64 flags) = (void *)BPF_FUNC_skb_store_bytes;
static long (*const nc_l4_csum_replace)(void *skb, __u32 offset, __u64 from, __u64 to,
					__u64 flags) = (void *)BPF_FUNC_l4_csum_replace;
static long (*const nc_skb_vlan_pop)(void *skb) = (void *)BPF_FUNC_skb_vlan_pop;
static long (*const nc_redirect)(__u32 ifindex, __u64 flags) = (void *)BPF_FUNC_redirect;

#endif /* NC_LIB_HELPERS_H */
