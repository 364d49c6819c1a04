"""Where nodecryptor keeps its pinned BPF objects, and the check that pinned maps still have
the shape the program expects.

Layout under ``<bpffs>/nodecryptor/`` (the root every command owns, nothing outside it):

    v<ABI>/<map name>     maps (versioned: a layout change starts from a fresh directory)
    links/<ifname>        tcx links, one per underlay device
    prog                  the program currently attached (lets inspection commands find it in
                          legacy tc mode too, where no link exists)
    prog-explain          its dry-run twin (same maps, changes no state), run by `explain`

Maps are derived state: the agent repopulates them on every apply, so a pinned map whose type,
key size, value size, capacity or flags differ from ``abi.MAP_SPECS`` is unlinked and the loader
creates a new one. Reusing it would be worse: BCC reuses a pinned map without checking it.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
from dataclasses import dataclass

from ...errors import DatapathError
from ...log import kv
from ...settings import Settings
from . import abi, syscall

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11


def root(bpffs: str) -> str:
    return abi.nodecryptor_root(bpffs)


def maps_dir(bpffs: str) -> str:
    return abi.pin_dir(bpffs)


def links_dir(bpffs: str) -> str:
    return os.path.join(root(bpffs), "links")


def link_path(bpffs: str, ifname: str) -> str:
    return os.path.join(links_dir(bpffs), ifname)


def prog_path(bpffs: str) -> str:
    return os.path.join(root(bpffs), "prog")


def explain_prog_path(bpffs: str) -> str:
    return os.path.join(root(bpffs), "prog-explain")


def map_path(bpffs: str, name: str) -> str:
    return os.path.join(maps_dir(bpffs), name)


def is_bpffs(path: str) -> bool:
    """True when ``path`` is a mounted bpf filesystem (pins elsewhere would fail)."""
    import ctypes

    class _StatFs(ctypes.Structure):
        _fields_ = [("f_type", ctypes.c_long), ("_rest", ctypes.c_long * 15)]

    libc = ctypes.CDLL(None, use_errno=True)
    buf = _StatFs()
    if libc.statfs(path.encode(), ctypes.byref(buf)) != 0:
        return False
    return (buf.f_type & 0xFFFFFFFF) == BPF_FS_MAGIC


class UnsafePinDir(DatapathError):
    """A pin directory that someone other than root could write to. Whoever can write there
    can unlink the tcx link pin, which is the link's only reference: the program detaches and
    cluster traffic leaves in the clear."""


def check_dir(path: str) -> None:
    """Raise UnsafePinDir unless ``path`` is a real directory (not a symlink) owned by root and
    not writable by group or others."""
    st = os.lstat(path)
    mode = stat.S_IMODE(st.st_mode)
    problems = []
    if not stat.S_ISDIR(st.st_mode):
        problems.append("not a directory")
    if st.st_uid != 0:
        problems.append(f"owned by uid {st.st_uid}, not root")
    if mode & 0o022:
        problems.append("writable by group or others")
    if problems:
        raise UnsafePinDir(f"refusing pin directory {path} (owner uid {st.st_uid}, mode "
                           f"{mode:04o}): {', '.join(problems)}; nodecryptor's pin directories "
                           "must be root-owned and not group/other writable (remove it, or "
                           "chown root and chmod 0700)")


def ensure_dirs(bpffs: str) -> None:
    """Create nodecryptor's pin directories 0700, or check the existing ones (UnsafePinDir
    when another user owns one or could write to it)."""
    for d in (root(bpffs), maps_dir(bpffs), links_dir(bpffs)):
        try:
            os.mkdir(d, mode=0o700)
        except FileExistsError:
            pass
        check_dir(d)


def unlink(path: str) -> bool:
    """Remove a pin; a missing pin is success (returns False)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


@dataclass(frozen=True)
class MapCheck:
    name: str
    action: str  # "reuse" | "absent" | "recreate"
    why: str = ""


def _mismatch(spec: abi.MapSpec, info: syscall.MapInfo, settings: Settings) -> str:
    want = {"type": spec.map_type, "key_size": spec.key_size, "value_size": spec.value_size,
            "max_entries": spec.max_entries(settings.map_sizes), "flags": spec.flags}
    have = {"type": info.type, "key_size": info.key_size, "value_size": info.value_size,
            "max_entries": info.max_entries, "flags": info.map_flags}
    diffs = [f"{k} {have[k]} != {want[k]}" for k in want if have[k] != want[k]]
    return ", ".join(diffs)


def check_maps(settings: Settings, fix: bool = True) -> list[MapCheck]:
    """Compare every pinned map with its spec; with ``fix`` unlink the ones that differ (or
    cannot be opened as a map) so the loader creates them afresh. Returns one MapCheck per
    spec."""
    results = []
    for spec in abi.MAP_SPECS:
        path = map_path(settings.bpffs, spec.name)
        if not os.path.exists(path):
            results.append(MapCheck(spec.name, "absent"))
            continue
        try:
            fd = syscall.obj_get(path)
        except OSError as e:
            why = f"cannot open pin: {os.strerror(e.errno)}"
        else:
            try:
                why = _mismatch(spec, syscall.map_info(fd), settings)
            except OSError as e:  # EINVAL: the pin is not a map
                why = f"not a map: {os.strerror(e.errno)}"
            finally:
                os.close(fd)
        if not why:
            results.append(MapCheck(spec.name, "reuse"))
            continue
        results.append(MapCheck(spec.name, "recreate", why))
        if fix:
            unlink(path)
            log.warning("pinned map differs from its spec; unlinked, it will be recreated and "
                        "repopulated", extra=kv(map=spec.name, path=path, why=why))
    return results


def open_pinned_maps(bpffs: str) -> dict[str, int]:
    """Open every pinned map by name (read-write). Caller closes the fds. Missing maps are
    left out."""
    fds: dict[str, int] = {}
    for spec in abi.MAP_SPECS:
        try:
            fds[spec.name] = syscall.obj_get(map_path(bpffs, spec.name))
        except OSError as e:
            if e.errno != errno.ENOENT:
                for fd in fds.values():
                    os.close(fd)
                raise
    return fds


def pin_prog(bpffs: str, prog_fd: int, explain_fd: int = -1) -> None:
    """(Re)pin the attached program and its dry-run twin. A brief window without the pins only
    affects inspection."""
    for fd, path in ((explain_fd, explain_prog_path(bpffs)), (prog_fd, prog_path(bpffs))):
        unlink(path)
        if fd >= 0:
            syscall.obj_pin(fd, path)


def pinned_link_names(bpffs: str) -> list[str]:
    try:
        return sorted(os.listdir(links_dir(bpffs)))
    except FileNotFoundError:
        return []


def remove_all(bpffs: str) -> list[str]:
    """Unlink every pin under nodecryptor's root and remove its directories. Touches nothing
    outside the root. Returns the removed paths."""
    top = root(bpffs)
    removed: list[str] = []
    if not os.path.isdir(top):
        return removed
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames:
            path = os.path.join(dirpath, name)
            if unlink(path):
                removed.append(path)
        for name in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, name))
            except FileNotFoundError:
                pass
    try:
        os.rmdir(top)
    except FileNotFoundError:
        pass
    return removed
