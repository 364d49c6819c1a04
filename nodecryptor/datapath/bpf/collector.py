"""Prometheus collector for the program's per-CPU counters, read from the pinned map at scrape
time (nothing is copied between scrapes, so a scrape always shows the kernel's numbers).

Metrics:
  nodecryptor_datapath_packets_total{reason, verdict}   packets by verdict reason
  nodecryptor_datapath_bytes_total{reason, verdict}     bytes by verdict reason
  nodecryptor_datapath_events_total{event}              MSS clamps, oversize redirects
  nodecryptor_datapath_read_errors_total                scrapes that could not read the map
  nodecryptor_cleartext_packets_total{direction, verdict}
      cluster traffic seen in the clear: egress/exempt, ingress/exempt,
      ingress/audit (an audited leak), ingress/drop (a refused leak); summed from the
      reasons of abi.CLEARTEXT_VERDICTS, so the series are fixed (four)
"""

from __future__ import annotations

import logging
import threading

from prometheus_client.core import CounterMetricFamily

from nodecryptor.core.log import kv
from nodecryptor.core.settings import Settings
from nodecryptor.datapath.bpf import abi, pins, syscall
from nodecryptor.datapath.bpf.maps import decode

log = logging.getLogger(__name__)


def read_pinned_counters(bpffs: str) -> dict[str, dict]:
    """The pinned counters, summed over CPUs (maps.decode.counters_of)."""
    with syscall.obj_get(pins.map_path(bpffs, abi.COUNTERS_MAP), read_only=True) as counters:
        return decode.counters_of(counters)


def cleartext_totals(counters: dict[str, dict]) -> dict[tuple[str, str], int]:
    """{(direction, verdict): packets} of nodecryptor_cleartext_packets_total, every series
    present (zero when nothing was seen)."""
    out = {key: 0 for key in sorted(set(abi.CLEARTEXT_VERDICTS.values()))}
    for reason, key in abi.CLEARTEXT_VERDICTS.items():
        out[key] += counters.get(abi.REASON_NAMES[reason], {}).get("packets", 0)
    return out


class DatapathCollector:
    """Reads the pinned counters map on every scrape; counts reads that fail."""

    def __init__(self, settings: Settings):
        self.bpffs = settings.bpffs
        self._lock = threading.Lock()
        self._read_errors = 0

    def describe(self):
        # Declaring no metrics up front keeps registration from triggering a map read.
        return []

    def collect(self):
        packets = CounterMetricFamily(
            "nodecryptor_datapath_packets",
            "Packets seen by the BPF program, by verdict reason.",
            labels=["reason", "verdict"],
        )
        nbytes = CounterMetricFamily(
            "nodecryptor_datapath_bytes",
            "Bytes seen by the BPF program, by verdict reason.",
            labels=["reason", "verdict"],
        )
        events = CounterMetricFamily(
            "nodecryptor_datapath_events",
            "Datapath events counted besides the verdict (MSS clamped, "
            "oversize packet redirected).",
            labels=["event"],
        )
        try:
            counters = read_pinned_counters(self.bpffs)
        except (OSError, ValueError) as e:
            with self._lock:
                self._read_errors += 1
            log.debug("cannot read datapath counters", extra=kv(error=str(e), bpffs=self.bpffs))
            counters = {}
        for name, c in counters.items():
            if c["kind"] == "reason":
                packets.add_metric([name, c["verdict"]], c["packets"])
                nbytes.add_metric([name, c["verdict"]], c["bytes"])
            else:
                events.add_metric([name], c["packets"])
        cleartext = CounterMetricFamily(
            "nodecryptor_cleartext_packets",
            "Cluster traffic seen in the clear: exempt bootstrap flows, audited and dropped "
            "leaks from peers.",
            labels=["direction", "verdict"],
        )
        if counters:
            for (direction, verdict), value in cleartext_totals(counters).items():
                cleartext.add_metric([direction, verdict], value)
        errors = CounterMetricFamily(
            "nodecryptor_datapath_read_errors", "Scrapes that failed to read the BPF counters map."
        )
        with self._lock:
            errors.add_metric([], self._read_errors)
        yield packets
        yield nbytes
        yield events
        yield cleartext
        yield errors


def register(registry, settings: Settings) -> DatapathCollector:
    """Register a DatapathCollector on ``registry`` and return it."""
    coll = DatapathCollector(settings)
    registry.register(coll)
    return coll
