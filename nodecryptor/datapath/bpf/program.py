"""Compile and load the tc program in bpf/ through BCC. The only module that imports ``bcc``.

``load`` returns a LoadedProgram: the program fd and id, and one fd per map of
``abi.MAP_SPECS``, plus the dry-run twin used by ``explain``. With a pin directory (the agent
passes a fresh generation directory, see pins.py) every map is created and pinned there.
``probe`` says whether this machine can do all of that, and why not.

BCC rewrites map method calls (``nc_dst_v4.lookup(...)``) only in its main source buffer, not in
included files, so the loader inlines bpf/nodecryptor.c's local includes (bpf/lib/*.h and
bpf/include/nc_abi.h) into one text, keeping ``#line`` markers so compiler errors still name
the original file and line.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from nodecryptor.core.errors import DatapathError, NotSupported
from nodecryptor.core.log import kv
from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import abi, syscall

log = logging.getLogger(__name__)

ENTRY_FILE = "nodecryptor.c"
ENTRY_FUNCTION = b"nc_egress"
EXPLAIN_FUNCTION = b"nc_explain"
"""The dry-run twin of ENTRY_FUNCTION (same source, same maps; counts nothing, remembers no
fragment), loaded with it and run by ``nodecryptor explain``; never attached."""
INGRESS_FUNCTION = b"nc_ingress"
"""Attached to the underlay devices' ingress (bpf/lib/ingress.h); same maps."""
EXPLAIN_INGRESS_FUNCTION = b"nc_explain_ingress"
"""The dry-run twin of INGRESS_FUNCTION (``nodecryptor explain --direction ingress``)."""
_INCLUDE_RE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')

# Size cflags from settings.MapSizes, named as nc_abi.h expects them.
_SIZE_DEFINES = {
    "NC_DST_V4_MAX": "destinations_v4",
    "NC_DST_V6_MAX": "destinations_v6",
    "NC_LOCAL_MAX": "local_addresses",
    "NC_FRAGS_MAX": "fragments",
}


def bpf_dir() -> Path:
    """Where the C sources live: ``csrc/`` beside this module, package data of the installed
    package. In a source checkout ``csrc`` is a link to the repository's top-level ``bpf/``."""
    root = importlib.resources.files(__package__) / "csrc"
    # BCC takes include directories as paths, so the package must be installed as files (it
    # is: from a wheel, or editable), not imported from a zip archive.
    if not isinstance(root, Path):
        raise DatapathError(f"BPF sources {root} are not on a file system")
    return root


def _search_path(root: Path) -> list[Path]:
    return [root, root / "include", root / "lib"]


def inline_source(root: Path | None = None) -> str:
    """The entry file with every local ``#include "..."`` replaced by the file's text, once
    (the headers' include guards are kept, so a second inclusion expands to nothing)."""
    root = root or bpf_dir()
    search = _search_path(root)
    seen: set[Path] = set()

    def expand(path: Path) -> list[str]:
        out = [f'#line 1 "{path}"']
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = _INCLUDE_RE.match(line)
            if not match:
                out.append(line)
                continue
            target = next(
                (
                    d / match.group(1)
                    for d in [path.parent] + search
                    if (d / match.group(1)).is_file()
                ),
                None,
            )
            if target is None:
                raise DatapathError(
                    f"{path}:{number}: include {match.group(1)!r} not found under {root}"
                )
            target = target.resolve()
            if target not in seen:
                seen.add(target)
                out.extend(expand(target))
            out.append(f'#line {number + 1} "{path}"')
        return out

    entry = root / ENTRY_FILE
    if not entry.is_file():
        raise DatapathError(
            f"BPF source {entry} not found (the package is installed without its package data)"
        )
    return "\n".join(expand(entry.resolve())) + "\n"


def cflags(settings: Settings, pin_dir: str | None = None, root: Path | None = None) -> list[str]:
    root = root or bpf_dir()
    flags = [f"-I{d}" for d in _search_path(root)]
    flags.append("-Wno-unused-function")
    for define, attr in _SIZE_DEFINES.items():
        value = getattr(settings.map_sizes, attr)
        if not isinstance(value, int) or value <= 0:
            raise DatapathError(f"map size {attr}={value!r} must be a positive integer")
        flags.append(f"-D{define}={value}")
    if pin_dir is not None:
        if '"' in pin_dir or "\\" in pin_dir:
            raise DatapathError(
                f"pin directory {pin_dir!r} may not contain quotes or "
                "backslashes (it becomes a C string literal)"
            )
        flags.append(f'-DNC_PIN_DIR="{pin_dir.rstrip("/")}"')
    return flags


@dataclass
class LoadedProgram:
    """A loaded program, its dry-run twin and their maps. Keeps the BCC module alive: closing it
    (or dropping the last reference) closes the fds; pinned maps and an attached program stay
    in the kernel."""

    prog_fd: int
    prog_id: int
    map_fds: dict[str, int]
    explain_fd: int = -1
    explain_id: int = 0
    ingress_fd: int = -1
    ingress_id: int = 0
    explain_ingress_fd: int = -1
    capacities: dict[int, int] = field(default_factory=dict)
    """Destination map capacity by family (4, 6)."""
    compile_seconds: float = 0.0
    pin_dir: str | None = None
    _bpf: object = field(default=None, repr=False)

    def close(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None
            self.prog_fd = -1
            self.explain_fd = -1
            self.ingress_fd = -1
            self.explain_ingress_fd = -1
            self.map_fds = {}


def _import_bcc():
    try:
        import bcc  # the single import of bcc in nodecryptor
    except Exception as e:  # ImportError, or libbcc.so failing to load (OSError)
        raise NotSupported(
            "BCC", f"cannot import bcc: {e}", minimum="Debian package python3-bpfcc"
        ) from e
    return bcc


def _headers_present() -> tuple[bool, str]:
    release = os.uname().release
    build = f"/lib/modules/{release}/build"
    for path in (os.environ.get("BCC_KERNEL_SOURCE"), build, "/sys/kernel/kheaders.tar.xz"):
        if path and os.path.exists(path):
            return True, path
    return False, (
        f"no kernel headers at {build} (nor BCC_KERNEL_SOURCE or "
        "/sys/kernel/kheaders.tar.xz); scripts/setup.sh links Debian's"
    )


class CompileFailed(DatapathError):
    """The C source did not compile; ``stage`` is the label of
    nodecryptor_bpf_program_loads_total{result}."""

    stage = "compile_error"


class LoadFailed(DatapathError):
    """The kernel refused a compiled function (a verifier rejection, almost always)."""

    stage = "load_error"


def load(settings: Settings, pin_dir: str | None = None) -> LoadedProgram:
    """Compile bpf/nodecryptor.c and load it as a SCHED_CLS program, in this process.

    With ``pin_dir`` (an existing directory on a bpffs) maps are reused from it or pinned into
    it. Raises NotSupported when BCC or headers are missing, DatapathError when compiling or
    loading fails (the verifier's message is in BCC's stderr output). The agent does not call
    this: it compiles in a child process (``compile_and_pin``, run by loader.py), so that
    clang/LLVM never stays in its memory.
    """
    root = bpf_dir()
    return load_text(
        inline_source(root),
        cflags(settings, pin_dir, root),
        root,
        pin_dir,
        capacities={4: settings.map_sizes.destinations_v4, 6: settings.map_sizes.destinations_v6},
    )


def load_text(
    text: str,
    flags: list[str],
    root: Path,
    pin_dir: str | None,
    capacities: dict[int, int] | None = None,
) -> LoadedProgram:
    """Compile ``text`` with ``flags`` (both from ``inline_source`` and ``cflags``) and load
    the four entry points; ``root`` only names the source in error messages."""
    bcc = _import_bcc()
    ok, why = _headers_present()
    if not ok:
        raise NotSupported("BCC kernel headers", why)
    if pin_dir is not None and not os.path.isdir(pin_dir):
        raise DatapathError(f"pin directory {pin_dir} does not exist")
    started = time.monotonic()
    try:
        module = bcc.BPF(text=text.encode(), cflags=flags)
    except Exception as e:  # BCC raises a bare Exception on compile errors
        raise CompileFailed(f"compiling {root / ENTRY_FILE} failed: {e}") from e
    name = ENTRY_FUNCTION
    try:
        fn = _load_func(module, name, bcc.BPF.SCHED_CLS)
        name = EXPLAIN_FUNCTION
        dry = _load_func(module, name, bcc.BPF.SCHED_CLS)
        name = INGRESS_FUNCTION
        ingress = _load_func(module, name, bcc.BPF.SCHED_CLS)
        name = EXPLAIN_INGRESS_FUNCTION
        dry_ingress = _load_func(module, name, bcc.BPF.SCHED_CLS)
        map_fds = {spec.name: module[spec.name.encode()].map_fd for spec in abi.MAP_SPECS}
    except Exception as e:  # verifier rejection, or a map missing from the source
        module.cleanup()
        raise LoadFailed(f"loading {name.decode()} failed: {e}") from e
    elapsed = time.monotonic() - started
    prog_id = syscall.prog_info(fn.fd).id
    log.info(
        "BPF program loaded",
        extra=kv(prog_id=prog_id, seconds=round(elapsed, 3), pin_dir=pin_dir or "-"),
    )
    return LoadedProgram(
        prog_fd=fn.fd,
        prog_id=prog_id,
        map_fds=map_fds,
        explain_fd=dry.fd,
        explain_id=syscall.prog_info(dry.fd).id,
        ingress_fd=ingress.fd,
        ingress_id=syscall.prog_info(ingress.fd).id,
        explain_ingress_fd=dry_ingress.fd,
        capacities=dict(capacities or {}),
        compile_seconds=elapsed,
        pin_dir=pin_dir,
        _bpf=module,
    )


VERIFIER_TAIL_LINES = 4


class _Rejected(Exception):
    """load_func failed; the message carries the end of the verifier's log."""


def _load_func(module, name: bytes, prog_type):
    """``module.load_func`` with the verifier's verdict in the exception. On a rejection libbcc
    only raises "Permission denied" and prints the verifier's log on fd 2; fd 2 is sent to an
    anonymous in-memory file for the call (memfd: the DaemonSet's root filesystem is read-only
    and has no writable temporary directory), then everything is written back to it unchanged,
    and the last lines (the rejected instruction and the reason) go into the error message."""
    sys.stderr.flush()
    saved = os.dup(2)
    captured = os.memfd_create("nodecryptor-verifier-log", os.MFD_CLOEXEC)
    try:
        os.dup2(captured, 2)
        try:
            return module.load_func(name, prog_type)
        except Exception as e:
            error = e
        finally:
            os.dup2(saved, 2)
            os.lseek(captured, 0, os.SEEK_SET)
            chunks = []
            while chunk := os.read(captured, 1 << 16):
                chunks.append(chunk)
            text = b"".join(chunks)
            view = memoryview(text)
            while view:
                view = view[os.write(2, view) :]
    finally:
        os.close(saved)
        os.close(captured)
    lines = [line for line in text.decode(errors="replace").splitlines() if line.strip()]
    tail = " | ".join(lines[-VERIFIER_TAIL_LINES:])
    raise _Rejected(f"{error}; verifier: {tail}" if tail else str(error)) from error


EMPTY_PROGRAM = b"int nc_empty(struct __sk_buff *skb) { return TC_ACT_UNSPEC; }"


def load_empty() -> LoadedProgram:
    """A program that only returns TC_ACT_UNSPEC: the test-run harness floor that
    benchmarks/bpf_cost.py subtracts. It has no maps."""
    bcc = _import_bcc()
    started = time.monotonic()
    module = bcc.BPF(text=b"#include <uapi/linux/pkt_cls.h>\n" + EMPTY_PROGRAM)
    fn = module.load_func(b"nc_empty", bcc.BPF.SCHED_CLS)
    return LoadedProgram(
        prog_fd=fn.fd,
        prog_id=syscall.prog_info(fn.fd).id,
        map_fds={},
        compile_seconds=time.monotonic() - started,
        _bpf=module,
    )


def probe(settings: Settings) -> tuple[bool, str]:
    """Whether the BPF datapath can work here: bcc importable, kernel headers present, the
    program compiles and the verifier accepts it (maps unpinned, released at once)."""
    try:
        loaded = load(settings, pin_dir=None)
    except NotSupported as e:
        return False, str(e)
    except DatapathError as e:
        return False, str(e)
    try:
        return True, f"compiled and loaded in {loaded.compile_seconds:.2f}s"
    finally:
        loaded.close()


# ---- the compile child -----------------------------------------------------------------------


def compile_and_pin(request: dict) -> dict:
    """What the short-lived compile child does (loader.py starts it): compile the text of the
    request with its flags, load the four entry points (maps pinned in ``pin_dir``), pin the
    programs into ``stage_dir`` under ``pins`` names, then rename ``stage_dir`` to ``key_dir``
    so a reader sees either no program set or a complete one. Returns the reply for the
    parent; raises what ``load_text`` raises. The maps are pinned in ``stage_dir`` as well,
    under ``maps_subdir``."""
    loaded = load_text(
        request["text"], request["cflags"], Path(request["root"]), request["pin_dir"]
    )
    try:
        stage = request["stage_dir"]
        os.mkdir(stage, mode=0o700)
        fds = {
            ENTRY_FUNCTION: loaded.prog_fd,
            EXPLAIN_FUNCTION: loaded.explain_fd,
            INGRESS_FUNCTION: loaded.ingress_fd,
            EXPLAIN_INGRESS_FUNCTION: loaded.explain_ingress_fd,
        }
        for function, pin_name in request["pins"].items():
            syscall.obj_pin(fds[function.encode()], os.path.join(stage, pin_name))
        # The maps too: the agent opens them by path, as BPF_MAP_GET_FD_BY_ID would need
        # CAP_SYS_ADMIN, which the DaemonSet does not grant.
        os.mkdir(os.path.join(stage, request["maps_subdir"]), mode=0o700)
        for name, fd in loaded.map_fds.items():
            syscall.obj_pin(fd, os.path.join(stage, request["maps_subdir"], name))
        os.rename(stage, request["key_dir"])
        return {"ok": True, "compile_seconds": loaded.compile_seconds, "prog_id": loaded.prog_id}
    finally:
        loaded.close()


def _child_main() -> int:
    """``python -m nodecryptor.datapath.bpf.program``: one JSON request on stdin, one JSON
    reply on stdout; BCC's and the verifier's own output go to the inherited stderr."""
    import json

    try:
        reply = compile_and_pin(json.load(sys.stdin))
    except NotSupported as e:
        reply = {
            "ok": False,
            "kind": "not_supported",
            "feature": e.feature,
            "why": e.why,
            "minimum": e.minimum,
        }
    except Exception as e:  # CompileFailed, LoadFailed, or an OSError while pinning
        reply = {
            "ok": False,
            "kind": "datapath",
            "message": str(e),
            "stage": getattr(e, "stage", "load_error"),
        }
    json.dump(reply, sys.stdout)
    sys.stdout.flush()
    return 0 if reply["ok"] else 1


if __name__ == "__main__":
    sys.exit(_child_main())
