"""The ip-rule fallback datapath: policy routing instead of a tc program.

Used when BPF cannot be (see ``nodecryptor.datapath.select``). Three kinds of fib rules in
nodecryptor's own priority band send WireGuard's output, the WireGuard port and the bootstrap
exemptions to the main table and everything else to nodecryptor's own table; that table holds
one route per remote node address and pod CIDR through the WireGuard device. The rule count
depends on the control-plane nodes and exempt ports only, never on the number of workers, because
fib rules are a linear list walked on every route lookup while a table is a trie.

``spec`` decides what must be installed (pure), ``kernel`` talks netlink, ``backend`` reconciles,
``inspect`` answers status/explain/cleanup for other processes, ``noop`` keeps the seed's dummy
route for compatibility.
"""
