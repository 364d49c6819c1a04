"""Where the agent's BPF program comes from: reused from pins keyed by its program text, or
compiled once in a short-lived child process.

The key is a hash of everything that decides what the compiler produces: the inlined C text,
the compile flags, the ABI version, the kernel release and the BCC version. Two things are left
out on purpose because they do not change a single instruction: the map pin directory (a load
location, passed as a define) and the directory the sources are installed in (it only appears
in ``#line`` markers and include flags, so a new image whose program is byte-for-byte the same
reuses it).

A compile runs ``python -m nodecryptor.datapath.bpf.program`` (``program.compile_and_pin``):
the child compiles, loads, pins the maps into the generation directory and the entry points
into ``programs/<key>/``, and exits, taking clang/LLVM's memory with it. The parent only opens
pins by path (no ``bcc`` import), so its RSS never holds the compiler. Errors come back as
the same exception type and message the in-process ``program.load`` raises.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from nodecryptor.core.errors import DatapathError, NotSupported
from nodecryptor.core.log import kv
from nodecryptor.core.runfiles import write_json
from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import abi, pins, program, syscall
from nodecryptor.observe.metrics import count_program_load

log = logging.getLogger(__name__)

KEY_FORMAT = 1
"""Bump when the meaning of a key changes (what is hashed, or what a key directory holds)."""
CHILD_TIMEOUT_SECONDS = 600.0
"""A compile took 37-39 s with three agents compiling at once on 2 vCPUs; ten minutes only
catches a hung child, it is not a performance budget."""
RECORD_FILE = "program.json"

compile_children_started = 0
"""How many compile children this process started: tests observe that a restart with an
unchanged program does not enter the compile path."""


@dataclass(frozen=True)
class ProgramBuild:
    """One program text ready to compile, and its key."""

    text: str
    cflags: tuple[str, ...]
    root: Path
    key: str


def bcc_version() -> str:
    """BCC's version without importing it (importing loads libbcc, and LLVM with it)."""
    spec = importlib.util.find_spec("bcc")
    if spec is None or not spec.origin:
        return "absent"
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return "unknown"
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return match.group(1) if match else "unknown"


def program_key(text: str, flags: list[str], root: Path) -> str:
    """The hash of what decides the compiled program (see the module docstring)."""
    where = str(root)
    stable_flags = [f.replace(where, "<bpf>") for f in flags if not f.startswith("-DNC_PIN_DIR=")]
    material = {
        "format": KEY_FORMAT,
        "abi": abi.ABI_VERSION,
        "kernel": os.uname().release,
        "bcc": bcc_version(),
        "cflags": stable_flags,
        "entries": sorted(pins.PROGRAM_PINS),
        "text": text.replace(where, "<bpf>"),
    }
    blob = json.dumps(material, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def build(settings: Settings, pin_dir: str | None) -> ProgramBuild:
    """Read and inline the sources and compute the key (no compiler involved)."""
    root = program.bpf_dir()
    text = program.inline_source(root)
    flags = program.cflags(settings, pin_dir, root)
    return ProgramBuild(
        text=text, cflags=tuple(flags), root=root, key=program_key(text, flags, root)
    )


class _PinnedSet:
    """Stands in for the BCC module in a LoadedProgram opened from pins: owns the objects
    whose fd numbers the LoadedProgram hands out, and closes them."""

    def __init__(self, objects: list[syscall.BpfObject]):
        self.objects = objects

    def cleanup(self) -> None:
        _close(self.objects)
        self.objects = []


def open_pinned(bpffs: str, key: str) -> program.LoadedProgram | None:
    """The programs pinned under ``key`` and the maps they use, or None when no complete set
    is pinned there. A set whose programs or maps do not look like ours raises DatapathError."""
    directory = pins.program_key_dir(bpffs, key)
    fds: list[syscall.BpfObject] = []
    try:
        progs = {}
        for function, pin_name in pins.PROGRAM_PINS.items():
            try:
                prog = syscall.obj_get(os.path.join(directory, pin_name))
            except FileNotFoundError:
                _close(fds)
                return None
            fds.append(prog)
            fd = prog.fd
            info = syscall.prog_info(fd)
            if info.name.decode() != function[:15]:
                raise DatapathError(
                    f"{directory}/{pin_name} holds program {info.name.decode()!r}, not {function}"
                )
            progs[function] = (fd, info.id)
        # The maps by path (BPF_MAP_GET_FD_BY_ID needs CAP_SYS_ADMIN), checked to be the
        # ones the programs use.
        used = {m for fd, _ in progs.values() for m in syscall.prog_map_ids(fd)}
        map_fds: dict[str, int] = {}
        for spec in abi.MAP_SPECS:
            path = os.path.join(directory, pins.PROGRAM_MAPS, spec.name)
            try:
                pinned = syscall.obj_get(path)
            except FileNotFoundError:
                raise DatapathError(f"{path} is missing") from None
            fds.append(pinned)
            fd = pinned.fd
            if syscall.map_info(fd).id not in used:
                raise DatapathError(f"{path} is not a map the pinned programs use")
            map_fds[spec.name] = fd
        capacities = {
            family: syscall.map_info(map_fds[name]).max_entries
            for family, name in abi.DESTINATION_MAPS.items()
        }
    except BaseException:
        _close(fds)
        raise
    egress, explain = progs["nc_egress"], progs["nc_explain"]
    ingress, explain_ingress = progs["nc_ingress"], progs["nc_explain_ingress"]
    return program.LoadedProgram(
        prog_fd=egress[0],
        prog_id=egress[1],
        map_fds=map_fds,
        explain_fd=explain[0],
        explain_id=explain[1],
        ingress_fd=ingress[0],
        ingress_id=ingress[1],
        explain_ingress_fd=explain_ingress[0],
        capacities=capacities,
        _bpf=_PinnedSet(fds),
    )


def _close(objects: list[syscall.BpfObject]) -> None:
    for obj in objects:
        obj.close()


def compile_in_child(bpffs: str, built: ProgramBuild, pin_dir: str) -> float:
    """Compile, load and pin ``built`` in a child process; returns the child's compile+load
    seconds. Raises NotSupported or DatapathError as ``program.load`` would."""
    global compile_children_started
    stage = os.path.join(pins.programs_dir(bpffs), f"stage-{os.getpid()}-{built.key}")
    pins.remove_program_key(bpffs, os.path.basename(stage))  # a killed earlier attempt
    request = {
        "text": built.text,
        "cflags": list(built.cflags),
        "root": str(built.root),
        "pin_dir": pin_dir,
        "stage_dir": stage,
        "key_dir": pins.program_key_dir(bpffs, built.key),
        "pins": pins.PROGRAM_PINS,
        "maps_subdir": pins.PROGRAM_MAPS,
    }
    compile_children_started += 1
    log.info(
        "compiling the BPF program in a child process", extra=kv(key=built.key, pin_dir=pin_dir)
    )
    # The child imports the very package this process runs, wherever it is installed.
    package_parent = str(Path(program.__file__).resolve().parents[3])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            p for p in (package_parent, os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    try:
        done = subprocess.run(
            [sys.executable, "-m", "nodecryptor.datapath.bpf.program"],
            input=json.dumps(request),
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            timeout=CHILD_TIMEOUT_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as e:
        pins.remove_program_key(bpffs, os.path.basename(stage))
        raise DatapathError(
            f"compiling {built.root / program.ENTRY_FILE} did not finish "
            f"within {CHILD_TIMEOUT_SECONDS:.0f}s"
        ) from e
    except OSError as e:
        raise DatapathError(f"cannot start the compile child {sys.executable}: {e}") from e
    try:
        reply = json.loads(done.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        pins.remove_program_key(bpffs, os.path.basename(stage))
        raise DatapathError(
            f"the compile child exited with status {done.returncode} "
            "without a reply (its output is in the agent's stderr)"
        ) from None
    if reply.get("ok"):
        return float(reply["compile_seconds"])
    pins.remove_program_key(bpffs, os.path.basename(stage))
    if reply.get("kind") == "not_supported":
        raise NotSupported(reply["feature"], reply["why"], minimum=reply.get("minimum"))
    # The exception type the in-process loader raises, so callers tell the stages apart.
    error = {"compile_error": program.CompileFailed, "load_error": program.LoadFailed}.get(
        reply.get("stage"), DatapathError
    )
    raise error(reply.get("message") or "the compile child failed")


@dataclass
class Obtained:
    """A loaded program and how it was obtained (what ``status`` shows)."""

    loaded: program.LoadedProgram
    key: str
    reused: bool
    compile_seconds: float
    """The child's compile+load time; 0 when reused."""
    open_seconds: float
    """Everything this call took, the compile child included."""

    def summary(self) -> dict:
        return {
            "key": self.key,
            "source": "reused" if self.reused else "compiled",
            "compile_seconds": round(self.compile_seconds, 3),
            "seconds": round(self.open_seconds, 3),
            "prog_id": self.loaded.prog_id,
        }


def load_generation(
    settings: Settings, capacities: dict[int, int], restart: bool = False, metrics=None
) -> tuple[int, Obtained]:
    """(generation number, program) for destination maps of ``capacities``. On a
    ``restart`` whose program is unchanged: the attached generation as it is (nothing is
    compiled, created or copied). Otherwise a new, empty generation directory with the
    program reused from its pins or compiled in a child; a failure removes that directory
    and raises NotSupported. Records how the program was obtained for ``status``."""
    bpffs = settings.bpffs
    sizes = dataclasses.replace(
        settings.map_sizes, destinations_v4=capacities[4], destinations_v6=capacities[6]
    )
    sized = dataclasses.replace(settings, map_sizes=sizes)
    current = pins.current_generation(bpffs) if restart else None
    if current is not None:
        got = adopt(sized, pins.generation_dir(bpffs, current))
        if got is not None:
            pins.prune_program_keys(bpffs, got.key)
            write_record(settings, got)
            return current, got
    number, path = pins.new_generation(bpffs)
    try:
        got = obtain(sized, path, metrics)
    except NotSupported:
        pins.remove_generation(bpffs, number)
        raise
    except Exception as e:  # DatapathError from compile/verifier, or an OSError pinning
        pins.remove_generation(bpffs, number)
        raise NotSupported("bpf-program", f"compile/load failed: {e}") from e
    write_record(settings, got)
    return number, got


def obtain(settings: Settings, pin_dir: str, metrics=None) -> Obtained:
    """The program for ``settings`` with its maps pinned in ``pin_dir``: the pinned set of
    the same key when there is one (its maps are pinned into ``pin_dir`` if they are not
    there yet), otherwise compiled in a child. A pinned set that cannot be used is removed
    and compiled again. Only a compile counts in ``nodecryptor_bpf_program_loads_total``
    (by result) and sets the load time and duration; a reuse is not a load attempt."""
    started = time.monotonic()
    bpffs = settings.bpffs
    built = build(settings, pin_dir)
    reused, seconds = True, 0.0
    try:
        loaded = open_pinned(bpffs, built.key)
    except (DatapathError, OSError) as e:
        log.warning(
            "pinned program set unusable; compiling again", extra=kv(key=built.key, error=str(e))
        )
        pins.remove_program_key(bpffs, built.key)
        loaded = None
    if loaded is None:
        reused = False
        try:
            seconds = compile_in_child(bpffs, built, pin_dir)
            loaded = open_pinned(bpffs, built.key)
            if loaded is None:
                raise DatapathError(
                    f"the compile child reported success but "
                    f"{pins.program_key_dir(bpffs, built.key)} is incomplete"
                )
        except NotSupported:
            raise  # BCC or kernel headers missing: nothing was attempted
        except Exception as e:
            count_program_load(metrics, getattr(e, "stage", "load_error"))
            raise
        count_program_load(metrics, "ok", seconds)
    try:
        _pin_maps(loaded, pin_dir)
    except OSError as e:
        loaded.close()
        raise DatapathError(
            f"pinning the maps of program set {built.key} into {pin_dir}: {e}"
        ) from e
    loaded.pin_dir = pin_dir
    loaded.compile_seconds = seconds
    elapsed = time.monotonic() - started
    log.info(
        "bpf program ready",
        extra=kv(
            key=built.key,
            reused=reused,
            compile_seconds=round(seconds, 3),
            seconds=round(elapsed, 3),
            prog_id=loaded.prog_id,
        ),
    )
    return Obtained(
        loaded=loaded, key=built.key, reused=reused, compile_seconds=seconds, open_seconds=elapsed
    )


def _pin_maps(loaded: program.LoadedProgram, pin_dir: str) -> None:
    """Pin every map the program uses into ``pin_dir``, unless that name is already pinned
    there to the same map; a different map under the name is an error."""
    for name, fd in loaded.map_fds.items():
        path = os.path.join(pin_dir, name)
        try:
            pinned = syscall.obj_get(path)
        except FileNotFoundError:
            syscall.obj_pin(fd, path)
            continue
        with pinned:
            if syscall.map_info(pinned).id != syscall.map_info(fd).id:
                raise OSError(f"{path} is another map than the program's {name}")


def adopt(settings: Settings, pin_dir: str) -> Obtained | None:
    """A restart's fast path: the pinned program set of ``settings``' key when the maps it
    uses are the ones pinned in ``pin_dir`` (the attached generation), so the restart keeps
    program and maps as they are; None otherwise (nothing is left open)."""
    started = time.monotonic()
    built = build(settings, pin_dir)
    try:
        loaded = open_pinned(settings.bpffs, built.key)
    except (DatapathError, OSError):
        return None  # obtain() says why and compiles
    if loaded is None:
        return None
    if not _uses_maps_of(loaded, pin_dir):
        loaded.close()
        return None
    loaded.pin_dir = pin_dir
    elapsed = time.monotonic() - started
    log.info(
        "bpf program reused with its maps",
        extra=kv(key=built.key, pin_dir=pin_dir, seconds=round(elapsed, 3), prog_id=loaded.prog_id),
    )
    return Obtained(
        loaded=loaded, key=built.key, reused=True, compile_seconds=0.0, open_seconds=elapsed
    )


def key_of_prog(bpffs: str, prog_id: int) -> str | None:
    """The pinned key whose egress program is ``prog_id`` (the program that ran before)."""
    for key in pins.program_keys(bpffs) if prog_id else ():
        try:
            prog = syscall.obj_get(os.path.join(pins.program_key_dir(bpffs, key), "egress"))
        except OSError:
            continue
        with prog:
            if syscall.prog_info(prog).id == prog_id:
                return key
    return None


def _uses_maps_of(loaded: program.LoadedProgram, pin_dir: str) -> bool:
    """True when ``pin_dir`` pins exactly the config map ``loaded`` uses."""
    try:
        pinned = syscall.obj_get(os.path.join(pin_dir, "nc_config_map"), read_only=True)
    except OSError:
        return False
    with pinned:
        return syscall.map_info(pinned).id == syscall.map_info(loaded.map_fds["nc_config_map"]).id


# ---- the record status shows -----------------------------------------------------------------


def record_path(settings: Settings) -> str:
    return os.path.join(settings.run_dir, RECORD_FILE)


def write_record(settings: Settings, got: Obtained) -> None:
    """Say in the run directory how the running program was obtained (``status`` reads it
    and shows it while the pinned program is still this one). A read-only run directory only
    loses the status line."""
    path = record_path(settings)
    record = {**got.summary(), "since": time.time()}
    try:
        write_json(path, record)
    except OSError as e:
        log.warning("cannot record how the program was obtained", extra=kv(path=path, error=str(e)))


def last_record(settings: Settings) -> dict | None:
    try:
        with open(record_path(settings)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None
