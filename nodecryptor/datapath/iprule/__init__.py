"""The ip-rule fallback datapath: policy routing instead of a tc program.

Used when BPF cannot be (see ``nodecryptor.datapath.select``). Three kinds of fib rules in
nodecryptor's own priority band send WireGuard's output, the WireGuard port and the bootstrap
exemptions to the main table and everything else to nodecryptor's own table; that table holds
one route per remote node address and pod CIDR through the WireGuard device. The rule count
depends on the control-plane nodes and exempt ports only, never on the number of workers, because
fib rules are a linear list walked on every route lookup while a table is a trie.

In fail-closed mode every WireGuard route has an ``unreachable`` guard of worse metric under
it, so traffic is dropped the moment WireGuard goes down (the kernel flushes the routes through
a downed device) instead of falling through to main until the agent re-applies.

``spec`` decides what must be installed (pure), ``kernel`` does rules, links and route queries
through pyroute2, ``bulk`` reads and writes the table in batches (10,000+ routes), ``backend``
reconciles, ``inspect`` answers status/explain/cleanup for other processes, ``noop`` keeps the
seed's dummy route for compatibility.
"""
