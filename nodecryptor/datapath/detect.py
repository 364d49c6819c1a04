"""Which nodecryptor datapath is installed on this node, found from the kernel alone (pins,
filters, rules), for the commands that inspect a node from another process than the agent:
``status``, ``explain`` and ``cleanup``.

Each backend has an inspection module with the same four functions (``active``, ``status``,
``explain``, ``cleanup``); this module picks the one whose objects exist. BPF is checked first:
after a hand-over the ip-rule state is removed, so finding BPF objects means BPF enforces.
"""

from __future__ import annotations

from types import ModuleType

from nodecryptor.core.errors import NodecryptorError
from nodecryptor.core.settings import DatapathMode, Settings


class NoDatapath(NodecryptorError):
    """No nodecryptor datapath is installed on this node."""


def inspectors() -> dict[DatapathMode, ModuleType]:
    """The inspection module of each backend. Both read with bpf(2) and netlink only; neither
    needs the compiler."""
    from nodecryptor.datapath.bpf import inspect as bpf_inspect
    from nodecryptor.datapath.iprule import inspect as iprule_inspect

    return {DatapathMode.BPF: bpf_inspect, DatapathMode.IPRULE: iprule_inspect}


def installed(settings: Settings) -> tuple[DatapathMode, ModuleType]:
    """The datapath installed here and its inspection module; NoDatapath when there is none."""
    for name, module in inspectors().items():
        if module.active(settings):
            return name, module
    raise NoDatapath(
        "no nodecryptor datapath is active on this node "
        f"(no pins under {settings.bpffs}/nodecryptor, no nodecryptor ip rules)"
    )
