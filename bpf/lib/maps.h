/* SPDX-License-Identifier: Apache-2.0 */
/* Every map of nc_abi.h, declared for BCC in this one header (the other lib headers declare
 * none). With NC_PIN_DIR defined (a string literal, given by the loader as a cflag) every map
 * is reused from NC_PIN_DIR/<name> when pinned there, else created and pinned there, so the
 * agent can restart without emptying the datapath.
 * BCC rewrites map method calls only when they are spelled with the map's own name (not
 * through a macro), so the lib headers call nc_dst_v4.lookup() etc. directly; the names
 * match the NC_MAP_* definitions of nc_abi.h. */
#ifndef NC_LIB_MAPS_H
#define NC_LIB_MAPS_H

#include "nc_abi.h"

#define NC_STR(x) #x
#define NC_XSTR(x) NC_STR(x)

#ifdef NC_PIN_DIR
#define NC_MAP(type, key, value, name, max, flags) \
	BPF_TABLE_PINNED(type, key, value, name, max, NC_PIN_DIR "/" NC_XSTR(name), flags)
#else
#define NC_MAP(type, key, value, name, max, flags) \
	BPF_F_TABLE(type, key, value, name, max, flags)
#endif

/* Not preallocated: memory follows the entries in use, not the capacity the agent grows to. */
NC_MAP("hash", struct nc_lpm_v4, struct nc_dst_info, nc_dst_v4, NC_DST_V4_MAX,
       BPF_F_NO_PREALLOC);
NC_MAP("hash", struct nc_lpm_v6, struct nc_dst_info, nc_dst_v6, NC_DST_V6_MAX,
       BPF_F_NO_PREALLOC);
/* Entries whose prefix length did not get a hash slot (rare; LPM tries need NO_PREALLOC). */
NC_MAP("lpm_trie", struct nc_lpm_v4, struct nc_dst_info, nc_dst_lpm_v4, NC_DST_V4_MAX,
       BPF_F_NO_PREALLOC);
NC_MAP("lpm_trie", struct nc_lpm_v6, struct nc_dst_info, nc_dst_lpm_v6, NC_DST_V6_MAX,
       BPF_F_NO_PREALLOC);
/* Local pod CIDRs (value unused, 1): Cilium's own pod-to-pod traffic (cilium.h) and the local
 * destinations of clear text from peers (ingress.h). Empty when nodecryptor takes pod-to-pod
 * traffic over. */
NC_MAP("lpm_trie", struct nc_lpm_v4, __u32, nc_pods_v4, NC_PODS_MAX, BPF_F_NO_PREALLOC);
NC_MAP("lpm_trie", struct nc_lpm_v6, __u32, nc_pods_v6, NC_PODS_MAX, BPF_F_NO_PREALLOC);
NC_MAP("array", __u32, struct nc_exempt_ranges, nc_exempt, 1, 0);
NC_MAP("hash", struct nc_addr_key, __u32, nc_local, NC_LOCAL_MAX, 0);
NC_MAP("array", __u32, struct nc_config, nc_config_map, 1, 0);
NC_MAP("percpu_array", __u32, struct nc_counter, nc_counters, NC_COUNTER_MAX, 0);
NC_MAP("lru_hash", struct nc_frag_key, struct nc_frag_val, nc_frags, NC_FRAGS_MAX, 0);
/* Exempt bootstrap flows (flows.h) and the leak meter (ingress.h); LRU: bounded memory. */
NC_MAP("lru_hash", struct nc_flow_key, struct nc_flow_val, nc_flows, NC_FLOWS_MAX, 0);
NC_MAP("lru_hash", struct nc_leak_key, struct nc_leak_val, nc_leaks, NC_LEAKS_MAX, 0);
/* Memory-mapped: the agent reads and rewrites the filter words without a syscall each. */
NC_MAP("array", __u32, __u64, nc_summary, NC_FILTER_WORDS, BPF_F_MMAPABLE);

#endif /* NC_LIB_MAPS_H */
