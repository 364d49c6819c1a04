"""The lab: a Cilium-like cluster built from network namespaces on one machine.

Each node is a network namespace on a shared underlay bridge, with pods behind veths, a
WireGuard device named like Cilium's, a Cilium stand-in that exchanges WireGuard keys through a
fake kube-apiserver, and nodecryptor running for real. Scenarios send traffic and watch the
underlay with tcpdump to show what crossed in the clear. ``nodecryptor-demo`` (make demo) drives it.

Modules: ``spec`` (pure address plan), ``state`` (what was created, for crash clean-up),
``topology`` (namespaces, links, addresses, routes), ``standin`` (the Cilium stand-in),
``kubeapi`` (the stand-in's tiny API client), ``probe`` (traffic servers and clients),
``capture`` (tcpdump and pcap decoding), ``lab`` (bring-up and tear-down), ``inside`` (commands,
requests and flows run inside the lab's namespaces), ``scenarios`` (one module per scenario and
their registry).
"""
