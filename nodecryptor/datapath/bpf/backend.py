"""The BPF datapath: loads the tc program with pinned maps, keeps the maps equal to the desired
state and the program attached to the desired underlay devices.

Lifecycle: ``BpfDatapath(settings)`` does no I/O; ``start()`` probes (bpffs, tcx or clsact,
compile and load into a fresh generation of maps, see pins.py) and raises ``NotSupported`` when
BPF cannot be used, so the agent can fall back to ip rules; ``apply()`` is idempotent;
``close()`` leaves links, filters and pins in place, so the node keeps enforcing while no agent
runs (fail-static); ``cleanup()`` removes everything nodecryptor created and nothing else.

Capacity fails closed, all in ``apply``:

- a desired state with more destinations of one family than ``MapSizes.destinations_max`` is
  refused as a whole before anything is written: the previous state keeps enforcing, readiness
  is false and says so, ``nodecryptor_capacity_refused_total`` counts it;
- when the loaded maps cannot hold old and new entries side by side, a new generation sized
  from the desired state (with head-room) is loaded and filled completely, and only then
  swapped into the links (BPF_LINK_UPDATE, or tc filter replace): a failure on the way leaves
  the running program and its maps untouched;
- a generation is attached only after its configuration was written, so a node that once
  enforced never runs a program that passes everything as ``disabled``.
"""

from __future__ import annotations

import logging
import socket
import time

from nodecryptor.core.errors import DatapathError, NotSupported
from nodecryptor.core.log import kv
from nodecryptor.core.model import DesiredState
from nodecryptor.core.settings import DatapathMode, Settings
from nodecryptor.datapath.base import Observation
from nodecryptor.datapath.bpf import abi, attach, collector, inspect, lifecycle, pins, syscall
from nodecryptor.datapath.bpf.maps import decode

log = logging.getLogger(__name__)


class BpfDatapath:
    """``Datapath`` implementation on a tc egress program (tcx link or clsact filter)."""

    name = DatapathMode.BPF

    def __init__(self, settings: Settings, metrics=None, attach_mode: str = "auto"):
        """``attach_mode``: "auto" (tcx when the kernel has it), "tcx" or "tc" (legacy clsact
        filter even on a tcx kernel; for tests and for clusters whose Cilium uses legacy tc)."""
        if attach_mode not in ("auto", attach.MODE_TCX, attach.MODE_TC):
            raise ValueError(f"attach_mode {attach_mode!r}: expected auto, tcx or tc")
        self.settings = settings
        self.metrics = metrics
        self.attach_mode = attach_mode
        self.mode = ""
        self.mode_reason = ""
        self._loaded = None
        self._desired: DesiredState | None = None
        self._swept = False
        self._generation = 0
        self._attached_generation: int | None = None
        """Generation the links run: the previous agent's at start, ours after a swap."""
        self._retired = None
        """The previously attached LoadedProgram after a growth, closed once swapped out."""
        self._capacity_problem = ""
        self._last_error = ""
        self._collector_registered = False
        self._program: dict = {}  # how the loaded program was obtained (loader.Obtained)
        self._attached_key: str | None = None  # what the links run: the rollback key

    # ---- start / probe -------------------------------------------------------------------

    def start(self) -> "BpfDatapath":
        """Probe and load; returns self. Raises NotSupported(feature, why) when BPF cannot be
        used here."""
        if self._loaded is not None:
            return self
        from nodecryptor.datapath.bpf import loader

        bpffs = self.settings.bpffs
        if not pins.is_bpffs(bpffs):
            raise NotSupported(
                "bpffs", f"{bpffs} is not a mounted bpf filesystem (mount -t bpf bpf {bpffs})"
            )
        tcx_ok, tcx_why = syscall.tcx_supported()
        if self.attach_mode == attach.MODE_TCX and not tcx_ok:
            raise NotSupported("tcx", tcx_why, minimum="Linux 6.6")
        self.mode, self.mode_reason = attach.choose_mode(self.attach_mode, tcx_ok, tcx_why)
        try:
            pins.ensure_dirs(bpffs)
        except pins.UnsafePinDir:
            raise  # a DatapathError naming path, owner and mode: auto falls back, saying why
        except OSError as e:
            raise NotSupported("bpffs", f"cannot create {pins.root(bpffs)}: {e}") from e
        # Before loading: even a start that fails later leaves the node consistent.
        lifecycle.repair_at_start(bpffs)
        # Start from the capacity the previous agent grew to, so a restart does not regrow.
        capacities = self._pinned_capacities()
        self._attached_generation = pins.current_generation(bpffs)
        self._attached_key = loader.key_of_prog(bpffs, inspect.pinned_prog_id(self.settings))
        self._loaded = self._load_generation(capacities, restart=True)
        log.info(
            "bpf program loaded",
            extra=kv(
                prog_id=self._loaded.prog_id,
                mode=self.mode,
                why=self.mode_reason,
                pin_dir=self._loaded.pin_dir,
                capacity_v4=capacities[4],
                capacity_v6=capacities[6],
            ),
        )
        if self.metrics is not None and not self._collector_registered:
            collector.register(self.metrics.registry, self.settings)
            self._collector_registered = True
        if self.metrics is not None:
            self.metrics.ingress_supported.set(1)
        return self

    # ---- generations ---------------------------------------------------------------------

    def _pinned_capacities(self) -> dict[int, int]:
        sizes = self.settings.map_sizes
        out = {4: sizes.destinations_v4, 6: sizes.destinations_v6}
        for family, name in abi.DESTINATION_MAPS.items():
            try:
                pinned = syscall.obj_get(pins.map_path(self.settings.bpffs, name), read_only=True)
            except OSError:
                continue
            with pinned:
                out[family] = max(out[family], syscall.map_info(pinned).max_entries)
        return out

    def _load_generation(self, capacities: dict[int, int], restart: bool = False):
        """The program for ``capacities`` and its generation of maps (loader.py: reused
        from its pins, or compiled in a child process)."""
        from nodecryptor.datapath.bpf import loader

        self._generation, got = loader.load_generation(
            self.settings, capacities, restart, self.metrics
        )
        self._program = got.summary()
        return got.loaded

    def _capacity_for(self, count: int, minimum: int) -> int:
        """A power of two with head-room above ``count``, at least ``minimum``, at most the
        hard cap."""
        sizes = self.settings.map_sizes
        want = max(minimum, count + count * sizes.headroom_percent // 100, 1)
        return min(1 << (want - 1).bit_length(), max(sizes.destinations_max, count))

    def _grow(self, desired: DesiredState, error) -> None:
        """Load a generation that holds ``desired`` and fill it completely; the running
        program is not touched (it is swapped in by the attach step)."""
        from nodecryptor.datapath.bpf.maps import diff, encode

        counts = encode.destination_counts(desired)
        sizes = self.settings.map_sizes
        capacities = {
            4: self._capacity_for(counts[4], sizes.destinations_v4),
            6: self._capacity_for(counts[6], sizes.destinations_v6),
        }
        old, old_generation = self._loaded, self._generation
        log.info(
            "destination maps too small; loading a larger generation",
            extra=kv(
                why=str(error),
                ipv4=counts[4],
                ipv6=counts[6],
                capacity_v4=capacities[4],
                capacity_v6=capacities[6],
            ),
        )
        try:
            new = self._load_generation(capacities)
        except NotSupported as e:
            raise DatapathError(f"growing the maps failed: {e}") from e
        try:
            diff.sync(new.map_fds, desired, now_ns=time.monotonic_ns(), capacities=new.capacities)
        except Exception:
            new.close()
            pins.remove_generation(self.settings.bpffs, self._generation)
            self._generation = old_generation
            raise
        self._loaded = new
        if self._attached_generation != old_generation:
            # Loaded by this agent but never attached: nothing runs it.
            old.close()
            pins.remove_generation(self.settings.bpffs, old_generation)
        else:
            self._retired = old
        self._export_capacity()

    def _export_capacity(self) -> None:
        if self.metrics is not None and self._loaded is not None:
            for family, capacity in self._loaded.capacities.items():
                self.metrics.datapath_capacity.labels(family=f"ipv{family}").set(capacity)

    def _refuse_if_over_cap(self, desired: DesiredState) -> None:
        from nodecryptor.datapath.bpf.maps import encode

        counts = encode.destination_counts(desired)
        cap = self.settings.map_sizes.destinations_max
        over = {f: n for f, n in counts.items() if n > cap}
        if not over:
            self._capacity_problem = ""
            return
        problem = (
            "desired state refused as a whole: "
            + ", ".join(
                f"{n} IPv{f} destinations exceed the hard cap of {cap}" for f, n in over.items()
            )
            + "; the previous state keeps enforcing"
        )
        if problem != self._capacity_problem:
            log.error(
                "datapath capacity exceeded", extra=kv(ipv4=counts[4], ipv6=counts[6], hard_cap=cap)
            )
        self._capacity_problem = problem
        if self.metrics is not None:
            self.metrics.capacity_refused.inc()
        raise DatapathError(problem)

    @property
    def prog_id(self) -> int:
        return self._loaded.prog_id if self._loaded is not None else 0

    # ---- apply -----------------------------------------------------------------------------

    def apply(self, desired: DesiredState) -> None:
        if self._loaded is None:
            raise DatapathError("bpf datapath: apply before start()")
        from nodecryptor.datapath.bpf.maps import diff

        try:
            self._refuse_if_over_cap(desired)
        except DatapathError as e:
            self._last_error = str(e)
            raise
        try:
            try:
                # CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads: the agent-alive timestamp.
                diff.sync(
                    self._loaded.map_fds,
                    desired,
                    now_ns=time.monotonic_ns(),
                    capacities=self._loaded.capacities,
                )
            except diff.CapacityError as e:
                self._grow(desired, e)
        except Exception as e:  # any failure here is retried by the reconcile loop
            self._last_error = f"map sync: {e}"
            raise DatapathError(f"bpf datapath: map sync failed: {e}") from e
        self._export_capacity()
        self._desired = desired
        wanted = [d.name for d in desired.devices]
        new_generation = self._attached_generation != self._generation
        if new_generation:
            self._carry_counters()
        failures = []
        for name in wanted:
            try:
                self._attach(name)
            except OSError as e:
                failures.append(f"{name}: {e.strerror or e}")
            except Exception as e:  # pyroute2 NetlinkError and friends
                failures.append(f"{name}: {e}")
        # cilium_wg0's ingress: the program clamps the MSS of handshakes peers send through
        # the tunnel; absent until Cilium creates it, attached on a later apply.
        tunnel = desired.wg.ifname if desired.wg.present and desired.wg.ifindex else ""
        if tunnel and not _link_exists(tunnel):
            tunnel = ""  # gone since it was read: the link watcher wakes the next pass
        if tunnel:
            try:
                self._attach_ingress(tunnel)
            except OSError as e:
                failures.append(f"{tunnel} ingress: {e.strerror or e}")
            except Exception as e:  # pyroute2 NetlinkError and friends
                failures.append(f"{tunnel} ingress: {e}")
        try:
            self._detach_others(set(wanted), {tunnel} - {""})
            if inspect.pinned_prog_id(self.settings) != self._loaded.prog_id:
                pins.pin_prog(self.settings.bpffs, self._loaded.prog_fd, self._loaded.explain_fd)
                pins.pin_ingress_progs(
                    self.settings.bpffs, self._loaded.ingress_fd, self._loaded.explain_ingress_fd
                )
        except Exception as e:
            failures.append(f"detach/pin: {e}")
        self._last_error = "; ".join(failures)
        if failures:
            raise DatapathError(f"bpf datapath: attach failed on {self._last_error}")
        if new_generation:
            self._switch_generation()

    def _carry_counters(self) -> None:
        """Copy the counters of the attached generation into the new one just before the
        swap, so the metrics do not reset."""
        from nodecryptor.datapath.bpf.maps import diff

        try:
            old = syscall.obj_get(
                pins.map_path(self.settings.bpffs, abi.COUNTERS_MAP), read_only=True
            )
        except OSError:
            return  # first start, or an agent of another ABI version: start from zero
        with old:
            if (
                syscall.map_info(old).id
                == syscall.map_info(self._loaded.map_fds[abi.COUNTERS_MAP]).id
            ):
                return  # the new generation pins the same maps (a reused program set)
            try:
                diff.copy_counters(old, self._loaded.map_fds[abi.COUNTERS_MAP])
            except OSError as e:
                log.warning("cannot carry the counters over", extra=kv(error=str(e)))
        for name in diff.CARRIED_LRUS:
            try:
                old = syscall.obj_get(pins.map_path(self.settings.bpffs, name), read_only=True)
            except OSError:
                continue  # a generation from before the map existed
            with old:
                try:
                    copied = diff.copy_entries(old, self._loaded.map_fds[name], name)
                    log.info("map entries carried over", extra=kv(map=name, entries=copied))
                except OSError as e:
                    log.warning("cannot carry map entries over", extra=kv(map=name, error=str(e)))

    def _switch_generation(self) -> None:
        """After every device runs the new program: point ``current`` at its maps and remove
        the older generations (programs still using them keep them alive)."""
        bpffs = self.settings.bpffs
        pins.set_current(bpffs, self._generation)
        removed = pins.remove_stale(bpffs, keep=self._generation)
        key = self._program.get("key")
        if key:
            removed += pins.prune_program_keys(bpffs, key, previous=self._attached_key)
            self._attached_key = key
        self._attached_generation = self._generation
        if self._retired is not None:
            self._retired.close()
            self._retired = None
        log.info(
            "map generation attached",
            extra=kv(
                generation=self._generation, prog_id=self._loaded.prog_id, removed=len(removed)
            ),
        )

    def _attach(self, ifname: str) -> attach.Attachment:
        # Ingress first: the egress swap moves the generation, and both programs of one load
        # share its maps (nc_ingress, same discipline as egress).
        loaded = self._loaded
        self._attach_ingress(ifname)
        if self.mode == attach.MODE_TCX:
            return attach.tcx_attach(self.settings.bpffs, ifname, loaded.prog_fd)
        return attach.tc_attach(ifname, loaded.prog_fd, loaded.prog_id)

    def _attach_ingress(self, ifname: str) -> attach.Attachment:
        loaded = self._loaded
        if self.mode == attach.MODE_TCX:
            return attach.tcx_attach(self.settings.bpffs, ifname, loaded.ingress_fd, attach.INGRESS)
        return attach.tc_attach(ifname, loaded.ingress_fd, loaded.ingress_id, attach.INGRESS)

    def _detach_others(self, wanted: set[str], ingress_only: set[str] = frozenset()) -> None:
        """Remove nodecryptor's hooks from devices no longer wanted; ``ingress_only`` devices
        (cilium_wg0) keep their ingress program."""
        bpffs = self.settings.bpffs
        for d in (attach.EGRESS, attach.INGRESS):
            wanted_d = wanted | ingress_only if d == attach.INGRESS else wanted
            if self.mode == attach.MODE_TCX:
                for name in pins.pinned_link_names(bpffs, d):
                    if name not in wanted_d:
                        attach.tcx_detach(bpffs, name, d)
                if not self._swept:
                    # Left over from a legacy-tc run (mode switch): remove once after start.
                    for name, ifindex in attach.tc_devices(d).items():
                        attach.tc_detach(name, ifindex, d)
            else:
                for name, ifindex in attach.tc_devices(d).items():
                    if name not in wanted_d:
                        attach.tc_detach(name, ifindex, d)
                if not self._swept:
                    for name in pins.pinned_link_names(bpffs, d):
                        attach.tcx_detach(bpffs, name, d)
        self._swept = True

    # ---- observe ---------------------------------------------------------------------------

    def attachments(self, desired: DesiredState | None = None) -> list[attach.Attachment]:
        """Attachments on the devices of ``desired`` (default: the last applied state)."""
        desired = desired if desired is not None else self._desired
        if desired is None:
            return []
        found = []
        for dev in desired.devices:
            if self.mode == attach.MODE_TCX:
                att = attach.tcx_observe(self.settings.bpffs, dev.name)
            else:
                att = attach.tc_observe(dev.name, self.prog_id)
            if att is not None:
                found.append(att)
        return found

    def observe(self) -> Observation:
        # Called from the health server's thread too: work on a snapshot of the references.
        loaded, desired = self._loaded, self._desired
        base = {
            "mode": self.mode,
            "mode_reason": self.mode_reason,
            "prog_id": loaded.prog_id if loaded is not None else 0,
            "pin_dir": loaded.pin_dir if loaded is not None else "",
            "generation": self._generation,
            "program": dict(self._program),
            "capacity": (
                {f"ipv{f}": c for f, c in loaded.capacities.items()} if loaded is not None else {}
            ),
        }
        if loaded is None:
            return Observation(
                datapath=self.name,
                attached=False,
                ready=False,
                reason="bpf datapath not started",
                details=base,
            )
        if desired is None:
            return Observation(
                datapath=self.name,
                attached=False,
                ready=False,
                reason="no desired state applied yet",
                details=base,
            )
        try:
            atts = self.attachments(desired)
        except Exception as e:  # observe never raises for an expected condition
            return Observation(
                datapath=self.name,
                attached=False,
                ready=False,
                reason=f"cannot read attachments: {e}",
                details=base,
            )
        problems = []
        by_name = {a.device: a for a in atts}
        for dev in desired.devices:
            att = by_name.get(dev.name)
            if att is None:
                problems.append(f"not attached to {dev.name}")
            elif att.defunct:
                problems.append(f"tcx link on {dev.name} is defunct (device re-created?)")
            elif att.shadowed_by:
                problems.append(f"shadowed on {dev.name}: {att.shadowed_by}")
            elif att.prog_id and att.prog_id != loaded.prog_id:
                problems.append(f"{dev.name} runs program {att.prog_id}, not {loaded.prog_id}")
        if not desired.devices:
            problems.append("no underlay device to attach to")
        if self._capacity_problem:
            problems.append(self._capacity_problem)
        elif self._last_error:
            problems.append(f"last apply: {self._last_error}")
        counters = {}
        try:
            counters = {
                name: c["packets"]
                for name, c in decode.counters_of(loaded.map_fds[abi.COUNTERS_MAP]).items()
            }
        except (OSError, KeyError) as e:
            base["counters_error"] = str(e)
        details = {**base, "devices": [a.to_json() for a in atts]}
        attached = bool(atts) and all(not a.defunct for a in atts)
        return Observation(
            datapath=self.name,
            attached=attached,
            ready=not problems,
            reason="; ".join(problems),
            details=details,
            counters=counters,
        )

    # ---- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the agent's fds; pinned links/program/maps keep the datapath enforcing."""
        if self._retired is not None:
            self._retired.close()
            self._retired = None
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
            log.info("bpf datapath closed; program left attached and enforcing")

    def cleanup(self) -> None:
        self.close()
        removed = inspect.cleanup(self.settings)
        log.info(
            "bpf datapath removed",
            extra=kv(**{k: len(v) for k, v in removed.items() if isinstance(v, list)}),
        )
        self._desired = None
        self._swept = False


def _link_exists(name: str) -> bool:
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True
