"""The BPF datapath: loads the tc program with pinned maps, keeps the maps equal to the desired
state and the program attached to the desired underlay devices.

Lifecycle: ``BpfDatapath(settings)`` does no I/O; ``start()`` probes (bpffs, tcx or clsact,
compile and load) and raises ``NotSupported`` when BPF cannot be used, so the agent can fall
back to ip rules; ``apply()`` is idempotent; ``close()`` leaves links, filters and pins in
place, so the node keeps enforcing while no agent runs (fail-static); ``cleanup()`` removes
everything nodecryptor created and nothing else.
"""

from __future__ import annotations

import logging
import time

from ...errors import DatapathError, NotSupported
from ...log import kv
from ...model import DesiredState
from ...settings import Settings
from ..base import Observation
from . import attach, collector, inspect, pins, syscall

log = logging.getLogger(__name__)


class BpfDatapath:
    """``Datapath`` implementation on a tc egress program (tcx link or clsact filter)."""

    name = "bpf"

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
        self._recreated: list[dict] = []
        self._last_error = ""
        self._collector_registered = False

    # ---- start / probe -------------------------------------------------------------------

    def start(self) -> "BpfDatapath":
        """Probe and load; returns self. Raises NotSupported(feature, why) when BPF cannot be
        used here."""
        if self._loaded is not None:
            return self
        bpffs = self.settings.bpffs
        if not pins.is_bpffs(bpffs):
            raise NotSupported("bpffs", f"{bpffs} is not a mounted bpf filesystem "
                                        f"(mount -t bpf bpf {bpffs})")
        tcx_ok, tcx_why = syscall.tcx_supported()
        if self.attach_mode == attach.MODE_TCX and not tcx_ok:
            raise NotSupported("tcx", tcx_why, minimum="Linux 6.6")
        self.mode, self.mode_reason = attach.choose_mode(self.attach_mode, tcx_ok, tcx_why)
        from . import program  # the only module importing bcc; loaded only when BPF is wanted

        try:
            pins.ensure_dirs(bpffs)
        except pins.UnsafePinDir:
            raise  # a DatapathError naming path, owner and mode: auto falls back, saying why
        except OSError as e:
            raise NotSupported("bpffs", f"cannot create {pins.root(bpffs)}: {e}") from e
        checks = pins.check_maps(self.settings)
        self._recreated = [{"map": c.name, "why": c.why} for c in checks if c.action == "recreate"]
        # Loading is the probe: it compiles, passes the verifier and opens the pinned maps.
        try:
            self._loaded = program.load(self.settings, pins.maps_dir(bpffs))
        except NotSupported:
            raise
        except Exception as e:  # DatapathError from compile/verifier, or anything BCC raises
            raise NotSupported("bpf-program", f"compile/load failed: {e}") from e
        log.info("bpf program loaded",
                 extra=kv(prog_id=self._loaded.prog_id, mode=self.mode, why=self.mode_reason,
                          pin_dir=pins.maps_dir(bpffs),
                          maps_reused=[c.name for c in checks if c.action == "reuse"],
                          maps_recreated=[c.name for c in checks if c.action == "recreate"]))
        if self.metrics is not None and not self._collector_registered:
            collector.register(self.metrics.registry, self.settings)
            self._collector_registered = True
        return self

    @property
    def prog_id(self) -> int:
        return self._loaded.prog_id if self._loaded is not None else 0

    # ---- apply -----------------------------------------------------------------------------

    def apply(self, desired: DesiredState) -> None:
        if self._loaded is None:
            raise DatapathError("bpf datapath: apply before start()")
        from . import maps

        try:
            # CLOCK_MONOTONIC, the clock bpf_ktime_get_ns reads: the agent-alive timestamp.
            maps.sync(self._loaded.map_fds, desired, now_ns=time.monotonic_ns())
        except Exception as e:  # any failure here is retried by the reconcile loop
            self._last_error = f"map sync: {e}"
            raise DatapathError(f"bpf datapath: map sync failed: {e}") from e
        self._desired = desired
        wanted = [d.name for d in desired.devices]
        failures = []
        for name in wanted:
            try:
                self._attach(name)
            except OSError as e:
                failures.append(f"{name}: {e.strerror or e}")
            except Exception as e:  # pyroute2 NetlinkError and friends
                failures.append(f"{name}: {e}")
        try:
            self._detach_others(set(wanted))
            if inspect.pinned_prog_id(self.settings) != self._loaded.prog_id:
                pins.pin_prog(self.settings.bpffs, self._loaded.prog_fd,
                              self._loaded.explain_fd)
        except Exception as e:
            failures.append(f"detach/pin: {e}")
        self._last_error = "; ".join(failures)
        if failures:
            raise DatapathError(f"bpf datapath: attach failed on {self._last_error}")

    def _attach(self, ifname: str) -> attach.Attachment:
        if self.mode == attach.MODE_TCX:
            return attach.tcx_attach(self.settings.bpffs, ifname, self._loaded.prog_fd)
        return attach.tc_attach(ifname, self._loaded.prog_fd, self._loaded.prog_id)

    def _detach_others(self, wanted: set[str]) -> None:
        bpffs = self.settings.bpffs
        if self.mode == attach.MODE_TCX:
            for name in pins.pinned_link_names(bpffs):
                if name not in wanted:
                    attach.tcx_detach(bpffs, name)
            if not self._swept:
                # Left over from a legacy-tc run (mode switch): remove once after start.
                for name, ifindex in attach.tc_devices().items():
                    attach.tc_detach(name, ifindex)
        else:
            for name, ifindex in attach.tc_devices().items():
                if name not in wanted:
                    attach.tc_detach(name, ifindex)
            if not self._swept:
                for name in pins.pinned_link_names(bpffs):
                    attach.tcx_detach(bpffs, name)
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
        base = {"mode": self.mode, "mode_reason": self.mode_reason,
                "prog_id": loaded.prog_id if loaded is not None else 0,
                "pin_dir": pins.maps_dir(self.settings.bpffs),
                "maps_recreated": self._recreated}
        if loaded is None:
            return Observation(datapath=self.name, attached=False, ready=False,
                               reason="bpf datapath not started", details=base)
        if desired is None:
            return Observation(datapath=self.name, attached=False, ready=False,
                               reason="no desired state applied yet", details=base)
        try:
            atts = self.attachments(desired)
        except Exception as e:  # observe never raises for an expected condition
            return Observation(datapath=self.name, attached=False, ready=False,
                               reason=f"cannot read attachments: {e}", details=base)
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
        if self._last_error:
            problems.append(f"last apply: {self._last_error}")
        counters = {}
        try:
            counters = {name: c["packets"]
                        for name, c in collector.read_counters(
                            loaded.map_fds["nc_counters"]).items()}
        except (OSError, KeyError) as e:
            base["counters_error"] = str(e)
        details = {**base, "devices": [a.to_json() for a in atts]}
        attached = bool(atts) and all(not a.defunct for a in atts)
        return Observation(datapath=self.name, attached=attached, ready=not problems,
                           reason="; ".join(problems), details=details, counters=counters)

    # ---- shutdown ----------------------------------------------------------------------------

    def close(self) -> None:
        """Close the agent's fds; pinned links/program/maps keep the datapath enforcing."""
        if self._loaded is not None:
            self._loaded.close()
            self._loaded = None
            log.info("bpf datapath closed; program left attached and enforcing")

    def cleanup(self) -> None:
        self.close()
        removed = inspect.cleanup(self.settings)
        log.info("bpf datapath removed", extra=kv(**{k: len(v) for k, v in removed.items()
                                                    if isinstance(v, list)}))
        self._desired = None
        self._swept = False

