/* SPDX-License-Identifier: Apache-2.0 */
/* The contract between the datapath program and the agent: map layouts, reason codes and the
 * skb->cb[] layout used by BPF_PROG_TEST_RUN. nodecryptor/datapath/bpf/abi.py mirrors every
 * definition here; tests/bpf/test_abi.py proves the two agree. Change both together, and bump
 * NC_ABI_VERSION when a map layout changes (pins live in a directory named after it). */
#ifndef NC_ABI_H
#define NC_ABI_H

#define NC_ABI_VERSION 3

/* Destination value: what the agent knows about a remote prefix. */
#define NC_KIND_NODE_IP 1
#define NC_KIND_POD_CIDR 2
#define NC_DST_F_CONTROL_PLANE (1 << 0) /* the prefix belongs to a control-plane node */
#define NC_DST_F_UNCOVERED (1 << 1)     /* no WireGuard peer's allowed-IPs cover it */

/* Destination keys: an exact-match hash per family holds every prefix as (length, address
 * masked to the length). The program looks the destination up once per prefix length in use,
 * longest first (the lengths are listed in nc_config), so the first hit is the longest match.
 * A cluster has few distinct lengths (/32 and /128 node addresses, one or two pod CIDR sizes):
 * a hash lookup costs the same at 100 and at 100,000 entries, an LPM trie walk grows with
 * depth (docs/performance.md measures both). */
struct nc_lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];    /* network byte order, host bits zero */
};

struct nc_lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Exemption policies (EncryptionExemption, the built-in control-plane-bootstrap included)
 * each have a bit 0..NC_POLICIES_MAX-1, assigned by the agent per desired state. A destination
 * carries two masks, so the per-packet cost does not depend on the number of policies: */
struct nc_dst_info {
	__u8 kind;  /* NC_KIND_* */
	__u8 flags; /* NC_DST_F_* */
	__u16 reserved;
	__u32 serves;  /* policies this destination's node serves, the local node a client:
			* destination ports exempt (node addresses only) */
	__u32 clients; /* policies the local node serves, this destination's node a client:
			* source ports exempt on replies from the local node's own addresses */
};

/* Exempt ports: up to NC_EXEMPT_RANGES_MAX (protocol, first, last, policy) ranges, scanned in
 * order (a range costs the same as a single port; 1-65535 is one entry). A range exempts a
 * packet only when its policy's bit is in the destination's relevant mask. */
#define NC_EXEMPT_DPORT (1 << 0) /* as destination port (to a serving node) */
#define NC_EXEMPT_SPORT (1 << 1) /* as source port (replies of the local serving node) */
#define NC_EXEMPT_RANGES_MAX 64
#define NC_POLICIES_MAX 32
struct nc_port_range {
	__u8 protocol; /* IPPROTO_TCP / _UDP / _SCTP */
	__u8 flags;    /* NC_EXEMPT_* */
	__u16 first;   /* host byte order, inclusive */
	__u16 last;
	__u8 policy;   /* policy bit, < NC_POLICIES_MAX */
	__u8 pad;
};

struct nc_exempt_ranges {
	__u32 count;   /* ranges in use, from r[0] */
	__u32 pad;
	struct nc_port_range r[NC_EXEMPT_RANGES_MAX];
};

/* Filters in front of the destination maps, one array of 64-bit words (nc_summary), always a
 * superset of the maps: the agent sets bits before adding entries and clears them only after
 * removing them.
 *
 * Summary: one bit per IPv4 /16 and one per 16-bit fold of an IPv6 address's first 32 bits,
 * set when some destination prefix overlaps it. A clear bit proves the destination is no
 * cluster prefix with one array read, so traffic to the rest of the world never pays for a
 * hash lookup.
 *
 * Bloom: per family 2^22 bits (512 KiB), two bits (two hashes of prefix length and masked
 * address, nc_bloom_maybe) set for every entry of the destination map. A clear bit skips the hash lookup of that prefix
 * length: a packet to a pod pays for the pod CIDR's lookup only, not also for a /32 miss. */
#define NC_SUMMARY_WORDS 1024 /* 65,536 bits per family */
#define NC_SUMMARY_V6_BASE NC_SUMMARY_WORDS
#define NC_BLOOM_BITS 22
#define NC_BLOOM_WORDS (1 << (NC_BLOOM_BITS - 6))
#define NC_BLOOM_V4_BASE (2 * NC_SUMMARY_WORDS)
#define NC_BLOOM_V6_BASE (NC_BLOOM_V4_BASE + NC_BLOOM_WORDS)
#define NC_FILTER_WORDS (NC_BLOOM_V6_BASE + NC_BLOOM_WORDS)
#define NC_HASH_K0 0x9E3779B1 /* Fibonacci hashing; the agent computes the same (maps.py) */
#define NC_HASH_K1 0x85EBCA77
#define NC_HASH_K2 0xC2B2AE3D
#define NC_HASH_K3 0x27D4EB2F

/* Prefix lengths looked up in the hashes, per family (a cluster uses two to four: node
 * addresses and one or a few pod CIDR sizes). Every slot is one loop iteration the verifier
 * walks for every state reaching the loop: one slot per possible length (33 + 129) took
 * 800,000 of its 1,000,000 instructions, 8 slots take about 190,000. Entries of further
 * (shorter) lengths go to the family's LPM trie, looked up after every slot, so the longest
 * match still wins. */
#define NC_PLEN_SLOTS 8

/* Local node addresses: the only sources whose exempt source ports may leave in the clear. */
struct nc_addr_key {
	__u8 family; /* 4 or 6 */
	__u8 pad[3];
	__u8 addr[16]; /* network byte order; IPv4 uses the first 4 bytes, the rest is zero */
};

#define NC_FAIL_OPEN 0
#define NC_FAIL_CLOSED 1
#define NC_ROLE_WORKER 0
#define NC_ROLE_CONTROL_PLANE 1
#define NC_INGRESS_OFF 0     /* clear text from cluster peers passes, not counted as a leak */
#define NC_INGRESS_AUDIT 1   /* passes, counted and listed in nc_leaks */
#define NC_INGRESS_ENFORCE 2 /* dropped, counted and listed in nc_leaks */

/* The single entry (key 0) of nc_config. A freshly created map is all zero: enabled == 0, so
 * the program passes everything until the agent has written a complete configuration. */
struct nc_config {
	__u32 wg_ifindex;     /* redirect target (cilium_wg0) */
	__u8 enabled;
	__u8 local_role;      /* NC_ROLE_* */
	__u8 fail_mode;       /* NC_FAIL_* */
	__u8 wg_up;           /* device present and up, as the agent last saw it */
	__u16 mss_v4;         /* clamp redirected IPv4 TCP SYN/SYN-ACK to this MSS; 0 = no clamp */
	__u16 mss_v6;
	__u16 wg_port;        /* WireGuard listen port (host byte order) */
	__u8 ingress_mode;    /* NC_INGRESS_*: what nc_ingress does with clear text from peers */
	__u8 pad0;
	__u32 wg_mark;        /* (skb->mark & wg_mark_mask) == wg_mark: WireGuard's own output */
	__u32 wg_mark_mask;
	__u32 max_packet_v4;  /* redirected non-TCP packets above this are counted as oversize */
	__u32 max_packet_v6;
	__u64 agent_alive_ns; /* CLOCK_MONOTONIC (bpf_ktime_get_ns) of the agent's last reconcile */
	__u8 n_plen_v4;       /* prefix lengths in nc_dst_v4, listed longest first below */
	__u8 n_plen_v6;
	__u8 lpm_v4;          /* nc_dst_lpm_v4 holds entries (lengths beyond the slots) */
	__u8 lpm_v6;
	__u32 pad1;
	__u8 plen_v4[NC_PLEN_SLOTS];
	__u8 plen_v6[NC_PLEN_SLOTS];
	__u32 mask_v6[4 * NC_PLEN_SLOTS]; /* per slot the netmask of plen_v6[i], network order */
};

/* Fragment tracking: a non-first fragment follows its first fragment's verdict. */
struct nc_frag_key {
	__u8 family;
	__u8 protocol;
	__u16 pad;
	__u32 id;      /* IPv4 id (16 bit) or IPv6 fragment header id, network byte order */
	__u8 src[16];
	__u8 dst[16];
};

struct nc_frag_val {
	__u32 reason; /* reason of the first fragment */
};

/* Exempt bootstrap flows (bpf/lib/flows.h), one entry per connection in the local node's
 * orientation, so the egress and the ingress program find the same entry: ``local`` is the
 * local end's address (a node address or a local pod's) and port, ``remote`` the peer's. */
#define NC_FLOW_INBOUND 1  /* a peer opened it to an exempt port the local node serves */
#define NC_FLOW_OUTBOUND 2 /* a local source opened it to a control-plane node's exempt port */
struct nc_flow_key {
	__u8 family;
	__u8 protocol;
	__u16 local_port;  /* host byte order */
	__u16 remote_port;
	__u16 pad;
	__u8 local[16];    /* network byte order; IPv4 uses the first 4 bytes */
	__u8 remote[16];
};

struct nc_flow_val {
	__u32 origin;      /* NC_FLOW_* */
	__u32 pad;
};

/* Clear text from cluster peers seen by nc_ingress in audit or enforce (nc_leaks, an LRU: the
 * most recent sources survive, memory stays bounded). */
struct nc_leak_key {
	__u8 family;
	__u8 protocol;
	__u16 dport;       /* host byte order; 0 for protocols without ports */
	__u8 src[16];
};

struct nc_leak_val {
	__u64 last_ns;     /* bpf_ktime_get_ns of the last packet */
	__u64 packets;
};

struct nc_counter {
	__u64 packets;
	__u64 bytes;
};

/* Reasons: every packet gets exactly one; the verdict follows from the reason
 * (see NC_REASON_VERDICTS in abi.py). Indices into nc_counters. */
enum nc_reason {
	NC_R_DISABLED = 0,        /* pass: no configuration written yet */
	NC_R_WG_MARK = 1,         /* pass: WireGuard's own (already encrypted) output */
	NC_R_NOT_IP = 2,          /* pass: neither IPv4 nor IPv6 */
	NC_R_NOT_CLUSTER = 3,     /* pass: destination is not a remote cluster prefix */
	NC_R_ND = 4,              /* pass: ICMPv6 router/neighbour discovery (types 133-137) */
	NC_R_WG_PORT = 5,         /* pass: UDP sport == dport == WireGuard port */
	NC_R_EXEMPT_DPORT = 6,    /* exempt: to a serving node's address on a policy's port */
	NC_R_EXEMPT_SPORT = 7,    /* exempt: reply from the local serving node's address */
	NC_R_ENCRYPT = 8,         /* encrypt */
	NC_R_FRAG_EXEMPT = 9,     /* exempt: non-first fragment of an exempt packet */
	NC_R_FRAG_ENCRYPT = 10,   /* encrypt: non-first fragment of an encrypted packet */
	NC_R_FRAG_UNKNOWN = 11,   /* encrypt: non-first fragment, first fragment not seen */
	NC_R_WG_DOWN_DROP = 12,   /* drop: fail closed, WireGuard device absent or down */
	NC_R_UNCOVERED_DROP = 13, /* drop: fail closed, no peer covers the destination */
	NC_R_WG_DOWN_OPEN = 14,   /* pass: fail open, WireGuard device absent or down */
	NC_R_UNCOVERED_OPEN = 15, /* pass: fail open, no peer covers the destination */
	NC_R_MALFORMED = 16,      /* encrypt: cluster destination, headers truncated */
	NC_R_CILIUM_POD = 17,     /* pass: local pod to remote pod CIDR, Cilium encrypts it */
	NC_R_MAX_VERDICT = 18,
	/* Events: counted in addition to the verdict reason, never written to cb[]. */
	NC_EV_MSS_CLAMPED = 18,   /* MSS option rewritten on a redirected SYN or SYN-ACK */
	NC_EV_OVERSIZE = 19,      /* redirected non-TCP packet above max_packet_* */
	/* Ingress (nc_ingress, bpf/lib/ingress.h): reasons for packets arriving on the underlay. */
	NC_R_IN_DISABLED = 20,    /* pass: no configuration written yet */
	NC_R_IN_NOT_CLUSTER = 21, /* pass: not IP, not from a cluster peer, or not to this node */
	NC_R_IN_ND = 22,          /* pass: ICMPv6 router/neighbour discovery */
	NC_R_IN_WG_PORT = 23,     /* pass: UDP to the WireGuard listen port */
	NC_R_IN_EXEMPT_REQUEST = 24, /* exempt: to an exempt port the local control plane serves */
	NC_R_IN_EXEMPT_REPLY = 25,   /* exempt: reply of an exempt flow the local node opened */
	NC_R_IN_FRAG_EXEMPT = 26, /* exempt: non-first fragment of an exempt or passed packet */
	NC_R_IN_LEAK_OFF = 27,    /* pass: clear text from a peer, enforcement off */
	NC_R_IN_LEAK_AUDIT = 28,  /* pass: clear text from a peer, audited */
	NC_R_IN_LEAK_DROP = 29,   /* drop: clear text from a peer, enforced */
	/* Events (continued). */
	NC_EV_REPLY_NO_FLOW = 30, /* egress: exempt-port reply without a flow entry, encrypted */
	NC_EV_FLOW_ADDED = 31,    /* an exempt flow entered nc_flows (added minus held = evicted) */
	NC_EV_IN_MSS_CLAMPED = 32,/* MSS option lowered on a SYN or SYN-ACK arriving from a peer */
	NC_COUNTER_MAX = 33,
};

/* skb->cb[] as written by the program (read back from ctx_out by test-run). */
#define NC_CB_MAGIC 0x4e430000 /* "NC" in the high half of cb[0] */
#define NC_CB_REASON 0         /* cb[0] = NC_CB_MAGIC | reason */
#define NC_CB_TARGET 1         /* cb[1] = redirect ifindex, 0 when not redirected */
/* Nothing in cb[] is ever read: cb[] arriving at the head of the underlay's chain holds what
 * earlier programs (Cilium's bpf_lxc) stored there. A dry run (`nodecryptor explain`) is a
 * second entry point compiled from the same source with the same maps, nc_explain, which
 * counts nothing and remembers no fragment; the attached nc_egress has no dry-run path. */

/* Map names as BCC creates and as the agent pins them. */
#define NC_MAP_DST_V4 nc_dst_v4
#define NC_MAP_DST_V6 nc_dst_v6
#define NC_MAP_EXEMPT nc_exempt
#define NC_MAP_LOCAL nc_local
#define NC_MAP_CONFIG nc_config_map
#define NC_MAP_COUNTERS nc_counters
#define NC_MAP_FRAGS nc_frags
#define NC_MAP_PODS_V4 nc_pods_v4 /* local pod CIDRs: Cilium's own pod-to-pod traffic */
#define NC_MAP_PODS_V6 nc_pods_v6
#define NC_MAP_SUMMARY nc_summary
#define NC_MAP_DST_LPM_V4 nc_dst_lpm_v4
#define NC_MAP_DST_LPM_V6 nc_dst_lpm_v6
#define NC_MAP_FLOWS nc_flows
#define NC_MAP_LEAKS nc_leaks

/* Sizes come from the agent as -D cflags; these defaults let the file compile on its own. */
#ifndef NC_DST_V4_MAX
#define NC_DST_V4_MAX 16384
#endif
#ifndef NC_DST_V6_MAX
#define NC_DST_V6_MAX 16384
#endif
#ifndef NC_LOCAL_MAX
#define NC_LOCAL_MAX 256
#endif
#ifndef NC_FRAGS_MAX
#define NC_FRAGS_MAX 8192
#endif
#ifndef NC_FLOWS_MAX
#define NC_FLOWS_MAX 65536 /* exempt bootstrap connections remembered (LRU) */
#endif
#ifndef NC_LEAKS_MAX
#define NC_LEAKS_MAX 1024 /* most recent clear-text (source, port, protocol) from peers */
#endif
#ifndef NC_PODS_MAX
#define NC_PODS_MAX 64 /* local pod CIDRs per family; a node has one or a few */
#endif

#endif /* NC_ABI_H */
