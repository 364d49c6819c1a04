/* SPDX-License-Identifier: Apache-2.0 */
/* nodecryptor's tc programs on the underlay devices: the entry points and nothing else.
 *
 * Both decisions live in headers under bpf/lib, one concern each: the egress decision in
 * egress.h (redirect node-bound cluster traffic into Cilium's WireGuard device), the ingress
 * decision in ingress.h (clear text arriving from cluster peers). Each is compiled twice with a
 * constant ``dry``: the attached program and its dry-run twin for `nodecryptor explain`, which
 * decides the same on the live maps but changes no state (no counter, flow, fragment or leak
 * entry), so asking does not show up in the metrics or the memory of real traffic. Keeping the
 * logic out of this file lets both directions share the headers that decide the same facts
 * (maps, parsing, lookups, flows) and keeps the two decisions laid out alike. */
#include <uapi/linux/bpf.h>
#include <uapi/linux/pkt_cls.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>

#include "nc_abi.h"
#include "maps.h"
#include "egress.h"
#include "ingress.h"

/* Attached to the underlay devices' egress: counts every packet, remembers first fragments
 * and the exempt flows local sources open. */
int nc_egress(struct __sk_buff *skb)
{
	return nc_egress_decide(skb, 0);
}

/* Never attached; `nodecryptor explain` runs it with BPF_PROG_TEST_RUN on the live maps. */
int nc_explain(struct __sk_buff *skb)
{
	return nc_egress_decide(skb, 1);
}

/* Attached to the underlay devices' ingress, and to cilium_wg0's (MSS clamp only). */
int nc_ingress(struct __sk_buff *skb)
{
	return nc_ingress_decide(skb, 0);
}

/* The dry-run twin of nc_ingress (`nodecryptor explain --direction ingress`). */
int nc_explain_ingress(struct __sk_buff *skb)
{
	return nc_ingress_decide(skb, 1);
}
