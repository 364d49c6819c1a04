"""Shared code of the benchmark suite (``benchmarks/suite.py``) and the older single-purpose
benchmark scripts: the machine description, the synthetic cluster, the namespace topology,
the compiled sender, the results contract. Development only; the agent never imports it."""
