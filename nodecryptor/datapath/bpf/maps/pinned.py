"""Opening the maps of a pinned generation as one owned set of BPF objects, and finding one map
of such a set by name."""

from __future__ import annotations

import os
from collections.abc import Mapping

from nodecryptor.core.errors import DatapathError
from nodecryptor.datapath.bpf import abi, syscall
from nodecryptor.datapath.bpf.syscall import BpfObject, Fd


class PinnedMaps(dict[str, BpfObject]):
    """{abi map name: open map} of one generation; closing it (or leaving its ``with`` block)
    closes every map it opened."""

    def close(self) -> None:
        for obj in self.values():
            obj.close()

    def __enter__(self) -> PinnedMaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_pinned(pin_dir: str) -> PinnedMaps:
    """Open every map pinned under ``pin_dir``. Raises DatapathError naming the first missing
    pin (and closes what it had opened)."""
    opened = PinnedMaps()
    for spec in abi.MAP_SPECS:
        path = os.path.join(pin_dir, spec.name)
        try:
            opened[spec.name] = syscall.obj_get(path)
        except OSError as e:
            opened.close()
            raise DatapathError(f"cannot open pinned map {path}: {syscall.error_text(e)}") from e
    return opened


def fd_of(map_fds: Mapping[str, Fd], name: str) -> Fd:
    """The map ``name`` of a set (pinned, or a loaded program's); DatapathError naming it when
    the set lacks it."""
    try:
        return map_fds[name]
    except KeyError:
        raise DatapathError(f"map {name} missing from the loaded program's maps") from None
