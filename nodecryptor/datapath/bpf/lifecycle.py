"""What an agent start finds on the node from earlier runs, and repairs before it loads.

Two leftovers, both from an agent that died at the wrong moment:

- **Generations no program runs.** Every start loads a fresh generation of maps (pins.py) and
  only attaches it at its first apply; an agent that dies before (OOM, API server outage, a
  crash loop) left a pinned generation of several MiB that nothing uses and nothing removed.
  A generation is kept when a program attached to one of nodecryptor's hooks uses one of its
  maps, or when ``current`` points at it; every other one is removed.
- **Hooks split across generations.** The ingress and the egress program of one generation
  share its maps (the connection table the egress program writes is the one the ingress
  program reads). The swap cannot move both hooks at once; an agent killed in between leaves
  ingress on the new generation and egress on the old one, each with its own table, so replies
  of bootstrap flows opened since are judged without their flow. The programs pinned at
  ``prog`` and ``prog-ingress`` are re-pinned only after every hook runs the new generation,
  so they are always a consistent pair: a split node is put back on them.

And one from a newer release after a rollback: **pins this release does not know** (a hook
kind added later, under its own ``links-<hook>/`` directory; see pins.KNOWN_ROOT_ENTRIES).
Their links are detached and their pins removed, with a warning naming each: a program this
release does not know must not keep running on the node with maps nobody updates.

All run in ``BpfDatapath.start`` before anything is loaded, so a start that fails afterwards
still leaves the node consistent and a crash loop leaks nothing.
"""

from __future__ import annotations

import logging
import os

from nodecryptor.core.log import kv
from nodecryptor.datapath.bpf import attach, pins, syscall

log = logging.getLogger(__name__)

DIRECTIONS = (attach.EGRESS, attach.INGRESS)


def repair_at_start(bpffs: str) -> None:
    """Both repairs, split hooks first (that can leave a generation unused). A failure only
    delays the repair to the first apply, which moves every hook to the new generation and
    removes the others: never a reason not to start."""
    try:
        remove_unknown(bpffs)
        repair_split(bpffs)
        remove_unused_generations(bpffs)
    except Exception as e:  # OSError, NetlinkError
        log.warning("cannot repair what an earlier agent left", extra=kv(error=str(e)))


def remove_unknown(bpffs: str) -> list[str]:
    """Detach every link pinned under a root entry this release does not know, and remove the
    entry. Returns the paths removed."""
    top = pins.root(bpffs)
    removed = []
    for name in pins.unknown_root_entries(bpffs):
        path = os.path.join(top, name)
        paths = (
            [os.path.join(path, n) for n in sorted(os.listdir(path))]
            if os.path.isdir(path) and not os.path.islink(path)
            else [path]
        )
        for pin in paths:
            _detach_if_link(pin)
        removed += pins.remove_path(path)
        log.warning(
            "removed pins of a newer nodecryptor release this one does not know "
            "(rolled back?): its hooks are detached, so no program keeps running "
            "with maps nobody updates",
            extra=kv(entry=path),
        )
    return removed


def _detach_if_link(path: str) -> None:
    try:
        obj = syscall.obj_get(path)
    except OSError:
        return
    with obj:
        try:
            syscall.link_detach(obj)
            log.warning("detached a link of a newer release", extra=kv(pin=path))
        except OSError:
            pass  # not a link (a program or a map pin), or already defunct


def generation_map_ids(bpffs: str, number: int) -> set[int]:
    """Ids of the maps pinned in generation ``number`` (unreadable pins are skipped)."""
    top = pins.generation_dir(bpffs, number)
    out = set()
    try:
        names = os.listdir(top)
    except FileNotFoundError:
        return out
    for name in names:
        try:
            obj = syscall.obj_get(os.path.join(top, name), read_only=True)
        except OSError:
            continue
        with obj:
            try:
                out.add(syscall.map_info(obj).id)
            except OSError:
                pass
    return out


def hooked_programs(bpffs: str) -> list[tuple[str, str, str, int]]:
    """(mode, direction, device, program id) of every hook nodecryptor owns in this
    namespace: pinned tcx links that are alive, and its own clsact filters."""
    out = []
    for direction in DIRECTIONS:
        for name in pins.pinned_link_names(bpffs, direction):
            try:
                att = attach.tcx_observe(bpffs, name, direction)
            except OSError:
                continue
            if att is not None and not att.defunct and att.prog_id:
                out.append((attach.MODE_TCX, direction, name, att.prog_id))
        for name, prog_id in attach.tc_programs(direction).items():
            out.append((attach.MODE_TC, direction, name, prog_id))
    return out


def _map_ids_of(prog_id: int) -> set[int]:
    try:
        prog = syscall.prog_fd_by_id(prog_id)
    except OSError:
        return set()
    with prog:
        return set(syscall.prog_map_ids(prog))


def remove_unused_generations(bpffs: str) -> list[int]:
    """Remove every generation that neither ``current`` names nor a hooked program uses.
    Returns the numbers removed."""
    in_use: set[int] = set()
    for _mode, _direction, _name, prog_id in hooked_programs(bpffs):
        in_use |= _map_ids_of(prog_id)
    keep = pins.current_generation(bpffs)
    removed = []
    for number in pins.generations(bpffs):
        if number == keep or generation_map_ids(bpffs, number) & in_use:
            continue
        pins.remove_generation(bpffs, number)
        removed.append(number)
    if removed:
        log.info(
            "removed map generations no program runs (left by agents that died before "
            "attaching them)",
            extra=kv(generations=removed, kept=keep),
        )
    return removed


def repair_split(bpffs: str) -> list[str]:
    """Put every hook back on the pinned program pair when the hooks run programs of more
    than one map generation. Returns "<direction> <device>" of every hook moved."""
    pinned = {attach.EGRESS: pins.prog_path(bpffs), attach.INGRESS: pins.ingress_prog_path(bpffs)}
    hooks = hooked_programs(bpffs)
    if not hooks:
        return []
    by_generation = {n: generation_map_ids(bpffs, n) for n in pins.generations(bpffs)}

    def generation_of(prog_id: int):
        # The ingress and the egress program need not use the same set of maps: a program
        # belongs to the generation whose pinned maps it uses.
        used = _map_ids_of(prog_id)
        found = [n for n, ids in by_generation.items() if ids & used]
        return found[0] if len(found) == 1 else frozenset(used)

    if len({generation_of(prog_id) for *_rest, prog_id in hooks}) <= 1:
        return []
    fds = {}
    try:
        for direction, path in pinned.items():
            try:
                fds[direction] = syscall.obj_get(path)
            except OSError:
                # No consistent pair to return to (an agent from before the ingress program):
                # the next apply moves every hook to one new generation.
                log.warning(
                    "hooks run programs of different map generations and no pinned "
                    "pair to return to",
                    extra=kv(missing=path),
                )
                return []
        ids = {d: syscall.prog_info(fd).id for d, fd in fds.items()}
        moved = []
        for mode, direction, name, prog_id in hooks:
            if prog_id == ids[direction]:
                continue
            if mode == attach.MODE_TCX:
                attach.tcx_attach(bpffs, name, fds[direction], direction)
            else:
                attach.tc_attach(name, fds[direction], ids[direction], direction)
            moved.append(f"{direction} {name}")
        log.warning(
            "hooks ran programs of different map generations (an agent was stopped "
            "between the ingress and the egress swap); put back on the pinned pair",
            extra=kv(moved=moved, egress_prog=ids[attach.EGRESS], ingress_prog=ids[attach.INGRESS]),
        )
        return moved
    finally:
        for obj in fds.values():
            obj.close()
