"""Where nodecryptor keeps its pinned BPF objects, and the safety of those directories.

Layout under ``<bpffs>/nodecryptor/`` (the root every command owns, nothing outside it; every
directory root-owned 0700, see ``check_dir``):

    v<ABI>/g<N>/<map name>  one generation of maps; a layout change gets a new v<ABI> directory
    v<ABI>/current          symlink to the generation the attached program uses
    links/<ifname>          tcx links, one per underlay device
    links-ingress/<ifname>  tcx links of the ingress program, one per underlay device
    prog                    the program currently attached (lets inspection commands find it in
                            legacy tc mode too, where no link exists)
    prog-explain            its dry-run twin (same maps, changes no state), run by `explain`
    prog-ingress            the ingress program (nc_ingress), and prog-explain-ingress its twin
    programs/<key>/<entry>  every entry point of one compiled program text (egress, explain,
                            ingress, explain-ingress), named by the hash of everything that went
                            into the compile (loader.py), and maps/<map name> the maps they
                            were loaded with; a restart with the same key reuses them instead
                            of compiling. The current key and at most one previous
                            key are kept, so a rollback is cheap

Maps are derived state: every agent start and every growth of the destination maps loads the
program into a fresh generation, fills it completely from the desired state, and only then swaps
the program inside the attached links; ``current`` then moves and older generations are
removed. The attached program keeps its own maps alive, so a crash at any step leaves the
previous generation enforcing.
"""

from __future__ import annotations

import logging
import os
import re
import stat

from nodecryptor.core.errors import DatapathError
from nodecryptor.datapath.bpf import abi, syscall

log = logging.getLogger(__name__)

BPF_FS_MAGIC = 0xCAFE4A11


def root(bpffs: str) -> str:
    return abi.nodecryptor_root(bpffs)


def abi_dir(bpffs: str) -> str:
    return abi.abi_dir(bpffs)


def maps_dir(bpffs: str) -> str:
    """The maps of the attached program, through the ``current`` symlink (which does not
    exist until a generation was attached)."""
    return os.path.join(abi_dir(bpffs), CURRENT)


CURRENT = "current"
_GENERATION = re.compile(r"^g([0-9]+)$")


def generation_dir(bpffs: str, number: int) -> str:
    return os.path.join(abi_dir(bpffs), f"g{number}")


def generations(bpffs: str) -> list[int]:
    """Generation numbers present, ascending."""
    try:
        names = os.listdir(abi_dir(bpffs))
    except FileNotFoundError:
        return []
    return sorted(int(m.group(1)) for m in map(_GENERATION.match, names) if m)


def current_generation(bpffs: str) -> int | None:
    try:
        match = _GENERATION.match(os.readlink(maps_dir(bpffs)))
    except OSError:
        return None
    return int(match.group(1)) if match else None


def new_generation(bpffs: str) -> tuple[int, str]:
    """Create the next generation directory (0700): (number, path)."""
    number = max(generations(bpffs), default=0) + 1
    path = generation_dir(bpffs, number)
    os.mkdir(path, mode=0o700)
    check_dir(path)
    return number, path


def set_current(bpffs: str, number: int) -> None:
    """Point ``current`` at generation ``number`` (a new symlink renamed over the old one, so
    readers see either)."""
    tmp = os.path.join(abi_dir(bpffs), f"{CURRENT}-new")
    unlink(tmp)
    os.symlink(f"g{number}", tmp)
    os.rename(tmp, maps_dir(bpffs))


def remove_generation(bpffs: str, number: int) -> None:
    """Unpin one generation's maps (programs using them keep them alive) and remove its
    directory. Missing is fine."""
    _remove_tree(generation_dir(bpffs, number))


def remove_stale(bpffs: str, keep: int) -> list[str]:
    """Remove every generation but ``keep`` and the directories of other ABI versions (left by
    an agent of another version; its program holds its own maps). Returns what was removed."""
    removed = []
    for number in generations(bpffs):
        if number != keep:
            remove_generation(bpffs, number)
            removed.append(generation_dir(bpffs, number))
    top = root(bpffs)
    mine = os.path.basename(abi_dir(bpffs))
    for name in os.listdir(top):
        if re.match(r"^v[0-9]+$", name) and name != mine:
            _remove_tree(os.path.join(top, name))
            removed.append(os.path.join(top, name))
    return removed


def _remove_tree(top: str) -> list[str]:
    removed: list[str] = []
    if not os.path.isdir(top) or os.path.islink(top):
        return removed
    for dirpath, dirnames, filenames in os.walk(top, topdown=False):
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            path = os.path.join(dirpath, name)
            if unlink(path):
                removed.append(path)
        for name in dirnames:
            try:
                os.rmdir(os.path.join(dirpath, name))
            except (FileNotFoundError, NotADirectoryError):
                pass
    try:
        os.rmdir(top)
    except FileNotFoundError:
        pass
    return removed


def links_dir(bpffs: str, direction: str = "egress") -> str:
    return os.path.join(root(bpffs), "links" if direction == "egress" else "links-ingress")


def link_path(bpffs: str, ifname: str, direction: str = "egress") -> str:
    return os.path.join(links_dir(bpffs, direction), ifname)


def prog_path(bpffs: str) -> str:
    return os.path.join(root(bpffs), "prog")


def explain_prog_path(bpffs: str) -> str:
    return os.path.join(root(bpffs), "prog-explain")


def ingress_prog_path(bpffs: str) -> str:
    """The attached ingress program (nc_ingress)."""
    return os.path.join(root(bpffs), "prog-ingress")


def explain_ingress_prog_path(bpffs: str) -> str:
    """Its dry-run twin, run by ``explain --direction ingress``."""
    return os.path.join(root(bpffs), "prog-explain-ingress")


PROGRAM_PINS = {
    "nc_egress": "egress",
    "nc_explain": "explain",
    "nc_ingress": "ingress",
    "nc_explain_ingress": "explain-ingress",
}
"""Entry function -> pin name inside a program key directory."""
PROGRAM_MAPS = "maps"
"""Subdirectory of a program key directory pinning the maps its programs were loaded with."""
_KEY = re.compile(r"^[0-9a-f]{16,64}$")


def programs_dir(bpffs: str) -> str:
    return os.path.join(root(bpffs), "programs")


def program_key_dir(bpffs: str, key: str) -> str:
    """The pinned entry points of one program text (a complete set, or absent)."""
    if not _KEY.match(key):
        raise DatapathError(f"program key {key!r} is not a lower-case hex digest")
    return os.path.join(programs_dir(bpffs), key)


def program_keys(bpffs: str) -> list[str]:
    """Complete program keys present (staging directories of a compile, "stage-...", are
    not keys; bpffs refuses names with a dot)."""
    try:
        names = os.listdir(programs_dir(bpffs))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if _KEY.match(n))


def remove_program_key(bpffs: str, name: str) -> list[str]:
    """Unpin one key's programs (an attached program stays alive through its link or
    filter) and remove the directory; ``name`` may also be a leftover staging directory."""
    return _remove_tree(os.path.join(programs_dir(bpffs), name))


def prune_program_keys(bpffs: str, current: str, previous: str | None = None) -> list[str]:
    """Keep ``current`` and one previous key: ``previous`` when given (the key that ran
    before), otherwise the most recently created other key. Removes every other key and any
    staging directory a killed compile child left. Returns the removed directories."""
    others = [k for k in program_keys(bpffs) if k != current]
    if previous not in others:
        dated = []
        for k in others:
            try:
                dated.append((os.stat(os.path.join(programs_dir(bpffs), k)).st_mtime_ns, k))
            except FileNotFoundError:
                continue
        previous = max(dated)[1] if dated else None
    removed: list[str] = []
    try:
        names = os.listdir(programs_dir(bpffs))
    except FileNotFoundError:
        return removed
    for name in names:
        if name not in (current, previous):
            remove_program_key(bpffs, name)
            removed.append(os.path.join(programs_dir(bpffs), name))
    return removed


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
        raise UnsafePinDir(
            f"refusing pin directory {path} (owner uid {st.st_uid}, mode "
            f"{mode:04o}): {', '.join(problems)}; nodecryptor's pin directories "
            "must be root-owned and not group/other writable (remove it, or "
            "chown root and chmod 0700)"
        )


def ensure_dirs(bpffs: str) -> None:
    """Create nodecryptor's pin directories 0700, or check the existing ones (UnsafePinDir
    when another user owns one or could write to it)."""
    for d in (
        root(bpffs),
        abi_dir(bpffs),
        links_dir(bpffs),
        links_dir(bpffs, "ingress"),
        programs_dir(bpffs),
    ):
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


def _present(fd: syscall.Fd) -> bool:
    """False for the -1 that stands for a program not loaded."""
    return isinstance(fd, syscall.BpfObject) or fd >= 0


def pin_prog(bpffs: str, prog_fd: syscall.Fd, explain_fd: syscall.Fd = -1) -> None:
    """(Re)pin the attached program and its dry-run twin. A brief window without the pins only
    affects inspection."""
    for fd, path in ((explain_fd, explain_prog_path(bpffs)), (prog_fd, prog_path(bpffs))):
        unlink(path)
        if _present(fd):
            syscall.obj_pin(fd, path)


def pin_ingress_progs(bpffs: str, prog_fd: syscall.Fd, explain_fd: syscall.Fd) -> None:
    """(Re)pin the ingress program and its dry-run twin (inspection only, as pin_prog)."""
    for fd, path in (
        (explain_fd, explain_ingress_prog_path(bpffs)),
        (prog_fd, ingress_prog_path(bpffs)),
    ):
        unlink(path)
        if _present(fd):
            syscall.obj_pin(fd, path)


def pinned_link_names(bpffs: str, direction: str = "egress") -> list[str]:
    try:
        return sorted(os.listdir(links_dir(bpffs, direction)))
    except FileNotFoundError:
        return []


KNOWN_ROOT_ENTRIES = frozenset(
    {
        "links",
        "links-ingress",
        "prog",
        "prog-explain",
        "prog-ingress",
        "prog-explain-ingress",
        "programs",
    }
)
"""Every name this release puts directly under the root, besides its v<ABI> directory. The
compatibility rule (operator guide, "Upgrades and rollbacks"): a later release adds hooks only
under new ``links-<hook>/`` directories and maps only under a new ``v<ABI>/``, so a release
that meets a name it does not know can tell what it is and remove it (lifecycle.py)."""


def unknown_root_entries(bpffs: str) -> list[str]:
    """Names under the root this release did not create (a newer release's), ABI directories
    excepted: ``remove_stale`` removes those once this release's generation is attached."""
    try:
        names = os.listdir(root(bpffs))
    except FileNotFoundError:
        return []
    return sorted(n for n in names if n not in KNOWN_ROOT_ENTRIES and not re.match(r"^v[0-9]+$", n))


def remove_path(path: str) -> list[str]:
    """Remove one pin, or a directory of pins; returns the paths removed."""
    if os.path.isdir(path) and not os.path.islink(path):
        return _remove_tree(path)
    return [path] if unlink(path) else []


def remove_all(bpffs: str) -> list[str]:
    """Unlink every pin under nodecryptor's root and remove its directories. Touches nothing
    outside the root. Returns the removed paths."""
    return _remove_tree(root(bpffs))


def pinned_prog_id(path: str) -> int:
    """Id of the program pinned at ``path``; 0 when nothing (readable) is pinned there."""
    try:
        prog = syscall.obj_get(path)
    except OSError:
        return 0
    with prog:
        return syscall.prog_info(prog).id
