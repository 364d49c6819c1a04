"""What the inspection commands (status, explain, bpf dump, cleanup) know about the BPF
datapath, learnt from pinned objects only: no compiler, no BCC, sub-second. They work while the
agent runs, after it died, and on a node where it never ran (reporting "not active").

This package's top level is the interface ``datapath.detect`` dispatches through (the same
functions as the ip-rule datapath's ``inspect``); each command lives in its own module:
``pinned`` (what is installed), ``status_report`` (status, leaks), ``map_dump`` (bpf dump),
``packet_explain`` (explain), ``pin_cleanup`` (cleanup).
"""

from nodecryptor.datapath.bpf.inspect.map_dump import destinations, dump
from nodecryptor.datapath.bpf.inspect.packet_explain import explain, explain_ingress
from nodecryptor.datapath.bpf.inspect.pin_cleanup import cleanup
from nodecryptor.datapath.bpf.inspect.pinned import active, attachments, pinned_prog_id
from nodecryptor.datapath.bpf.inspect.status_report import read_leaks, status

__all__ = [
    "active",
    "attachments",
    "cleanup",
    "destinations",
    "dump",
    "explain",
    "explain_ingress",
    "pinned_prog_id",
    "read_leaks",
    "status",
]
